"""Non-finite inputs through the compiled kernels: NaN and +-inf propagate exactly as in the reference.

The reference (``bitnet_torch.quant.quantize_activation`` and ``bitnet_torch._reference_ops``) defines it:
``torch.amax`` and ``torch.clamp`` keep NaN and torch's float -> int8 conversion maps NaN to 0, so a token
holding a NaN gets the scale NaN and all-zero codes, a token holding +-inf (and no NaN) the scale +inf and
all-zero codes, and every linear output of such a token is NaN (0 * NaN, 0 * inf). A NaN or infinite weight
scale reaches the epilogue unchanged. Every comparison below is bit for bit (NaN positions equal, every other
value ``torch.equal``), on every instruction set this CPU supports (forced through ``bitnet_torch._backend``),
for NaN / +inf / -inf at the first, a SIMD-body and the last (tail) position of a row, all-zero rows, odd K,
M = 0 / 1 / odd / past the decode threshold, and non-contiguous inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitnet_torch
from bitnet_torch import _backend, _reference_ops, ops, quant
from bitnet_torch.nn import BitLinear

NAN, INF = float("nan"), float("inf")
REPO_ROOT = Path(__file__).resolve().parent.parent

needs_extension = pytest.mark.skipif(not ops.extension_loaded(), reason=f"compiled kernels unavailable: {ops.extension_error()}")



def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-for-bit equality where NaN equals NaN: same dtype, shape, NaN positions and every other value."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.is_floating_point():
        nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
        assert torch.equal(nan_a, nan_e), (
            f"{what}: NaN at {nan_a.nonzero()[:6].tolist()} vs the reference's {nan_e.nonzero()[:6].tolist()}"
        )
        actual, expected = actual[~nan_a], expected[~nan_e]
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()[:6].tolist()
        raise AssertionError(f"{what}: {int((actual != expected).sum())} values differ (first at {bad})")


def nonfinite_rows(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[m, k]`` activations whose rows cycle through: NaN / +inf / -inf at the first, a middle and the last
    position, NaN together with inf, an all-zero row, a finite row (so every kind of row meets every path)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    for r in range(m):
        kind = r % 11
        pos = (0, k // 2, k - 1)[r % 3]
        if kind in (0, 1, 2):
            x[r, pos] = NAN
        elif kind in (3, 4):
            x[r, pos] = INF
        elif kind in (5, 6):
            x[r, pos] = -INF
        elif kind == 7:
            x[r, pos] = INF
            x[r, (pos + 1) % k] = NAN
        elif kind == 8:
            x[r] = 0
        elif kind == 9:
            x[r, : max(1, k // 3)] = NAN  # many NaNs, across SIMD lanes
    return x.to(dtype)


SHAPES = [(1, 1), (1, 5), (3, 33), (11, 67), (12, 130), (23, 31), (0, 17)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------- the definition


def test_reference_semantics_of_nonfinite_tokens():
    """What "as the reference" means, pinned: the reference (pure PyTorch) on this platform."""
    x = torch.tensor([[1.0, NAN, 2.0], [1.0, INF, 2.0], [-INF, 0.5, 0.0], [INF, NAN, 1.0], [0.0, 0.0, 0.0]])
    codes, scale = quant.quantize_activation(x)
    assert torch.equal(codes[:4], torch.zeros(4, 3, dtype=torch.int8))
    assert torch.isnan(scale[0]).all() and torch.isnan(scale[3]).all()
    assert scale[1].item() == INF and scale[2].item() == INF
    assert scale[4].item() == pytest.approx(1e-5 / 127)
    packed, w_scale = quant.quantize_weight(torch.randn(8, 3))
    y = _reference_ops.ternary_linear(x, bitnet_torch.pack_ternary(packed), w_scale, None)
    assert torch.isnan(y[:4]).all() and not torch.isnan(y[4]).any()
    # nn.Linear gives NaN for the NaN tokens too (for an infinite token it gives +-inf or NaN; the quantized
    # reference, whose scale is then inf and codes 0, gives NaN)
    assert torch.isnan(torch.nn.functional.linear(x[[0, 3]], torch.ones(8, 3))).all()


# --------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_quantize_activation_nonfinite_bit_exact(isa, dtype):
    for m, k in SHAPES:
        x = nonfinite_rows(m, k, dtype, seed=m * 131 + k)
        codes, scale = ops.quantize_activation(x)
        ref_codes, ref_scale = _reference_ops.quantize_activation(x)
        assert_same(codes, ref_codes, f"{isa} {dtype} {m}x{k} codes")
        assert_same(scale, ref_scale, f"{isa} {dtype} {m}x{k} scale")
    # non-contiguous: a transposed view and a strided slice
    x = nonfinite_rows(40, 19, dtype).t()
    assert_same(ops.quantize_activation(x)[0], _reference_ops.quantize_activation(x)[0], f"{isa} transposed codes")
    assert_same(ops.quantize_activation(x)[1], _reference_ops.quantize_activation(x)[1], f"{isa} transposed scale")
    x = nonfinite_rows(30, 70, dtype)[::3, 1::2]
    assert_same(ops.quantize_activation(x)[1], _reference_ops.quantize_activation(x)[1], f"{isa} strided scale")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_ternary_and_int8_linear_nonfinite_bit_exact(isa, dtype, bias):
    gen = torch.Generator().manual_seed(3)
    for m, k in SHAPES:
        n = 12
        x = nonfinite_rows(m, k, dtype, seed=k)
        w_t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        packed = bitnet_torch.pack_ternary(w_t)
        scale = torch.tensor([0.37], dtype=dtype)
        b = torch.randn(n, generator=gen).to(dtype) if bias else None
        what = f"{isa} {dtype} {m}x{k} bias={bias}"
        assert_same(ops.ternary_linear(x, packed, scale, b), _reference_ops.ternary_linear(x, packed, scale, b), what)
        group = ops.ternary_linear_group(x, [packed, packed[:1]], [scale, scale], [b, None if b is None else b[:4]])
        assert_same(group[0], _reference_ops.ternary_linear(x, packed, scale, b), f"{what} group[0]")
        assert_same(
            group[1], _reference_ops.ternary_linear(x, packed[:1], scale, None if b is None else b[:4]), f"{what} group[1]"
        )
        w8 = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8)
        s8 = torch.rand(n, generator=gen) + 0.01
        assert_same(ops.int8_linear(x, w8, s8, b), _reference_ops.int8_linear(x, w8, s8, b), f"{what} int8")


def test_linear_nonfinite_noncontiguous_and_3d(isa):
    x = nonfinite_rows(26, 45, torch.float32).reshape(2, 13, 45).transpose(0, 1)  # [13, 2, 45], not contiguous
    packed = bitnet_torch.pack_ternary(torch.randint(-1, 2, (8, 45), dtype=torch.int8))
    scale = torch.tensor([0.5])
    assert_same(ops.ternary_linear(x, packed, scale), _reference_ops.ternary_linear(x, packed, scale, None), isa)
    w8 = torch.randint(-128, 128, (5, 45), dtype=torch.int16).to(torch.int8)
    s8 = torch.rand(5)
    assert_same(ops.int8_linear(x, w8, s8), _reference_ops.int8_linear(x, w8, s8, None), f"{isa} int8")


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_weight_scale_bit_exact(isa, bad):
    """A NaN / inf weight scale (a corrupt checkpoint) gives the reference's result, decode and prefill."""
    gen = torch.Generator().manual_seed(5)
    for m in (1, 3, 20):
        x = torch.randn(m, 37, generator=gen)
        x[0] = 0  # 0 * inf = NaN, 0 * finite = 0
        packed = bitnet_torch.pack_ternary(torch.randint(-1, 2, (16, 37), generator=gen, dtype=torch.int8))
        for dtype in DTYPES:
            s = torch.tensor([bad], dtype=dtype)
            xd = x.to(dtype)
            assert_same(ops.ternary_linear(xd, packed, s), _reference_ops.ternary_linear(xd, packed, s, None), f"{isa} {m}")
            out = ops.ternary_linear_group(xd, [packed, packed], [torch.tensor([0.5], dtype=dtype), s], [None, None])
            assert_same(out[1], _reference_ops.ternary_linear(xd, packed, s, None), f"{isa} group {m}")
        w8 = torch.randint(-128, 128, (9, 37), generator=gen, dtype=torch.int16).to(torch.int8)
        s8 = torch.rand(9, generator=gen)
        s8[[2, 7]] = bad
        assert_same(ops.int8_linear(x, w8, s8), _reference_ops.int8_linear(x, w8, s8, None), f"{isa} int8 {m}")


