"""Pure-PyTorch implementations of the ``torch.ops.bitnet`` operators.

They define, operator by operator, the exact numbers every compiled backend must produce (the op
contract is documented in :mod:`bitnet_torch.ops`), and they serve as the fallback implementation when
the C++/CUDA extension cannot be built. Integer accumulations are exact (int32); the float epilogue is
fixed in fp32 as ``float(acc) * (x_scale * w_scale) + bias`` and then cast to the input dtype, so a
backend that follows the same order of operations agrees bit for bit.

These functions compute; they do not validate. The argument checks every backend shares live in
:mod:`bitnet_torch._op_checks` (the fallback registrations in :mod:`bitnet_torch.ops` run them first).

Non-finite inputs follow from the arithmetic (:func:`bitnet_torch.quant.quantize_activation`): ``torch.amax``
and ``torch.clamp`` keep NaN, and torch's float -> int8 conversion turns NaN into 0, so a token holding a NaN
gets the scale NaN and all-zero codes, one holding +-inf (and no NaN) the scale +inf and all-zero codes; its
linear outputs are ``0 * NaN`` or ``0 * inf``, i.e. NaN, as with ``nn.Linear``. A NaN or infinite weight scale
reaches the epilogue unchanged. ``K = 0`` (no features) is an empty dot product: outputs ``0 * scale + bias``.
"""

from __future__ import annotations

import torch

from .packing import VALUES_PER_BYTE, unpack_ternary
from .quant import quantize_activation as _quantize_activation
from .quant import quantize_weight as _quantize_weight

__all__ = [
    "quantize_activation",
    "ternary_matmul",
    "ternary_linear",
    "ternary_linear_group",
    "quantize_pack_weight",
    "int8_linear",
    "float_linear",
    "decode_attention",
    "rms_norm",
    "rotary_embedding",
    "decode_step",
]


