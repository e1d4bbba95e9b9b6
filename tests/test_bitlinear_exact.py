"""BitLinear's training forward/backward: every matmul path gives the reference's bits (torch.equal, not a tolerance).

The reference is the spec's formula with the integer product computed in int64 (``quant.quantize_activation`` /
``quant.quantize_weight`` codes), the epilogue ``float(int32 acc) * (x_scale * w_scale) + bias`` in fp32, and the
straight-through backward ``dx = dy @ (W_t * s_w)``, ``dW = dy^T @ (x_q * s_x)``, ``db = sum(dy)`` in dy's dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_torch import BitLinear, _backend
from bitnet_torch.nn import bitlinear as bl
from bitnet_torch.quant import quantize_activation, quantize_weight

PATHS = [None, *bl.MATMUL_PATHS]  # None: the automatic per-ISA choice


@pytest.fixture(params=["default", "scalar", "avx2", "avx512"])
def isa(request):
    """Force one instruction set of the compiled kernels, restore the automatic choice afterwards ("default": the
    start-up choice, or the pure-PyTorch fallback without the extension)."""
    if request.param == "default":
        yield _backend.cpu_isa()
        return
    if request.param not in _backend.available_cpu_isas():
        pytest.skip(f"this CPU (or build) does not support {request.param}")
    assert _backend.set_cpu_isa(request.param) == request.param
    yield request.param
    _backend.set_cpu_isa("auto")


@pytest.fixture
def forced_path():
    yield bl.force_matmul_path
    bl.force_matmul_path(None)


def reference_forward(x, w, bias, act_bits=8, out_dtype=None):
    """The spec's BitLinear forward with an int64 integer product (independent of every fast path)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    x2d = x.reshape(-1, x.shape[-1])
    x_q, x_s = quantize_activation(x2d, act_bits)
    w_t, w_s = quantize_weight(w)
    acc = (x_q.long() @ w_t.long().t()).to(torch.int32)
    y = torch.mul(acc, x_s * w_s)
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype).reshape(*x.shape[:-1], w.shape[0])


def reference_grads(x, w, grad_out, act_bits=8):
    """The straight-through backward of the reference: (dx, dW, db) in grad_out's dtype, cast like the layer."""
    g = grad_out.reshape(-1, w.shape[0])
    x_q, x_s = quantize_activation(x.reshape(-1, x.shape[-1]), act_bits)
    w_t, w_s = quantize_weight(w)
    dx = (g @ torch.mul(w_t, w_s).to(g.dtype)).to(x.dtype).reshape(x.shape)
    dw = (g.t() @ torch.mul(x_q, x_s).to(g.dtype)).to(w.dtype)
    return dx, dw, g.sum(0).to(w.dtype)


_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                  torch.float16: torch.int16}