# --------------------------------------------------------------------------------------------- layers and models


def test_bitlinear_forward_and_weight_grad_are_nan_where_the_reference_is(isa):
    """BitLinear (its forward quantizes through the compiled op) against the same layer's math in pure PyTorch:
    NaN in exactly the same places in the output and in the weight gradient, the other values equal."""
    torch.manual_seed(0)
    layer = BitLinear(29, 7, bias=True)
    x = nonfinite_rows(11, 29, torch.float32, seed=9).reshape(11, 29)
    xl = x.clone().requires_grad_(True)
    y = layer(xl)
    y.sum().backward()
    # The reference: quant.py's quantizers and the layer's formula (BitLinearFunction's docstring).
    x_q, x_scale = quant.quantize_activation(x)
    w_t, w_scale = quant.quantize_weight(layer.weight.detach())
    expected = (x_q.double() @ w_t.double().t()).float() * (x_scale * w_scale) + layer.bias.detach()
    assert_same(y.detach(), expected, f"{isa} forward")
    expected_grad_w = torch.ones(11, 7).t() @ (x_q.float() * x_scale)
    assert_same(layer.weight.grad, expected_grad_w, f"{isa} weight grad")
    bad = ~torch.isfinite(x).all(-1)
    assert torch.isnan(y[bad]).all() and not torch.isnan(y[~bad]).any()
    assert torch.isnan(layer.weight.grad).all()  # a NaN row reaches every column of dW


