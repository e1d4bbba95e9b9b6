"""bitnet::rms_norm and the RMSNorm module's use of it.

The op does the arithmetic of Transformers' ``BitNetRMSNorm`` (the reference, ``_reference_ops.rms_norm``) in
one pass; only the order of the fp32 sum of squares differs, so results must equal the reference up to one
unit in the last place of the output dtype (and exactly, as it happens, in nearly every element).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_torch import _reference_ops, ops
from bitnet_torch.nn.rmsnorm import RMSNorm

needs_kernel = pytest.mark.skipif(not ops.extension_loaded(), reason=f"compiled kernels unavailable: {ops.extension_error()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _assert_within_one_ulp(ours: torch.Tensor, reference: torch.Tensor, x_dtype: torch.dtype) -> None:
    """Equal up to a last-place difference of the normalised value (rounded to x's dtype before the gain)."""
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    if reference.numel() == 0:
        return
    eps = torch.finfo(x_dtype).eps
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2 * eps, atol=4 * eps)
    # And the differences are rare where x is 16-bit: the arithmetic is the same but for the order of one fp32
    # sum, which the rounding to 16 bits almost always hides. (In fp32 a row whose rsqrt differs in the last
    # place differs in every element -- hypothesis found a single such row of 7 -- so there the bound above is
    # the whole check.)
    if x_dtype != torch.float32:
        assert (ours != reference).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
@pytest.mark.parametrize("shape", [(1, 2560), (3, 7), (2, 5, 6912), (4, 1), (0, 16)])
def test_matches_the_transformers_arithmetic(dtype, weight_dtype, shape):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, dtype=dtype) * 3
    weight = (torch.rand(shape[-1]) + 0.5).to(dtype if weight_dtype == "same" else weight_dtype)
    _assert_within_one_ulp(ops.rms_norm(x, weight, 1e-6), _reference_ops.rms_norm(x, weight, 1e-6), dtype)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 40), hidden=st.integers(1, 3000), scale=st.floats(1e-3, 1e3), dtype=st.sampled_from(DTYPES))
def test_random_shapes_and_scales(rows, hidden, scale, dtype):
    gen = torch.Generator().manual_seed(rows * 7919 + hidden)
    x = (torch.randn(rows, hidden, generator=gen) * scale).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    _assert_within_one_ulp(ops.rms_norm(x, weight, 1e-5), _reference_ops.rms_norm(x, weight, 1e-5), dtype)


def test_non_contiguous_input_and_zero_rows():
    x = torch.randn(64, 6, dtype=torch.bfloat16).t()  # [6, 64], transposed view
    x[2] = 0.0  # an all-zero row normalises to 0 (eps keeps it finite)
    weight = torch.rand(64, dtype=torch.bfloat16)
    out = ops.rms_norm(x, weight, 1e-6)
    _assert_within_one_ulp(out, _reference_ops.rms_norm(x, weight, 1e-6), torch.bfloat16)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(3, 40), torch.rand(40), 1e-6),
        (torch.randn(2, 1, 16, dtype=torch.bfloat16), torch.rand(16, dtype=torch.bfloat16), 1e-5),
        (torch.randn(2, 16, dtype=torch.float16), torch.rand(16), 1e-6),
    ],
    ids=["fp32", "bf16-3d", "fp16-fp32-weight"],
)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.bitnet.rms_norm.default, args)


@needs_kernel
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        ops.rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8), 1e-6)


@needs_kernel
def test_module_uses_the_op_for_eager_inference_only(monkeypatch):
    calls = []
    real = ops.rms_norm
    monkeypatch.setattr(ops, "rms_norm", lambda *a: calls.append(1) or real(*a))
    norm = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 32)

    with torch.inference_mode():
        inference = norm(x)
    assert calls == [1]

    training = norm(x.requires_grad_(True))  # the gain needs a gradient: the composite, with autograd
    assert calls == [1] and training.grad_fn is not None
    training.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    torch.testing.assert_close(inference, training.detach(), rtol=2e-6, atol=1e-6)

    torch._dynamo.reset()
    with torch.inference_mode():
        compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")(x.detach())
    assert calls == [1]  # under torch.compile the composite is traced (Inductor fuses it with its neighbours)
    torch.testing.assert_close(compiled, inference, rtol=2e-6, atol=1e-6)