def _int_mm_supported(x_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Whether ``torch._int_mm`` is exact for these shapes on this device.

    CUDA wants M > 16 and K, N multiples of 8; on CPU (torch 2.13) K = 1 returns wrong sums for N > 1.
    """
    m, k = x_q.shape
    if x_q.device.type == "cpu":
        return k >= 2
    return x_q.device.type == "cuda" and m > 16 and k % 8 == 0 and w_q.shape[0] % 8 == 0


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` as ``[M, K]`` (``reshape(-1, K)`` is ambiguous for K = 0)."""
    return x.reshape(x.shape[:-1].numel(), x.shape[-1])


def _int8_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``x_q @ w_q.T`` for int8 ``[M, K]`` and ``[N, K]`` on any device."""
    if _int_mm_supported(x_q, w_q):
        return torch._int_mm(x_q.contiguous(), w_q.t())
    # fp64 holds these sums exactly (|sum| <= 127 * K << 2**53) on devices without an int8 GEMM for the shape.
    return (x_q.double() @ w_q.double().t()).to(torch.int32)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp32 per-token scales of ``x`` (SPEC §1); see :func:`bitnet_torch.quantize_activation`."""
    return _quantize_activation(x)


def ternary_matmul(x_q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``[M, N]`` accumulations of int8 ``x_q [M, K]`` times the packed ternary ``[N/4, K]``."""
    w_t = unpack_ternary(packed, validate=False)
    return _int8_matmul(x_q, w_t)


def ternary_linear(
    x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Fused BitLinear inference: quantize ``x`` per token, ternary matmul, rescale, add bias.

    ``weight_scale`` is the multiply-convention scale (mean |W|). Returns ``[..., N]`` in ``x.dtype``.
    """
    lead = x.shape[:-1]
    n = packed.shape[0] * VALUES_PER_BYTE
    x_q, x_scale = _quantize_activation(_tokens(x))
    acc = ternary_matmul(x_q, packed)
    y = acc.float() * (x_scale * weight_scale.float().reshape(()))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)


def ternary_linear_group(
    x: torch.Tensor, packed: list[torch.Tensor], weight_scale: list[torch.Tensor], bias: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """:func:`ternary_linear` of the same input with each weight in turn (the grouped q/k/v, gate/up projection)."""
    if not (len(packed) == len(weight_scale) == len(bias)) or not packed:
        raise ValueError(
            f"ternary_linear_group: need as many weight scales and biases as packed weights (at least one), got "
            f"{len(packed)}, {len(weight_scale)}, {len(bias)}"
        )
    return [ternary_linear(x, p, s, b) for p, s, b in zip(packed, weight_scale, bias)]


def quantize_pack_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean-quantize a float ``[N, K]`` weight and pack it: returns (uint8 ``[N/4, K]``, fp32 0-dim scale)."""
    from .packing import pack_ternary

    w_t, scale = _quantize_weight(w)
    return pack_ternary(w_t), scale


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Per-token int8 activations times an int8 weight ``[N, K]`` with fp32 per-row scales ``[N]``.

    Returns ``[..., N]`` in ``x.dtype``: ``float(acc) * (x_scale * weight_scale[n]) + bias``.
    """
    lead = x.shape[:-1]
    n = weight.shape[0]
    x_q, x_scale = _quantize_activation(_tokens(x))
    acc = _int8_matmul(x_q, weight)
    y = acc.float() * (x_scale * weight_scale.float().reshape(1, n))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed in fp32 (the float ``lm_head``); returns ``[..., N]`` in ``x.dtype``.

    ``x`` is fp32/bf16/fp16 ``[..., K]``, ``weight`` bf16 or fp32 ``[N, K]``, ``bias`` ``[N]`` or None; the op's
    checks (:func:`bitnet_torch._op_checks.check_float_linear`) refuse anything else.
    """
    y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Grouped-query attention of q ``[B, Hq, L, D]`` against k/v ``[B, Hkv, S, D]``: SDPA with ``enable_gqa``."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' ``BitNetRMSNorm``: normalise in fp32, cast back to ``x.dtype``, then apply the gain."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' ``apply_rotary_pos_emb`` itself: cos/sin ``[B|1, L, D]`` broadcast over the heads of q and k."""
    from transformers.models.bitnet.modeling_bitnet import apply_rotary_pos_emb  # the definition; heavy to import

    return apply_rotary_pos_emb(q, k, cos, sin)


# -- decode engine (issue 12) --
def decode_step(
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    logit_rows: torch.Tensor,
    embed: torch.Tensor,
    embed_scale: torch.Tensor | None,
    norms: torch.Tensor,
    packed: list[torch.Tensor],
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
) -> torch.Tensor:
    """One forward step of a packed BitNet model, composed of the other reference ops (the definition of the op).

    Layer by layer over all rows: RMSNorm, the q/k/v projections (:func:`ternary_linear`), rotary
    (:func:`rotary_embedding`), every row's keys/values written into the cache, then each row's attention over its
    slot's positions ``[0, position]`` (SDPA per row), ``attn_sub_norm``, ``o_proj``, the residual, the relu^2 MLP
    with ``ffn_sub_norm``; then the final norm and the head (:func:`int8_linear` or :func:`float_linear`) for the rows
    in ``logit_rows``. Everything is in the model dtype (``k_cache.dtype``), as the eager model computes it. Norms,
    attention and the float head run row by row so that no row's numbers depend on the others (batch invariance).
    """
    dtype = k_cache.dtype
    n_layers, head_dim = k_cache.shape[0], k_cache.shape[4]
    vocab, hidden = embed.shape
    rows = token_ids.shape[0]
    intermediate = packed[4].shape[0] * VALUES_PER_BYTE if n_layers else 4
    per_layer = 3 * hidden + intermediate

    def gains(layer: int, which: int, n: int) -> torch.Tensor:
        start = layer * per_layer + min(which, 3) * hidden
        return norms[start:start + n].to(dtype)  # exact: the gains are values of the model dtype

    def norm_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([rms_norm(x[r:r + 1], weight, eps) for r in range(x.shape[0])]) if x.shape[0] else x

    def project(x: torch.Tensor, layer: int, which: int) -> torch.Tensor:
        return ternary_linear(x, packed[layer * 7 + which], weight_scales[layer * 7 + which], None)

    if embed_scale is not None:
        h = (embed[token_ids].float() * embed_scale[token_ids, None]).to(dtype)
    else:
        h = embed[token_ids].to(dtype)
    cos = rope_cos[positions].to(dtype)[:, None, :]  # [R, 1, D]: each row its own batch entry of length 1
    sin = rope_sin[positions].to(dtype)[:, None, :]
    group = num_heads // num_kv_heads
    for layer in range(n_layers):
        x = norm_rows(h, gains(layer, 0, hidden))
        q, k, v = project(x, layer, 0), project(x, layer, 1), project(x, layer, 2)
        q = q.view(rows, num_heads, 1, head_dim)
        k = k.view(rows, num_kv_heads, 1, head_dim)
        q, k = rotary_embedding(q, k, cos, sin)
        k_cache[layer, slots, :, positions] = k[:, :, 0]
        v_cache[layer, slots, :, positions] = v.view(rows, num_kv_heads, head_dim)
        attn = []
        for r in range(rows):
            length = int(positions[r]) + 1
            keys = k_cache[layer, slots[r], :, :length][None]
            values = v_cache[layer, slots[r], :, :length][None]
            out = torch.nn.functional.scaled_dot_product_attention(
                q[r:r + 1], keys, values, scale=attn_scale, enable_gqa=group > 1
            )
            attn.append(out.reshape(1, hidden))
        a = norm_rows(torch.cat(attn), gains(layer, 1, hidden))
        h = h + project(a, layer, 3)
        x = norm_rows(h, gains(layer, 2, hidden))
        gate, up = project(x, layer, 4), project(x, layer, 5)
        m = norm_rows(torch.square(torch.relu(gate)) * up, gains(layer, 3, intermediate))
        h = h + project(m, layer, 6)
    final = gains(n_layers, 0, hidden)
    logits = []
    for r in logit_rows.tolist():
        x = rms_norm(h[r:r + 1], final, eps)
        if head_scale is not None:
            logits.append(int8_linear(x, head, head_scale, None))
        else:
            logits.append(float_linear(x, head, None))
    if not logits:
        return torch.empty(0, vocab, dtype=torch.float32, device=token_ids.device)
    return torch.cat(logits).float()