_MODEL_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from safetensors.torch import save_file
    from bitnet_torch import ops
    from bitnet_torch.models import BitNetForCausalLM
    model = BitNetForCausalLM.from_pretrained(sys.argv[1]).eval()
    if sys.argv[3] == "int8":
        model.quantize_output_layers(lm_head=True)
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight_scale.fill_(float("nan"))
        logits = model(torch.tensor([[5, 17, 3, 99, 42]])).logits
    save_file({"logits": logits.contiguous(), "ext": torch.tensor(int(ops.extension_loaded()))}, sys.argv[2])
    """
)


@needs_extension
@pytest.mark.slow
@pytest.mark.parametrize("head", ["int8"])  # the int8 head quantizes the NaN residual stream
def test_model_with_nan_weight_scale_gives_nan_logits_with_and_without_the_extension(tmp_path, head):
    """A NaN weight_scale in one projection (layer 0 down_proj: the residual stream turns NaN): the whole model's logits are NaN where the pure-PyTorch fallback's
    are (today's bug: finite logits with the extension), compared across two processes."""
    from safetensors.torch import load_file

    from bitnet_torch.models import BitNetConfig, BitNetForCausalLM

    torch.manual_seed(0)
    config = BitNetConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    BitNetForCausalLM(config).save_pretrained(tmp_path / "packed", packed=True)
    results = {}
    for name, no_ext in (("ext", "0"), ("ref", "1")):
        env = {**os.environ, "BITNET_TORCH_NO_EXT": no_ext, "PYTHONPATH": str(REPO_ROOT)}
        out = tmp_path / f"{name}.safetensors"
        run = subprocess.run(
            [sys.executable, "-c", _MODEL_SCRIPT, str(tmp_path / "packed"), str(out), head],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = load_file(str(out))
    assert results["ext"]["ext"].item() == 1 and results["ref"]["ext"].item() == 0
    ext, ref = results["ext"]["logits"], results["ref"]["logits"]
    assert torch.isnan(ref).all(), "the reference model's logits should all be NaN"
    assert torch.equal(torch.isnan(ext), torch.isnan(ref))


@needs_extension
@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 12),
    k=st.integers(1, 80),
    dtype=st.sampled_from(DTYPES),
    specials=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from([NAN, INF, -INF, 0.0])), max_size=6
    ),
    seed=st.integers(0, 2**16),
)
def test_random_nonfinite_positions_bit_exact_on_every_isa(m, k, dtype, specials, seed):
    """Hypothesis: NaN/inf/zero at random positions of random shapes, every supported ISA, quantizer and linear."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    for r, c, value in specials:
        x[r % m, c % k] = value
    x = x.to(dtype)
    packed = bitnet_torch.pack_ternary(torch.randint(-1, 2, (8, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8))
    scale = torch.tensor([0.25], dtype=dtype)
    try:
        for isa in _backend.available_cpu_isas():
            _backend.set_cpu_isa(isa)
            for got, want in zip(ops.quantize_activation(x), _reference_ops.quantize_activation(x)):
                assert_same(got, want, f"{isa} quantize")
            assert_same(ops.ternary_linear(x, packed, scale), _reference_ops.ternary_linear(x, packed, scale, None), isa)
    finally:
        _backend.set_cpu_isa("auto")
