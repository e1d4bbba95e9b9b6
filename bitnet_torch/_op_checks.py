"""The argument checks of the ``torch.ops.bitnet`` operators: one function per op, shared by every backend.

Each ``check_<op>`` raises on exactly the inputs the compiled kernels refuse (``csrc/cpu/ops_cpu*.cpp`` and
``csrc/cuda/ops_cuda.cpp`` mirror these conditions in C++ for direct ``torch.ops`` calls), with the same kind of
error and the same message text (up to how C++ prints shapes and dtypes):

* ``TypeError`` -- a tensor of the wrong dtype (e.g. int32 ``x`` to ``rms_norm``, an int ``bias``, uint8 ``x_q``);
* ``ValueError`` -- wrong ranks or sizes (odd ``head_dim`` to ``rotary_embedding``, k/v of different shapes,
  zero KV heads, a mask of the wrong batch/head size, ``K >= 2**17`` for the integer linears, ...).

``ops.py`` registers the pure-PyTorch reference (the fallback without the extension, and the CUDA
implementation of the reference-only ops) behind these checks, so ``BITNET_TORCH_NO_EXT=1`` accepts and refuses
the same inputs as the compiled ops. The numbers themselves stay in :mod:`bitnet_torch._reference_ops`, whose
functions do not check (the RMSNorm module uses ``_reference_ops.rms_norm`` as its differentiable composite,
for any float dtype).

Edge cases decided once for all backends: ``K = 0`` is valid (an empty dot product: a linear returns
``0 * scale + bias``, i.e. the bias or zeros; ``quantize_activation`` returns no codes and the scale
``1e-5 / 127``); an empty weight is refused by ``quantize_pack_weight`` (mean |W| is undefined). Device checks
are not repeated here: the reference runs on whatever device its inputs are on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "MAX_K",
    "check_quantize_activation",
    "check_ternary_matmul",
    "check_ternary_linear",
    "check_ternary_linear_group",
    "check_quantize_pack_weight",
    "check_int8_linear",
    "check_float_linear",
    "check_decode_attention",
    "check_rms_norm",
    "check_rotary_embedding",
    "check_decode_step",
]

#: Exclusive bound on K of every integer linear (``ternary_*``, ``int8_linear``): the exact int32 accumulators
#: hold ``|sum| <= 128 * 128 * K`` (and the AVX-512 ternary kernels ``64 * 2 * 128 * K``) only for ``K < 2**17``
#: (``csrc/cpu/kernel_api.h`` kMaxTernaryK / kMaxInt8K, ``csrc/cuda/ops_cuda.cpp`` kMaxK).
MAX_K: int = 1 << 17

#: What the quantizing ops accept as a float input (float64 is computed in fp32).
_QUANT_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: What the fused inference ops (rms_norm, rotary_embedding) accept.
_FUSED_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _float(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in _QUANT_FLOATS:
        raise TypeError(
            f"bitnet::{op}: {name} must be a floating-point tensor (float32, bfloat16 or float16), got dtype {t.dtype}"
        )


def _feature_input(x: torch.Tensor, op: str) -> int:
    """Checks of a float input ``[..., K]``; returns K."""
    _float(x, op, "x")
    if x.dim() < 1:
        raise ValueError(f"bitnet::{op}: x must have at least one dimension (the feature dimension)")
    return x.shape[-1]


def _bounded_k(k: int, op: str) -> None:
    if k >= MAX_K:
        raise ValueError(f"bitnet::{op}: K={k} exceeds the supported maximum {MAX_K - 1}")


def _bias(bias: torch.Tensor | None, n: int, op: str, index: str = "") -> None:
    if bias is None:
        return
    _float(bias, op, f"bias{index}")
    if bias.dim() != 1 or bias.shape[0] != n:
        raise ValueError(f"bitnet::{op}: bias{index} must have shape [{n}], got {_shape(bias)}")


def _packed(packed: torch.Tensor, k: int, op: str, index: str = "") -> None:
    if packed.dtype != torch.uint8:
        raise TypeError(f"bitnet::{op}: packed{index} must be uint8, got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"bitnet::{op}: packed{index} must be 2-D [N/4, K], got shape {_shape(packed)}")
    if packed.shape[1] != k:
        raise ValueError(f"bitnet::{op}: K of x ({k}) and packed{index} ({packed.shape[1]}) differ")


def _ternary_member(
    op: str, k: int, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, index: str = ""
) -> None:
    _packed(packed, k, op, index)
    _float(weight_scale, op, f"weight_scale{index}")
    if weight_scale.numel() != 1:
        raise ValueError(f"bitnet::{op}: weight_scale{index} must hold one element, got shape {_shape(weight_scale)}")
    _bias(bias, 4 * packed.shape[0], op, index)


def check_quantize_activation(x: torch.Tensor) -> None:
    """``x``: float ``[..., K]`` with at least one dimension."""
    _feature_input(x, "quantize_activation")


def check_ternary_matmul(x_q: torch.Tensor, packed: torch.Tensor) -> None:
    """``x_q``: int8 ``[M, K]``; ``packed``: uint8 ``[N/4, K]``; ``K < MAX_K``."""
    op = "ternary_matmul"
    if x_q.dtype != torch.int8:
        raise TypeError(f"bitnet::{op}: x_q must be int8, got {x_q.dtype}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"bitnet::{op}: packed must be uint8, got {packed.dtype}")
    if x_q.dim() != 2:
        raise ValueError(f"bitnet::{op}: x_q must be 2-D [M, K], got shape {_shape(x_q)}")
    if packed.dim() != 2:
        raise ValueError(f"bitnet::{op}: packed must be 2-D [N/4, K], got shape {_shape(packed)}")
    if packed.shape[1] != x_q.shape[1]:
        raise ValueError(f"bitnet::{op}: K of x_q ({x_q.shape[1]}) and packed ({packed.shape[1]}) differ")
    _bounded_k(x_q.shape[1], op)


def check_ternary_linear(
    x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """``x`` float ``[..., K]``, ``packed`` uint8 ``[N/4, K]``, one float ``weight_scale``, float ``bias [N]``."""
    op = "ternary_linear"
    k = _feature_input(x, op)
    _bounded_k(k, op)
    _ternary_member(op, k, packed, weight_scale, bias)


def check_ternary_linear_group(
    x: torch.Tensor,
    packed: Sequence[torch.Tensor],
    weight_scale: Sequence[torch.Tensor],
    bias: Sequence[torch.Tensor | None],
) -> None:
    """:func:`check_ternary_linear` for every member, and as many scales and biases as weights (at least one)."""
    op = "ternary_linear_group"
    k = _feature_input(x, op)
    _bounded_k(k, op)
    g = len(packed)
    if g < 1:
        raise ValueError(f"bitnet::{op}: packed must hold at least one weight")
    if len(weight_scale) != g:
        raise ValueError(f"bitnet::{op}: got {g} packed weights but {len(weight_scale)} weight scales")
    if len(bias) != g:
        raise ValueError(f"bitnet::{op}: got {g} packed weights but {len(bias)} biases (use None)")
    for i, (p, s, b) in enumerate(zip(packed, weight_scale, bias)):
        _ternary_member(op, k, p, s, b, f"[{i}]")


def check_quantize_pack_weight(w: torch.Tensor) -> None:
    """``w``: float ``[N, K]``, N a multiple of 4, not empty."""
    op = "quantize_pack_weight"
    _float(w, op, "w")
    if w.dim() != 2:
        raise ValueError(f"bitnet::{op}: w must be 2-D [N, K], got shape {_shape(w)}")
    if w.shape[0] % 4 != 0:
        raise ValueError(
            f"bitnet::{op}: out_features N={w.shape[0]} is not a multiple of 4: the packed layout (SPEC §3) "
            "stores 4 output rows per byte"
        )
    if w.numel() == 0:
        raise ValueError(f"bitnet::{op}: cannot quantize an empty weight (mean |W| is undefined)")


def check_int8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """``x`` float ``[..., K]``, ``weight`` int8 ``[N, K]`` with ``K < MAX_K``, float ``weight_scale [N]``, ``bias [N]``."""
    op = "int8_linear"
    k = _feature_input(x, op)
    if weight.dtype != torch.int8:
        raise TypeError(f"bitnet::{op}: weight must be int8, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"bitnet::{op}: weight must be 2-D [N, K], got shape {_shape(weight)}")
    if weight.shape[1] != k:
        raise ValueError(f"bitnet::{op}: K of x ({k}) and weight ({weight.shape[1]}) differ")
    _bounded_k(k, op)
    n = weight.shape[0]
    _float(weight_scale, op, "weight_scale")
    if weight_scale.numel() != n:
        raise ValueError(
            f"bitnet::{op}: weight_scale must hold one scale per output row ({n}), got shape {_shape(weight_scale)}"
        )
    _bias(bias, n, op)


def check_float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``x`` float ``[..., K]``, ``weight`` bf16/fp32 ``[N, K]``, float ``bias [N]``."""
    op = "float_linear"
    _float(x, op, "x")
    if weight.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"bitnet::{op}: weight must be bfloat16 or float32, got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"bitnet::{op}: weight must be 2-D [N, K], got shape {_shape(weight)}")
    if x.dim() < 1:
        raise ValueError(f"bitnet::{op}: x must have at least one dimension [..., K]")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"bitnet::{op}: K of x and weight differ (x has shape {_shape(x)}, weight {_shape(weight)})"
        )
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError(f"bitnet::{op}: bias must be floating-point, got dtype {bias.dtype}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bitnet::{op}: bias must have shape [{weight.shape[0]}], got {_shape(bias)}")