def assert_equal(actual, expected, what):
    """torch.equal, and for floats the same bit patterns too (torch.equal calls -0.0 and +0.0 equal)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (what, actual.dtype, actual.shape)
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs().max()
        raise AssertionError(f"{what}: {int((actual != expected).sum())} elements differ, max |diff| {diff:g}")
    if actual.dtype in _SAME_SIZE_INT:
        bits = actual.view(_SAME_SIZE_INT[actual.dtype]) != expected.view(_SAME_SIZE_INT[actual.dtype])
        assert not bits.any(), f"{what}: {int(bits.sum())} elements differ in the sign of zero"


def check_layer(layer, x, path, act_bits=8):
    """Forward + backward through ``layer`` on ``path``; everything equals the reference bit for bit."""
    bl.force_matmul_path(path)
    try:
        xr = x.detach().clone().requires_grad_(True)
        y = layer(xr)
        grad_out = torch.randn(y.shape, dtype=y.dtype)
        y.backward(grad_out)
    finally:
        bl.force_matmul_path(None)
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    assert_equal(y, reference_forward(x, w, b, act_bits), f"{path} forward")
    dx, dw, db = reference_grads(x, w, grad_out, act_bits)
    assert_equal(xr.grad, dx, f"{path} grad x")
    assert_equal(layer.weight.grad, dw, f"{path} grad W")
    if b is not None:
        assert_equal(layer.bias.grad, db, f"{path} grad bias")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "shape,n,bias",
    [((5, 64), 24, True), ((2, 7, 33), 13, False), ((3, 1), 8, True), ((1, 2), 5, False), ((0, 16), 8, True),
     ((4, 3, 130), 20, True)],
)
def test_every_path_is_bit_identical_to_the_reference(isa, path, shape, n, bias):
    layer = BitLinear(shape[-1], n, bias=bias)
    check_layer(layer, torch.randn(shape) * 3, path)


@pytest.mark.parametrize("path", PATHS)
def test_zero_tokens_and_tiny_weights_keep_the_sign_of_zero(path):
    """All-zero tokens against weights with small negative values (codes -0.0 in float): outputs are +0.0."""
    layer = BitLinear(32, 8, bias=False)
    with torch.no_grad():
        layer.weight.mul_(0.01)
        layer.weight[:, :16] = -1e-4  # round(w / s) = -0.0
        layer.weight[:, 16:] = torch.where(layer.weight[:, 16:] > 0, 1.0, -1.0)
    x = torch.randn(4, 32)
    x[1] = 0
    x[2, 16:] = 0
    check_layer(layer, x, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 7])
def test_negative_codes_against_zero_weight_codes_give_plus_zero(path, k):
    """Rows whose every product is (negative code) x (zero code): -0.0 in float, 0 in the spec's integers."""
    layer = BitLinear(k, 8, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[:4] = 1e-3  # codes 0 for the first four outputs (mean |W| ~ 0.5)
    x = -torch.rand(3, k) - 0.5  # every code negative
    check_layer(layer, x, path)


def test_dequantized_weight_is_the_spec_bit_for_bit():
    w = torch.randn(64, 48) * 0.02
    w[:3] = -1e-6
    w[3, :5] = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.0]) * w.abs().mean()  # half-way cases round to even
    w_t, w_s = quantize_weight(w)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert_equal(bl._dequantized_weight(w, dtype), torch.mul(w_t, w_s).to(dtype), f"{dtype} dequantized")
        assert_equal(bl._dequantized_weight(w.to(dtype), torch.float32),
                     torch.mul(*quantize_weight(w.to(dtype))), f"{dtype} master weight")
    assert_equal(bl._ternary_codes(w, w_s, scaled=False), w_t.float(), "codes")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtype_layers_are_bit_identical(path, dtype):
    layer = BitLinear(96, 40, bias=True, dtype=dtype)
    check_layer(layer, torch.randn(2, 9, 96, dtype=dtype), path)


@pytest.mark.parametrize("path", PATHS)
def test_low_bit_activations_are_bit_identical(path):
    layer = BitLinear(48, 16, bias=True, act_bits=4)
    check_layer(layer, torch.randn(6, 48), path, act_bits=4)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 9), k=st.integers(1, 300), n=st.integers(1, 40), bias=st.booleans(),
       path=st.sampled_from(PATHS), seed=st.integers(0, 2**16))
def test_random_shapes_are_bit_identical(m, k, n, bias, path, seed):
    torch.manual_seed(seed)
    layer = BitLinear(k, n, bias=bias)
    check_layer(layer, torch.randn(m, k) * 2, path)


