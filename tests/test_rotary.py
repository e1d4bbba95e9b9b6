"""bitnet::rotary_embedding: Transformers' apply_rotary_pos_emb in one pass, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.bitnet.modeling_bitnet import apply_rotary_pos_emb

from bitnet_torch import ops
from bitnet_torch.models.attention import apply_rotary

needs_kernel = pytest.mark.skipif(not ops.extension_loaded(), reason=f"compiled kernels unavailable: {ops.extension_error()}")


def _inputs(batch, q_heads, kv_heads, length, head_dim, dtype, cos_batch=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, q_heads, head_dim, generator=gen).to(dtype).transpose(1, 2)  # the model's layout
    k = torch.randn(batch, length, kv_heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
    angles = torch.rand(cos_batch or batch, length, head_dim // 2, generator=gen) * 100
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 20, 5, 1, 128), (2, 4, 2, 7, 16), (3, 2, 2, 1, 2), (1, 4, 1, 0, 8)])
@pytest.mark.parametrize("cos_batch", [None, 1])
def test_equals_transformers_bit_for_bit(dtype, shape, cos_batch):
    q, k, cos, sin = _inputs(*shape, dtype, cos_batch=cos_batch)
    ours = ops.rotary_embedding(q, k, cos, sin)
    reference = apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype and torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 4), length=st.integers(0, 9),
    half_dim=st.integers(1, 70), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_random_shapes_equal_transformers(batch, kv_heads, group, length, half_dim, dtype):
    q, k, cos, sin = _inputs(batch, kv_heads * group, kv_heads, length, 2 * half_dim, dtype, seed=length + half_dim)
    for a, b in zip(ops.rotary_embedding(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)


def test_model_helper_uses_transformers_with_autograd():
    q, k, cos, sin = _inputs(1, 4, 2, 3, 8, torch.float32)
    q.requires_grad_(True)
    out_q, _ = apply_rotary(q, k, cos, sin)
    assert out_q.grad_fn is not None  # Transformers' differentiable composite
    out_q.sum().backward()
    assert q.grad is not None
    with torch.inference_mode():
        fused = apply_rotary(q.detach(), k, cos, sin)
    assert torch.equal(fused[0], out_q.detach())


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)),
        tuple(_inputs(1, 6, 3, 1, 16, torch.bfloat16, cos_batch=1)),
    ],
    ids=["fp32", "bf16-decode"],
)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.bitnet.rotary_embedding.default, args)


@needs_kernel
def test_bad_inputs_raise_clear_errors():
    q, k, cos, sin = _inputs(1, 4, 2, 3, 8, torch.float32)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.rotary_embedding(q, k, cos.double(), sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        ops.rotary_embedding(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="cos and sin must be"):
        ops.rotary_embedding(q, k, cos[:, :2], sin[:, :2])