def check_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float = 1.0
) -> None:
    """q ``[B, Hq, L, D]``, k/v ``[B, Hkv, S, D]`` of one float dtype (``Hkv > 0`` divides ``Hq``); mask bool or
    q's dtype, ``[B|1, Hq|1, L|1, S]``."""
    op = "bitnet::decode_attention"
    if not q.is_floating_point():
        raise TypeError(f"{op}: q must be floating-point, got dtype {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op}: q, k and v must be 4-D [batch, heads, length, head_dim], got shapes {_shape(q)}, {_shape(k)} "
            f"and {_shape(v)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {_shape(k)} and {_shape(v)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q and k differ in batch or head_dim (q {_shape(q)}, k {_shape(k)})")
    if k.shape[1] <= 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{op}: the query heads must be a multiple of the key/value heads, got {q.shape[1]} and {k.shape[1]}"
        )
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise TypeError(
            f"{op}: attn_mask must be bool (True = attend) or additive in q's dtype {q.dtype}, got dtype "
            f"{attn_mask.dtype}"
        )
    b, hq, length = q.shape[0], q.shape[1], q.shape[2]
    m = attn_mask.shape
    if (
        attn_mask.dim() != 4
        or m[3] != k.shape[2]
        or m[0] not in (1, b)
        or m[1] not in (1, hq)
        or m[2] not in (1, length)
    ):
        raise ValueError(
            f"{op}: attn_mask must be 4-D [batch or 1, heads or 1, q_len or 1, kv_len] with batch = {b}, heads = {hq}, "
            f"q_len = {length}, kv_len = {k.shape[2]}, got shape {_shape(attn_mask)}"
        )