@pytest.mark.parametrize("path", PATHS)
def test_autocast_output_is_bit_identical(path, forced_path):
    layer = BitLinear(64, 32, bias=True)
    x = torch.randn(3, 5, 64)
    forced_path(path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_equal(y, reference_forward(x, layer.weight.detach(), layer.bias.detach(), out_dtype=torch.bfloat16), "autocast")


def test_fp32_gemm_stays_exact_under_reduced_matmul_precision(forced_path):
    # "medium" lets oneDNN run fp32 matmuls with bf16 inputs: the codes (|v| <= 128) are exact there too.
    layer = BitLinear(512, 64, bias=False)
    x = torch.randn(16, 512)
    before = torch.get_float32_matmul_precision()
    forced_path("fp32_gemm")
    try:
        for precision in ("medium", "high"):
            torch.set_float32_matmul_precision(precision)
            assert_equal(layer(x), reference_forward(x, layer.weight.detach(), None), precision)
    finally:
        torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------------------------ the fp32 exactness bound


def test_fp32_codes_matmul_at_the_bound_with_the_largest_products():
    """K = FP32_EXACT_K = 2**17 and every product 128 (x_q = -128, W_t = -1): the sum is 2**24, still exact."""
    k = bl.FP32_EXACT_K
    x_q = torch.full((2, k), -128, dtype=torch.int8)
    w = torch.full((3, k), -1.0)
    x_q[1, 0] = -127  # 2**24 - 1: odd, needs all 24 bits
    acc = bl._fp32_codes_matmul(x_q, w)
    assert acc.dtype == torch.float32  # one GEMM up to the bound
    assert acc[0].tolist() == [2.0**24] * 3 and acc[1].tolist() == [2.0**24 - 1] * 3


def test_fp32_codes_matmul_splits_longer_rows_into_exact_chunks():
    """Past the bound a single fp32 GEMM cannot be exact (the true sum is an odd number > 2**24); the chunked
    product is, and equals the int64 one."""
    k = bl.FP32_EXACT_K + 2**16 + 1
    x_q = torch.full((2, k), 127, dtype=torch.int8)
    x_q[1, ::3] = -128
    w_t = torch.ones(4, k, dtype=torch.int8)
    w_t[2, 1::2] = -1
    w_t[3, ::5] = 0
    exact = x_q.long() @ w_t.long().t()
    assert exact[0, 0] > 2**24 and exact[0, 0] % 2 == 1  # not representable in fp32
    single = x_q.float() @ w_t.float().t()
    assert not torch.equal(single.long(), exact)
    acc = bl._fp32_codes_matmul(x_q, w_t.float())
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), exact)


@pytest.mark.parametrize("path", [None, "fp32_gemm", "int_mm"])
def test_layer_past_the_fp32_bound_is_exact(path, forced_path):
    """A BitLinear with K > 2**17 (codes all 127 against all +1: every product 127, sum 127 * K > 2**24)."""
    k = bl.FP32_EXACT_K + 2**16 + 1
    layer = BitLinear(k, 4, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.02)
        layer.weight[1, ::2] = -0.02
    x = torch.ones(2, k)
    x[1, ::7] = -1.0
    forced_path(path)
    assert bl.matmul_path(x, layer.weight, 8, torch.float32) == (path or "fp32_gemm")
    assert_equal(layer(x), reference_forward(x, layer.weight.detach(), None), f"K={k}")


def test_in_features_beyond_the_int32_accumulator_is_refused():
    k = bl.MAX_IN_FEATURES + 1
    x = torch.empty(1, k)
    w = torch.empty(4, k)
    with pytest.raises(ValueError, match=r"in_features < 2\*\*24"):
        bl.BitLinearFunction.apply(x, w, None, 8)


# ------------------------------------------------------------------------------------------- path choice


def test_path_choice_per_isa(isa):
    if isa is None:  # the pure-PyTorch fallback: no kernels, the fp32 GEMM of the codes
        assert bl.matmul_path(torch.randn(4, 64), torch.empty(32, 64), 8, torch.float32) == "fp32_gemm"
        return
    x = torch.randn(4, 64)
    expected = "fp32_gemm" if isa == "scalar" else "ternary_linear"
    assert bl.matmul_path(x, torch.empty(32, 64), 8, torch.float32) == expected
    assert bl.matmul_path(x, torch.empty(30, 64), 8, torch.float32) == "fp32_gemm"  # N % 4: no packed layout
    assert bl.matmul_path(x, torch.empty(32, 64), 4, torch.float32) == ("fp32_gemm" if isa == "scalar" else "ternary_matmul")
    bf = x.bfloat16()
    assert bl.matmul_path(bf, torch.empty(32, 64), 8, torch.float16) == ("fp32_gemm" if isa == "scalar" else "ternary_matmul")


def test_forcing_an_unknown_path_is_refused():
    with pytest.raises(ValueError, match="unknown matmul path"):
        bl.force_matmul_path("bf16")


def test_frozen_weight_saves_no_activations():
    """LoRA-style frozen BitLinear: only dx is needed, so neither codes nor scales of x are kept."""
    layer = BitLinear(64, 32, bias=False).requires_grad_(False)
    x = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert all(t.numel() <= 1 or t is layer.weight for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert_equal(x.grad, reference_grads(x.detach(), layer.weight, torch.ones(8, 32))[0], "frozen dx")


def test_zero_dim_input_is_a_clear_error():
    layer = BitLinear(4, 4)
    with pytest.raises(ValueError, match="0-dim"):
        layer(torch.tensor(1.0))
