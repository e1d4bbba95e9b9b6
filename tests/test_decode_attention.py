"""bitnet::decode_attention: grouped-query SDPA of a decode step against a KV cache.

The op must give what ``F.scaled_dot_product_attention(..., enable_gqa=True)`` gives, within float rounding:
each case is compared with a float64 evaluation of the same attention, and the op's error must not exceed
SDPA's own error by more than a rounding step. It must also really skip the unused tail of a static cache
(checked with NaN in that tail, which plain SDPA would spread through 0 * NaN).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_torch import ops

#: The NaN-tail and error-message checks are about the compiled CPU kernel (the fallback is plain SDPA).
needs_kernel = pytest.mark.skipif(not ops.extension_loaded(), reason=f"compiled kernels unavailable: {ops.extension_error()}")

ROUNDING = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _reference64(q, k, v, mask, scale):
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    return F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask64, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _assert_as_accurate_as_sdpa(q, k, v, mask, scale=0.125):
    ours = ops.decode_attention(q, k, v, mask, scale)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    exact = _reference64(q, k, v, mask, scale)
    assert ours.shape == sdpa.shape and ours.dtype == q.dtype
    our_error = (ours.double() - exact).abs().max().item()
    sdpa_error = (sdpa.double() - exact).abs().max().item()
    assert our_error <= sdpa_error + ROUNDING[q.dtype], (our_error, sdpa_error)


def _mask(kind: str, batch: int, q_len: int, length: int, dtype: torch.dtype) -> torch.Tensor | None:
    """None, or a [batch, 1, q_len, length] mask: a static cache filled to a third, optionally left-padded."""
    if kind == "none":
        return None
    visible = torch.zeros(batch, 1, q_len, length, dtype=torch.bool)
    visible[..., : max(1, length // 3)] = True
    if kind.startswith("left"):
        visible[0, ..., :2] = False
    if kind.endswith("additive"):
        return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))
    return visible


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(20, 5), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("length", [1, 7, 192, 700])
@pytest.mark.parametrize("mask_kind", ["none", "tail", "left", "tail-additive", "left-additive"])
def test_decode_step_matches_sdpa(dtype, heads, length, mask_kind):
    torch.manual_seed(length)
    hq, hkv = heads
    q = torch.randn(3, hq, 1, 64, dtype=dtype)
    k, v = torch.randn(3, hkv, length, 64, dtype=dtype), torch.randn(3, hkv, length, 64, dtype=dtype)
    _assert_as_accurate_as_sdpa(q, k, v, _mask(mask_kind, 3, 1, length, dtype))


@pytest.mark.parametrize("q_len", [2, 5])
def test_several_query_tokens_match_sdpa(q_len):
    torch.manual_seed(q_len)
    q = torch.randn(2, 8, q_len, 32)
    k, v = torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32)
    _assert_as_accurate_as_sdpa(q, k, v, _mask("left", 2, q_len, 40, torch.float32))


def test_per_head_mask_and_transposed_query():
    torch.manual_seed(1)
    q = torch.randn(2, 1, 8, 16).transpose(1, 2)  # [B, H, 1, D] as a view of [B, 1, H, D], like the model's
    k, v = torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    mask = torch.rand(2, 8, 1, 12) > 0.3
    mask[..., 0] = True
    _assert_as_accurate_as_sdpa(q, k, v, mask)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 4),
    head_dim=st.sampled_from([8, 17, 64, 128]),
    length=st.integers(1, 300),
    visible=st.floats(0.01, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_random_shapes_match_sdpa(batch, kv_heads, group, head_dim, length, visible, dtype):
    gen = torch.Generator().manual_seed(length * 31 + head_dim)
    q = torch.randn(batch, kv_heads * group, 1, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype)
    mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool)
    mask[..., : max(1, int(length * visible))] = True
    _assert_as_accurate_as_sdpa(q, k, v, mask, scale=head_dim**-0.5)


@needs_kernel
def test_the_unused_tail_of_a_static_cache_is_never_read():
    """NaN past the last visible position: SDPA spreads it (0 * NaN); the op never touches those positions."""
    torch.manual_seed(0)
    q = torch.randn(2, 8, 1, 32, dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 64, 32, dtype=torch.bfloat16), torch.randn(2, 2, 64, 32, dtype=torch.bfloat16)
    mask = torch.zeros(2, 1, 1, 64, dtype=torch.bool)
    mask[0, ..., :20] = True
    mask[1, ..., 3:25] = True  # left-padded row, visible up to 25
    k[:, :, 25:], v[:, :, 25:] = float("nan"), float("nan")
    out = ops.decode_attention(q, k, v, mask, 0.2)
    assert torch.isfinite(out).all()
    trimmed = ops.decode_attention(q, k[:, :, :25].clone(), v[:, :, :25].clone(), mask[..., :25].clone(), 0.2)
    assert torch.equal(out, trimmed)


def test_a_fully_masked_step_follows_sdpa():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(ops.decode_attention(q, k, v, mask, 0.3), expected, equal_nan=True)


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16), None, 0.25),
        (
            torch.randn(1, 6, 1, 8, dtype=torch.bfloat16),
            torch.randn(1, 3, 20, 8, dtype=torch.bfloat16),
            torch.randn(1, 3, 20, 8, dtype=torch.bfloat16),
            torch.arange(20).view(1, 1, 1, 20) < 11,
            0.5,
        ),
        (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.zeros(1, 1, 3, 4), 1.0),
    ],
    ids=["no-mask", "static-cache-bf16", "prefill-additive"],
)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.bitnet.decode_attention.default, args)


@needs_kernel
def test_bad_inputs_raise_clear_errors():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        ops.decode_attention(torch.randn(1, 3, 1, 8), k, v, None, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.decode_attention(q, k.half(), v, None, 1.0)
    with pytest.raises(ValueError, match="must be 4-D"):
        ops.decode_attention(q[0], k, v, None, 1.0)
    with pytest.raises(ValueError, match="kv_len = 5"):
        ops.decode_attention(q, k, v, torch.ones(1, 1, 1, 4, dtype=torch.bool), 1.0)
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        ops.decode_attention(q, k, v, torch.ones(1, 1, 1, 5, dtype=torch.int64), 1.0)