def check_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 0.0) -> None:
    """``x`` fp32/bf16/fp16 ``[..., hidden]``, ``weight`` fp32/bf16/fp16 ``[hidden]``."""
    op = "bitnet::rms_norm"
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in _FUSED_FLOATS:
            raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got dtype {t.dtype}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must have shape [hidden] matching the last dimension of x, got x {_shape(x)} and "
            f"weight {_shape(weight)}"
        )


def check_rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """q/k ``[B, H, L, D]`` (D even), cos/sin ``[B|1, L, D]``, all of one fp32/bf16/fp16 dtype."""
    op = "bitnet::rotary_embedding"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: q, k, cos and sin must share a dtype, got {name} {t.dtype} and q {q.dtype}")
    if q.dtype not in _FUSED_FLOATS:
        raise TypeError(f"{op}: q must be float32, bfloat16 or float16, got dtype {q.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be 4-D [batch, heads, length, head_dim], got {_shape(q)} and {_shape(k)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: q and k differ in batch, length or head_dim: {_shape(q)} and {_shape(k)}")
    if q.shape[3] % 2 != 0:
        raise ValueError(f"{op}: head_dim must be even, got {q.shape[3]}")
    if (
        cos.shape != sin.shape
        or cos.dim() != 3
        or cos.shape[0] not in (q.shape[0], 1)
        or cos.shape[1] != q.shape[2]
        or cos.shape[2] != q.shape[3]
    ):
        raise ValueError(
            f"{op}: cos and sin must be [batch or 1, length, head_dim] = [{q.shape[0]}, {q.shape[2]}, {q.shape[3]}], "
            f"got {_shape(cos)} and {_shape(sin)}"
        )


