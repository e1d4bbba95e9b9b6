"""Model surgery: swap ``nn.Linear`` layers for BitLinear (training) or PackedBitLinear (inference)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .bitlinear import BitLinear
from .packed import PackedBitLinear

__all__ = ["convert_to_bitnet", "pack_model", "set_lambda"]


def _is_excluded(name: str, exclude: Iterable[str]) -> bool:
    """True when a pattern equals a dotted component of ``name`` or a dotted suffix of it."""
    parts = name.split(".")
    for pattern in exclude:
        if pattern in parts or name == pattern or name.endswith("." + pattern):
            return True
    return False


def convert_to_bitnet(model: nn.Module, exclude: Iterable[str] = ("lm_head",), **bitlinear_options: Any) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`BitLinear` sharing its weight and bias.

    ``exclude`` names modules to keep in full precision: a pattern matches a module whose dotted name has
    it as a component (``"lm_head"``) or as a suffix (``"mlp.down_proj"``). ``bitlinear_options`` go to
    :class:`BitLinear` (``act_bits``, ``use_rms_norm``, ``lambda_``). Returns ``model``.
    Layers that are already BitLinear are left as they are.
    """
    exclude = tuple(exclude)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, BitLinear) and not _is_excluded(name, exclude)
    ]
    for name, module in targets:
        model.set_submodule(name, BitLinear.from_linear(module, **bitlinear_options))
    return model


def pack_model(model: nn.Module, scale_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`BitLinear` of ``model`` (in place) by its packed twin; returns ``model``.

    The float master weights of those layers are released (only uint8 codes and scales remain).
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]
    for name, module in targets:
        model.set_submodule(name, PackedBitLinear.from_bitlinear(module, scale_dtype=scale_dtype))
    return model


def set_lambda(model: nn.Module, lambda_: float) -> int:
    """Set the gradual-quantization strength of every BitLinear in ``model``; returns how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.set_lambda(lambda_)
            count += 1
    return count
