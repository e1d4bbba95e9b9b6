"""Attention dispatch for BitNet layers: Transformers' attention interface, with a GQA-native SDPA path on CPU.

Transformers' ``sdpa`` attention, when it cannot use SDPA's own grouped-query support (CPU with a mask, and
always under ``torch.compile``), expands K and V to every query head (``repeat_kv``) before calling SDPA.
For decode with a static cache that copies the whole cache (4x its size for BitNet 2B-4T's 20 query / 5 KV
heads) in every layer, every token: about 3x the time of the attention itself. On CPU, SDPA's flash kernel
supports grouped queries with a mask (``enable_gqa=True``) and gives the same numbers, so that is what
:func:`attend` calls there (through ``bitnet::decode_attention`` for a decode step, which also skips the
unused tail of a static cache); every other case goes to the configured Transformers attention function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bitnet import modeling_bitnet as hf_bitnet

from .. import ops
from .._autograd import records_autograd

__all__ = ["attend", "apply_rotary"]


def _cpu_gqa_sdpa_applies(module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    return (
        module.config._attn_implementation == "sdpa"
        and query.device.type == "cpu"
        and getattr(module, "num_key_value_groups", 1) > 1
        and query.shape[-1] == key.shape[-1] <= 256
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions", False)
    )


def _decode_attention_applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float
) -> bool:
    """Whether one decode step's attention can go to ``bitnet::decode_attention`` (inference, a 4-D mask)."""
    mask_ok = attention_mask is None or (
        attention_mask.dim() == 4
        and attention_mask.shape[-1] == key.shape[2]
        and (attention_mask.dtype == torch.bool or attention_mask.dtype == query.dtype)
    )
    return dropout == 0.0 and not records_autograd(query, key, value) and mask_ok


def _cpu_gqa_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float,
    is_causal: bool | None = None,
) -> torch.Tensor:
    """Transformers' ``sdpa_attention_forward`` (same causal rule, same static-cache prefill crop) with GQA in SDPA.

    A decode step (one query token, inference) goes to ``bitnet::decode_attention``: the same SDPA, without the
    unused tail of a static cache and with each KV head read once for its whole group of query heads.
    """
    q_length = query.shape[2]
    if q_length == 1 and _decode_attention_applies(query, key, value, attention_mask, dropout):
        return ops.decode_attention(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous()
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_length:  # prefill into an empty static cache: attend to the prompt only
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous()


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' ``apply_rotary_pos_emb``; in eager CPU inference as one ``bitnet::rotary_embedding`` call
    (same bits, one op instead of fourteen); under ``torch.compile`` or with autograd, Transformers' function."""
    if (
        ops.eager_cpu_inference(query, key, cos, sin)
        and query.dim() == 4
        and cos.dim() == 3
        and query.dtype == key.dtype == cos.dtype == sin.dtype
    ):
        return ops.rotary_embedding(query, key, cos, sin)
    return hf_bitnet.apply_rotary_pos_emb(query, key, cos, sin)


def attend(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``module`` (a BitNet attention layer) as ``config._attn_implementation`` says.

    Returns ``(output [batch, q_len, heads, head_dim], weights or None)`` like Transformers' attention functions.
    """
    if _cpu_gqa_sdpa_applies(module, query, key, kwargs):
        return _cpu_gqa_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs.get("is_causal")), None
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, hf_bitnet.eager_attention_forward
    )
    return attention_interface(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