def _check_step_tensor(t: torch.Tensor, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
    """One tensor argument of ``decode_step``: its dtype (``TypeError``), then its shape (``ValueError``)."""
    op = "bitnet::decode_step"
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if list(t.shape) != list(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {_shape(t)}")


def _check_step_range(t: torch.Tensor, name: str, bound: int, what: str) -> None:
    """Every value of an int64 vector in ``[0, bound)``; the first one that is not is named."""
    bad = ((t < 0) | (t >= bound)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"bitnet::decode_step: {name}[{i}] = {int(t[i])} is out of range ({what} {bound})")


def check_decode_step(
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    logit_rows: torch.Tensor,
    embed: torch.Tensor,
    embed_scale: torch.Tensor | None,
    norms: torch.Tensor,
    packed: Sequence[torch.Tensor],
    weight_scales: torch.Tensor,
    rope_cos: torch.Tensor,
    rope_sin: torch.Tensor,
    head: torch.Tensor,
    head_scale: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    attn_scale: float,
) -> None:
    """The model (cache ``[layers, slots, kv_heads, positions, head_dim]`` in the model dtype, 7 packed weights a
    layer of the shapes the cache and the embedding imply, fp32 norms / scales / rotary tables, a float or int8
    embedding and head) and the step (1-D int64 ``token_ids`` / ``positions`` / ``slots`` in range, one row per
    cache entry, ``logit_rows`` indexing the rows). Mirrors ``csrc/cpu/decode_engine_aten.cpp``."""
    op = "bitnet::decode_step"
    if k_cache.dim() != 5:
        raise ValueError(f"{op}: k_cache must be 5-D [layers, slots, kv_heads, positions, head_dim], got {_shape(k_cache)}")
    if k_cache.dtype not in _FUSED_FLOATS:
        raise TypeError(f"{op}: k_cache must be float32, bfloat16 or float16 (the model dtype), got {k_cache.dtype}")
    layers, n_slots, kv_heads, n_positions, head_dim = k_cache.shape
    if not (num_kv_heads == kv_heads and num_heads > 0 and num_kv_heads > 0 and num_heads % num_kv_heads == 0):
        raise ValueError(f"{op}: num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads}) "
                         f"and num_kv_heads must match k_cache ({kv_heads})")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even, got {head_dim}")
    if embed.dim() != 2:
        raise ValueError(f"{op}: embed must be 2-D [vocab, hidden], got {_shape(embed)}")
    vocab, hidden = embed.shape
    if hidden != num_heads * head_dim:
        raise ValueError(f"{op}: hidden ({hidden}) must equal num_heads * head_dim ({num_heads * head_dim})")
    if len(packed) != 7 * layers:
        raise ValueError(f"{op}: packed must hold 7 weights per layer ({7 * layers}), got {len(packed)}")
    if layers and packed[4].dim() != 2:
        raise ValueError(f"{op}: packed[4] (gate_proj) must be 2-D")
    intermediate = packed[4].shape[0] * 4 if layers else 4
    if hidden % 4:
        raise ValueError(f"{op}: hidden must be a multiple of 4, got {hidden}")
    if hidden >= MAX_K or intermediate >= MAX_K:
        raise ValueError(f"{op}: hidden / intermediate too large")
    _check_step_tensor(v_cache, "v_cache", k_cache.dtype, k_cache.shape)
    q_rows, kv_rows = num_heads * head_dim // 4, num_kv_heads * head_dim // 4
    shapes = [(q_rows, hidden), (kv_rows, hidden), (kv_rows, hidden), (hidden // 4, num_heads * head_dim),
              (intermediate // 4, hidden), (intermediate // 4, hidden), (hidden // 4, intermediate)]
    for i, weight in enumerate(packed):
        _check_step_tensor(weight, f"packed[{i}]", torch.uint8, shapes[i % 7])
    _check_step_tensor(weight_scales, "weight_scales", torch.float32, [7 * layers])
    _check_step_tensor(norms, "norms", torch.float32, [layers * (3 * hidden + intermediate) + hidden])
    _check_step_tensor(rope_cos, "rope_cos", torch.float32, [n_positions, head_dim])
    _check_step_tensor(rope_sin, "rope_sin", torch.float32, [n_positions, head_dim])
    if embed_scale is not None:
        _check_step_tensor(embed, "embed", torch.int8, [vocab, hidden])
        _check_step_tensor(embed_scale, "embed_scale", torch.float32, [vocab])
    elif embed.dtype not in _FUSED_FLOATS:
        raise TypeError(f"{op}: embed must be float32, bfloat16 or float16 (or int8 with embed_scale), got {embed.dtype}")
    if head_scale is not None:
        _check_step_tensor(head, "head", torch.int8, [vocab, hidden])
        _check_step_tensor(head_scale, "head_scale", torch.float32, [vocab])
    else:
        if head.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"{op}: head must be bfloat16 or float32 (or int8 with head_scale), got {head.dtype}")
        _check_step_tensor(head, "head", head.dtype, [vocab, hidden])
    if token_ids.dim() != 1 or token_ids.shape[0] < 1:
        raise ValueError(f"{op}: token_ids must be 1-D with at least one token, got shape {_shape(token_ids)}")
    rows = token_ids.shape[0]
    for name, t in (("token_ids", token_ids), ("positions", positions), ("slots", slots)):
        _check_step_tensor(t, name, torch.int64, [rows])
    if logit_rows.dim() != 1:
        raise ValueError(f"{op}: logit_rows must be 1-D, got shape {_shape(logit_rows)}")
    _check_step_tensor(logit_rows, "logit_rows", torch.int64, [logit_rows.shape[0]])
    _check_step_range(token_ids, "token_ids", vocab, "vocabulary size")
    _check_step_range(positions, "positions", n_positions, "cache positions")
    _check_step_range(slots, "slots", n_slots, "cache slots")
    _check_step_range(logit_rows, "logit_rows", rows, "rows")
    if torch.unique(slots * n_positions + positions).numel() != rows:
        raise ValueError(f"{op}: two rows write the same (slot, position) of the cache")
