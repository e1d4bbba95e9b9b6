"""AdamW for BitNet training (SPEC §2): β = (0.9, 0.95), weight decay only on weight matrices.

Norm gains, biases and embeddings (and a ``lm_head`` tied to them) take no weight decay, as usual for
language models; everything else with ``ndim >= 2`` (the BitLinear master weights, an untied ``lm_head``)
does.
"""

from __future__ import annotations

import torch
from torch import nn

from .schedule import DECAY_GROUP_KEY

__all__ = ["PAPER_BETAS", "build_adamw", "split_decay_parameters"]

#: AdamW betas of the BitNet b1.58 recipe.
PAPER_BETAS: tuple[float, float] = (0.9, 0.95)


def split_decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decayed, not_decayed)`` trainable parameters of ``model``, each parameter once (tied weights too)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed: list[nn.Parameter] = []
    not_decayed: list[nn.Parameter] = []
    for _, param in model.named_parameters():  # named_parameters() yields a tied parameter once
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_ids:
            not_decayed.append(param)
        else:
            decayed.append(param)
    return decayed, not_decayed


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = PAPER_BETAS,
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with two groups (decayed / not decayed).

    The decayed group is tagged so that :func:`~bitnet_torch.training.schedule.apply_weight_decay`
    switches only it at the stage boundary. Raises ``ValueError`` when nothing is trainable.
    """
    decayed, not_decayed = split_decay_parameters(model)
    if not decayed and not not_decayed:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decayed, "weight_decay": weight_decay, DECAY_GROUP_KEY: True},
        {"params": not_decayed, "weight_decay": 0.0, DECAY_GROUP_KEY: False},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
