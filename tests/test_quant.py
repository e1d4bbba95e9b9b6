"""The executable spec (quantize_weight / quantize_activation) against the literal SPEC §1 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitnet_torch
from spec_reference import ref_quantize_activation, ref_quantize_weight

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(4, 8), (12, 100), (1, 1), (256, 33)])
def test_quantize_weight_matches_spec(dtype, shape):
    w = (torch.randn(shape) * 0.05).to(dtype)
    w_t, scale = bitnet_torch.quantize_weight(w)
    ref_t, ref_scale = ref_quantize_weight(w)
    assert w_t.dtype == torch.int8 and w_t.shape == w.shape
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert torch.equal(w_t, ref_t), "ternary codes differ from SPEC §1"
    assert torch.equal(scale, ref_scale)
    assert set(w_t.unique().tolist()) <= {-1, 0, 1}


def test_quantize_weight_rounds_half_to_even():
    # mean|w| = 1 exactly; w/scale = 0.5 rounds to 0 (half to even), -1.5 rounds to -2 and clamps to -1.
    w = torch.tensor([[0.5, -1.5, 1.0, 1.0]])
    w_t, scale = bitnet_torch.quantize_weight(w)
    assert scale.item() == 1.0
    assert w_t.tolist() == [[0, -1, 1, 1]]


def test_quantize_weight_all_zero_uses_eps_scale():
    w_t, scale = bitnet_torch.quantize_weight(torch.zeros(8, 8))
    assert torch.all(w_t == 0)
    assert scale.item() == pytest.approx(1e-5)


def test_quantize_weight_reconstructs_approximately():
    w = torch.randn(64, 64)
    w_t, scale = bitnet_torch.quantize_weight(w)
    err = (w - w_t.float() * scale).abs().mean() / w.abs().mean()
    assert err < 0.6, f"ternary reconstruction error {err:.3f} is implausibly large"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 64), (2, 5, 100), (2, 3, 4, 17)])
def test_quantize_activation_matches_spec(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    x_q, scale = bitnet_torch.quantize_activation(x)
    ref_q, ref_scale = ref_quantize_activation(x)
    assert x_q.dtype == torch.int8 and x_q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1] + (1,)
    assert torch.equal(x_q, ref_q), "int8 codes differ from SPEC §1"
    assert torch.equal(scale, ref_scale)


def test_quantize_activation_all_zero_token_gives_zero_codes_not_nan():
    x = torch.randn(3, 16)
    x[1] = 0
    x_q, scale = bitnet_torch.quantize_activation(x)
    assert torch.all(x_q[1] == 0)
    assert torch.isfinite(scale).all()
    assert scale[1].item() == pytest.approx(1e-5 / 127)


def test_quantize_activation_maps_absmax_to_127():
    x = torch.tensor([[0.1, -2.0, 1.0]])
    x_q, scale = bitnet_torch.quantize_activation(x)
    assert x_q.tolist() == [[6, -127, 64]]
    assert torch.allclose(x_q.float() * scale, x, atol=float(scale) / 2 + 1e-7)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    k=st.integers(1, 70),
    scale=st.sampled_from([1e-7, 1e-3, 1.0, 1e3]),
    dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_quantize_activation_property(rows, k, scale, dtype):
    x = (torch.randn(rows, k) * scale).to(dtype)
    x_q, s = bitnet_torch.quantize_activation(x)
    ref_q, ref_s = ref_quantize_activation(x)
    assert torch.equal(x_q, ref_q)
    assert torch.equal(s, ref_s)


def test_quantize_rejects_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        bitnet_torch.quantize_activation(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="floating-point"):
        bitnet_torch.quantize_weight(torch.ones(3, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="at least one dimension"):
        bitnet_torch.quantize_activation(torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty"):
        bitnet_torch.quantize_weight(torch.empty(0, 4))


@pytest.mark.parametrize("step,warmup,expected", [(0, 10, 0.0), (5, 10, 0.5), (10, 10, 1.0), (50, 10, 1.0), (3, 0, 1.0)])
def test_lambda_schedule(step, warmup, expected):
    assert bitnet_torch.lambda_schedule(step, warmup) == expected
