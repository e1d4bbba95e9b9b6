"""The compiled CPU kernels of torch.ops.bitnet: bit-exact with the reference on every ISA path, torch integration.

Every comparison is exact (``torch.equal``): the integer accumulations must agree bit for bit and the fused
epilogue follows the reference's order of float operations. Each test that runs kernels is repeated on every
instruction set this CPU supports (scalar, AVX2, AVX-512 VNNI, AVX-512 + AMX-INT8 prefill), forced through ``bitnet_torch._backend``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALL_ISAS
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitnet_torch
from bitnet_torch import _backend, _reference_ops, ops
from bitnet_torch.nn import PackedBitLinear

REPO_ROOT = Path(__file__).resolve().parent.parent


def _extension_expected() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None


if not ops.extension_loaded():
    if _extension_expected() and os.environ.get("BITNET_TORCH_NO_EXT", "") in ("", "0"):
        raise RuntimeError(f"a compiler and ninja are present but the extension did not load: {ops.extension_error()}")
    pytest.skip(f"compiled kernels unavailable: {ops.extension_error()}", allow_module_level=True)



def _random_packed(n: int, k: int) -> torch.Tensor:
    return bitnet_torch.pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8))


def _activations(shape: tuple[int, ...], dtype: torch.dtype, zero_row: bool = True) -> torch.Tensor:
    x = torch.randn(shape) * 3
    if zero_row and x.dim() >= 2 and x.shape[-2] > 1:
        x[..., 1, :] = 0  # an all-zero token: zero codes, scale 1e-5/127
    return x.to(dtype)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        raise AssertionError(
            f"{what}: {int((actual != expected).sum())} of {actual.numel()} elements differ, max |diff| {diff.max():g}"
        )


# --------------------------------------------------------------------------------------------- contract


def test_compiled_schemas_equal_op_schemas():
    for name, schema in ops.OP_SCHEMAS.items():
        compiled = str(getattr(torch.ops.bitnet, name).default._schema)
        assert compiled == f"bitnet::{schema}", f"{name}: C++ schema {compiled!r} != OP_SCHEMAS {schema!r}"


def test_backend_info_reports_extension_and_isa():
    info = bitnet_torch.backend_info()
    assert info["backend"] == "extension" and info["reason"] is None
    assert info["cpu_isa"] in info["cpu_isas"] and "scalar" in info["cpu_isas"]
    assert info["extension_path"] and Path(info["extension_path"]).exists()


def test_every_op_has_a_cuda_kernel_registered():
    """Compiled CUDA kernels, or (CPU-only extension) the reference registered for the CUDA key by ops.py."""
    for name in ops.OP_SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bitnet::{name}", "CUDA"), name


def test_unknown_or_unsupported_isa_is_refused():
    with pytest.raises(ValueError, match="unknown instruction set"):
        _backend.set_cpu_isa("sse9")
    unsupported = [name for name in ALL_ISAS if name not in _backend.available_cpu_isas()]
    for name in unsupported:
        with pytest.raises(RuntimeError, match="not supported by this CPU"):
            _backend.set_cpu_isa(name)


# --------------------------------------------------------------------------------------------- ternary


TERNARY_SHAPES = [  # (M, K, N): awkward K (not a multiple of 4 / 64), N = 4, 12, 6912, M on both paths
    (0, 100, 12),
    (1, 4, 4),
    (1, 100, 12),
    (3, 100, 12),
    (3, 6912, 12),
    (17, 100, 12),
    (17, 2560, 4),
    (17, 4, 12),
    (128, 100, 4),
    (1, 2560, 6912),
    # prefill tiles of 16 packed rows: a full first half (8 rows, transposed 8 dword groups at a time) with K off
    # the 32-byte blocks, partial second halves, and every remainder of the 4-token micro-kernel (M % 4 = 1, 2, 3)
    (18, 100, 64),
    (19, 37, 52),
    (22, 300, 200),
    (33, 129, 36),
]


@pytest.mark.parametrize("m,k,n", TERNARY_SHAPES)
def test_ternary_matmul_is_exact(isa, m, k, n):
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    packed = _random_packed(n, k)
    assert_same(ops.ternary_matmul(x_q, packed), _reference_ops.ternary_matmul(x_q, packed), f"{isa} {m}x{k}x{n}")


def test_ternary_matmul_large_prefill_is_exact(isa):
    if isa == "scalar":
        pytest.skip("the scalar path is checked on the smaller shapes (this one takes seconds there)")
    x_q = torch.randint(-127, 128, (128, 2560), dtype=torch.int8)
    packed = _random_packed(6912, 2560)
    assert_same(ops.ternary_matmul(x_q, packed), _reference_ops.ternary_matmul(x_q, packed), isa)


def test_ternary_matmul_saturated_codes_and_activations(isa):
    """Extreme accumulations: every weight +1 or -1 against activations of -128 / 127 over a long K."""
    k = 6912
    w = torch.ones(8, k, dtype=torch.int8)
    w[4:] = -1
    packed = bitnet_torch.pack_ternary(w)
    x_q = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8)])
    expected = _reference_ops.ternary_matmul(x_q, packed)
    assert_same(ops.ternary_matmul(x_q, packed), expected, isa)
    assert_same(ops.ternary_matmul(x_q.repeat(5, 1), packed), expected.repeat(5, 1), f"{isa} token groups")
    assert_same(ops.ternary_matmul(x_q.repeat(17, 1), packed), expected.repeat(17, 1), f"{isa} prefill")


# The streaming (decode) path takes up to 16 tokens (kDecodeMaxRows) in groups of up to four that re-read each
# weight row: every batch size on it, against the tile path's first size (17), with K off the 64-byte blocks
# and a partial last chunk of packed rows (N / 4 = 21 is not a multiple of 16).
@pytest.mark.parametrize("m", list(range(1, 18)))
def test_ternary_matmul_every_decode_batch_size_is_exact(isa, m):
    x_q = torch.randint(-128, 128, (m, 700), dtype=torch.int8)
    x_q[m // 2] = -128  # one saturated row
    packed = _random_packed(84, 700)
    assert_same(ops.ternary_matmul(x_q, packed), _reference_ops.ternary_matmul(x_q, packed), f"{isa} M={m}")


@pytest.mark.parametrize("m", list(range(1, 18)))
def test_int8_linear_every_decode_batch_size_is_exact(isa, m):
    """K = 2600: from 10 tokens on the activations outgrow the L1 share and the rows go in blocks of 16."""
    x = _activations((m, 2600), torch.float32)
    weight = torch.randint(-128, 128, (37, 2600), dtype=torch.int8)
    w_scale = torch.rand(37) * 0.01
    assert_same(ops.int8_linear(x, weight, w_scale), _reference_ops.int8_linear(x, weight, w_scale, None), f"{isa} M={m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 100, 12), (3, 2560, 12), (17, 100, 4), (130, 260, 68)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_ternary_linear_is_exact(isa, dtype, m, k, n, with_bias):
    x = _activations((m, k), dtype)
    packed = _random_packed(n, k)
    scale = torch.tensor([0.0372], dtype=dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    assert_same(
        ops.ternary_linear(x, packed, scale, bias),
        _reference_ops.ternary_linear(x, packed, scale, bias),
        f"{isa} {dtype} {m}x{k}x{n} bias={with_bias}",
    )


GROUP_CASES = [  # (M, K, N of each member): q/k/v- and gate/up-like groups, awkward N and K, empty members
    (1, 100, (12, 4, 4)),
    (1, 260, (64, 16, 16)),
    (3, 2560, (2560, 640, 640)),
    (8, 300, (4, 128)),
    (9, 100, (12, 8)),
    (0, 100, (12, 4)),
    (1, 100, (0, 8, 0, 4)),
    (130, 260, (68, 20)),
]


@pytest.mark.parametrize("m,k,ns", GROUP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ternary_linear_group_equals_separate_calls(isa, m, k, ns, dtype):
    x = _activations((m, k), dtype)
    packed = [_random_packed(n, k) for n in ns]
    scales = [torch.tensor([0.02 * (i + 1)], dtype=dtype) for i in range(len(ns))]
    biases = [torch.randn(n).to(dtype) if i % 2 else None for i, n in enumerate(ns)]
    outputs = ops.ternary_linear_group(x, packed, scales, biases)
    assert len(outputs) == len(ns)
    for i, out in enumerate(outputs):
        expected = _reference_ops.ternary_linear(x, packed[i], scales[i], biases[i])
        assert_same(out, expected, f"{isa} {dtype} member {i} of {m}x{k}x{ns}")


def test_ternary_linear_group_3d_non_contiguous_and_no_bias_list(isa):
    x = _activations((2, 10, 300), torch.bfloat16)[:, ::2, 50:250]
    packed = [_random_packed(48, 230)[:, 10:210], _random_packed(16, 200)]
    scales = [torch.tensor([[0.5]]), torch.tensor(0.25, dtype=torch.float64)]
    outputs = ops.ternary_linear_group(x, packed, scales)
    assert [tuple(o.shape) for o in outputs] == [(2, 5, 48), (2, 5, 16)]
    for i, out in enumerate(outputs):
        expected = _reference_ops.ternary_linear(x.contiguous(), packed[i].contiguous(), scales[i], None)
        assert_same(out, expected, f"{isa} member {i}")


@pytest.mark.parametrize("with_bias", [False, True])
def test_ternary_linear_group_gradient_is_the_sum_of_the_members(with_bias):
    x = torch.randn(2, 3, 40, requires_grad=True)
    packed = [_random_packed(8, 40), _random_packed(12, 40)]
    scales = [torch.tensor([0.3]), torch.tensor([0.1])]
    biases = [torch.randn(8, requires_grad=True), torch.randn(12, requires_grad=True)] if with_bias else [None, None]
    a, b = ops.ternary_linear_group(x, packed, scales, biases)
    (a.square().sum() + (b * 3).sum()).backward()
    x2 = x.detach().clone().requires_grad_(True)
    biases2 = [t.detach().clone().requires_grad_(True) if t is not None else None for t in biases]
    a2 = ops.ternary_linear(x2, packed[0], scales[0], biases2[0])
    b2 = ops.ternary_linear(x2, packed[1], scales[1], biases2[1])
    (a2.square().sum() + (b2 * 3).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    if with_bias:
        for bias, bias2 in zip(biases, biases2):
            torch.testing.assert_close(bias.grad, bias2.grad)


def test_ternary_linear_group_refuses_a_trainable_bias_next_to_none():
    x = torch.randn(2, 40)
    packed = [_random_packed(8, 40), _random_packed(12, 40)]
    with pytest.raises(NotImplementedError, match="every member to have a bias"):
        ops.ternary_linear_group(x, packed, [torch.tensor([0.3])] * 2, [None, torch.randn(12, requires_grad=True)])


def test_ternary_linear_group_rejects_mismatched_members():
    x = torch.randn(2, 16)
    packed = [_random_packed(8, 16), _random_packed(4, 12)]
    with pytest.raises(ValueError, match=r"K of x \(16\) and packed\[1\] \(12\) differ"):
        ops.ternary_linear_group(x, packed, [torch.tensor([1.0])] * 2)
    with pytest.raises(ValueError, match="weight scales"):
        ops.ternary_linear_group(x, packed[:1], [torch.tensor([1.0])] * 2)
    with pytest.raises(ValueError, match="at least one weight"):
        torch.ops.bitnet.ternary_linear_group(x, [], [], [])
    with pytest.raises(TypeError, match=r"packed\[0\] must be uint8"):
        ops.ternary_linear_group(x, [packed[0].to(torch.int8)], [torch.tensor([1.0])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ternary_linear_3d_input_is_exact(isa, dtype):
    x = _activations((2, 9, 100), dtype)
    x[1, 3] = 0
    packed = _random_packed(12, 100)
    scale = torch.tensor([0.5], dtype=torch.float32)
    out = ops.ternary_linear(x, packed, scale, None)
    assert out.shape == (2, 9, 12)
    assert_same(out, _reference_ops.ternary_linear(x, packed, scale, None), f"{isa} 3-D")


def test_ternary_linear_large_decode_is_exact(isa):
    x = _activations((1, 6912), torch.bfloat16)
    packed = _random_packed(2560, 6912)
    scale = torch.tensor([0.02], dtype=torch.bfloat16)
    assert_same(ops.ternary_linear(x, packed, scale, None), _reference_ops.ternary_linear(x, packed, scale, None), isa)


def test_non_contiguous_inputs_are_read_correctly(isa):
    x_big = _activations((40, 300), torch.float32)
    x = x_big[::2, 7:107]  # strided rows and an offset column window
    packed_big = _random_packed(24, 230)
    packed = packed_big[1:4, 20:120]  # P = 3 -> N = 12, non-contiguous rows
    assert not x.is_contiguous() and not packed.is_contiguous()
    scale = torch.tensor([[0.25]])
    bias = torch.randn(24)[::2]
    expected = _reference_ops.ternary_linear(x.contiguous(), packed.contiguous(), scale, bias.contiguous())
    assert_same(ops.ternary_linear(x, packed, scale, bias), expected, f"{isa} linear")
    x_q = torch.randint(-128, 128, (100, 20), dtype=torch.int8).t()
    assert_same(ops.ternary_matmul(x_q, packed), _reference_ops.ternary_matmul(x_q.contiguous(), packed), f"{isa} matmul")
    xq_ref, s_ref = _reference_ops.quantize_activation(x.contiguous())
    xq, s = ops.quantize_activation(x)
    assert_same(xq, xq_ref, f"{isa} quantize codes")
    assert_same(s, s_ref, f"{isa} quantize scales")


def test_single_column_matches_integer_oracle(isa):
    """K = 1 against int64 arithmetic: torch._int_mm (the reference's GEMM) returns garbage for K = 1 on CPU."""
    x_q = torch.randint(-128, 128, (20, 1), dtype=torch.int8)
    w = torch.randint(-1, 2, (8, 1), dtype=torch.int8)
    expected = (x_q.long() @ w.long().t()).int()
    assert_same(ops.ternary_matmul(x_q, bitnet_torch.pack_ternary(w)), expected, f"{isa} K=1")
    assert_same(ops.ternary_matmul(x_q[:3], bitnet_torch.pack_ternary(w)), expected[:3], f"{isa} K=1 decode")


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(0, 20),
    k=st.integers(2, 300),
    p=st.integers(1, 20),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    isa_name=st.sampled_from(ALL_ISAS),
)
def test_random_shapes_are_exact(m, k, p, dtype, isa_name):
    if isa_name not in _backend.available_cpu_isas():
        return
    _backend.set_cpu_isa(isa_name)
    try:
        x = _activations((m, k), dtype)
        packed = _random_packed(4 * p, k)
        scale = torch.tensor([0.125], dtype=dtype)
        bias = torch.randn(4 * p, dtype=dtype)
        assert_same(ops.ternary_linear(x, packed, scale, bias), _reference_ops.ternary_linear(x, packed, scale, bias), "linear")
        weight = torch.randint(-128, 128, (4 * p, k), dtype=torch.int8)
        w_scale = torch.rand(4 * p)
        assert_same(
            ops.int8_linear(x, weight, w_scale, bias), _reference_ops.int8_linear(x, weight, w_scale, bias), "int8"
        )
    finally:
        _backend.set_cpu_isa("auto")


# --------------------------------------------------------------------------------------------- quantizers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_quantize_activation_is_exact(isa, dtype):
    x = _activations((37, 1000), dtype)
    x[2] = 1e-7  # absmax below the 1e-5 floor
    x[3, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])  # ties: round half to even
    x[4] = torch.linspace(-60000, 60000, 1000)
    for shape in [(37, 1000), (37, 1), (37, 0)]:
        xs = x[:, : shape[1]]
        q, s = ops.quantize_activation(xs)
        q_ref, s_ref = _reference_ops.quantize_activation(xs)
        assert_same(q, q_ref, f"{isa} {dtype} codes {shape}")
        assert_same(s, s_ref, f"{isa} {dtype} scales {shape}")
    q, s = ops.quantize_activation(x.reshape(37, 10, 100))
    assert q.shape == (37, 10, 100) and s.shape == (37, 10, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_pack_weight_is_exact(isa, dtype):
    w = (torch.randn(68, 300) * 0.02).to(dtype)
    w[5] = 0
    packed, scale = ops.quantize_pack_weight(w)
    packed_ref, scale_ref = _reference_ops.quantize_pack_weight(w)
    assert_same(packed, packed_ref, f"{isa} packed")
    assert_same(scale, scale_ref, f"{isa} scale")


# --------------------------------------------------------------------------------------------- int8 lm_head


@pytest.mark.parametrize("m,k,n", [(1, 100, 7), (3, 2560, 130), (8, 64, 64), (9, 100, 70), (130, 300, 200), (1, 2560, 4100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_exact(isa, m, k, n, dtype):
    x = _activations((m, k), dtype)
    weight = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    weight[0] = -128  # the most negative weight on every column
    w_scale = torch.rand(n) * 0.01
    bias = torch.randn(n).to(dtype)
    for b in (None, bias):
        assert_same(
            ops.int8_linear(x, weight, w_scale, b),
            _reference_ops.int8_linear(x, weight, w_scale, b),
            f"{isa} {dtype} {m}x{k}x{n} bias={b is not None}",
        )


def test_int8_linear_3d_input_is_exact(isa):
    x = _activations((2, 5, 64), torch.bfloat16)
    weight = torch.randint(-128, 128, (33, 64), dtype=torch.int8)
    w_scale = torch.rand(33, dtype=torch.bfloat16)
    assert_same(ops.int8_linear(x, weight, w_scale), _reference_ops.int8_linear(x, weight, w_scale, None), isa)


# --------------------------------------------------------------------------------------------- threads


def test_results_do_not_depend_on_thread_count():
    x = _activations((200, 512), torch.bfloat16)
    packed = _random_packed(400, 512)
    scale = torch.tensor([0.1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.ternary_linear(x, packed, scale, None)
        torch.set_num_threads(max(2, threads))
        multi = ops.ternary_linear(x, packed, scale, None)
    finally:
        torch.set_num_threads(threads)
    assert_same(multi, single, "1 vs several threads")


# --------------------------------------------------------------------------------------------- torch integration


def _opcheck_cases():
    x = _activations((5, 40), torch.float32)
    packed = _random_packed(8, 40)
    return {
        "quantize_activation": (x,),
        "ternary_matmul": (torch.randint(-128, 128, (5, 40), dtype=torch.int8), packed),
        "ternary_linear": (x, packed, torch.tensor([0.3]), torch.randn(8)),
        "ternary_linear_group": (
            x, [packed, _random_packed(4, 40)], [torch.tensor([0.3]), torch.tensor([0.2])], [torch.randn(8), None]
        ),
        "quantize_pack_weight": (torch.randn(8, 40),),
        "int8_linear": (x, torch.randint(-128, 128, (6, 40), dtype=torch.int8), torch.rand(6), None),
        "float_linear": (x, torch.randn(6, 40, dtype=torch.bfloat16), torch.randn(6)),
        "decode_attention": (  # more cases in test_decode_attention.py
            torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16),
            torch.arange(9).view(1, 1, 1, 9) < 6, 0.25,
        ),
        "rms_norm": (x, torch.rand(40), 1e-6),  # more cases in test_rms_norm.py
        "rotary_embedding": (  # more cases in test_rotary.py
            torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8),
        ),
        "decode_step": _decode_step_case(),  # more cases in test_decode_engine.py
    }


def _decode_step_case():
    """A one-layer model (hidden 16 = 2 heads x 8, 1 KV head, intermediate 8, vocab 11), 2 slots x 4 positions."""
    hidden, inter, kv, head_dim = 16, 8, 1, 8
    packed = [_random_packed(n, k) for n, k in ((16, 16), (8, 16), (8, 16), (16, 16), (inter, 16), (inter, 16), (16, inter))]
    long = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return (
        long(3, 4, 5), long(0, 1, 0), long(0, 0, 1), long(1, 2), torch.randn(11, hidden), None,
        torch.rand(3 * hidden + inter + hidden) + 0.5, packed, torch.rand(7) + 0.1, torch.rand(4, head_dim),
        torch.rand(4, head_dim), torch.randn(11, hidden), None, torch.zeros(1, 2, kv, 4, head_dim),
        torch.zeros(1, 2, kv, 4, head_dim), 2, kv, 1e-6, head_dim**-0.5,
    )


@pytest.mark.parametrize("name", list(ops.OP_SCHEMAS))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.bitnet, name).default, _opcheck_cases()[name])


def test_packed_layer_compiles_fullgraph():
    layer = PackedBitLinear.from_bitlinear(torch.nn.Linear(64, 32, bias=True))
    x = _activations((2, 3, 64), torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_same(compiled(x), layer(x), "compiled vs eager")


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    packed = _random_packed(8, 16)
    x = torch.randn(3, 16)
    with pytest.raises(TypeError, match="floating-point"):
        ops.ternary_linear(torch.ones(3, 16, dtype=torch.int32), packed, torch.ones(1), None)
    with pytest.raises(ValueError, match="K of x"):
        ops.ternary_linear(torch.randn(3, 15), packed, torch.ones(1), None)
    with pytest.raises(TypeError, match="packed must be uint8"):
        ops.ternary_linear(x, packed.to(torch.int8), torch.ones(1), None)
    with pytest.raises(ValueError, match="weight_scale must hold one element"):
        ops.ternary_linear(x, packed, torch.ones(2), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.ternary_linear(x, packed, torch.ones(1), torch.ones(7))
    with pytest.raises(ValueError, match="2-D"):
        ops.ternary_matmul(torch.zeros(2, 3, 16, dtype=torch.int8), packed)
    with pytest.raises(TypeError, match="x_q must be int8"):
        ops.ternary_matmul(torch.zeros(2, 16), packed)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        ops.quantize_pack_weight(torch.randn(6, 16))
    with pytest.raises(ValueError, match="empty weight"):
        ops.quantize_pack_weight(torch.randn(0, 16))
    with pytest.raises(ValueError, match="one scale per output row"):
        ops.int8_linear(x, torch.zeros(5, 16, dtype=torch.int8), torch.ones(4), None)
    with pytest.raises(TypeError, match="weight must be int8"):
        ops.int8_linear(x, torch.zeros(5, 16), torch.ones(5), None)
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.quantize_activation(torch.tensor(1.0))


# --------------------------------------------------------------------------------------------- processes


_SUBPROCESS_SCRIPT = r"""
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import bitnet_torch
    from bitnet_torch import ops
    torch.manual_seed(0)
    x = torch.randn(5, 70).bfloat16()
    packed = bitnet_torch.pack_ternary(torch.randint(-1, 2, (12, 70), dtype=torch.int8))
    y1 = ops.ternary_linear(x, packed, torch.tensor([0.2]), None)
    y2 = ops.ternary_linear(x, packed, torch.tensor([0.2]), None)
fallback_warnings = [str(w.message) for w in caught if "fallback" in str(w.message)]
print(json.dumps({"info": bitnet_torch.backend_info(), "warnings": fallback_warnings,
                  "y": y1.float().flatten().tolist(), "same": bool(torch.equal(y1, y2))}))
"""


def _run_python(env_update: dict[str, str]) -> dict:
    env = {**os.environ, **env_update}
    result = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _expected_subprocess_output() -> list[float]:
    torch.manual_seed(0)
    x = torch.randn(5, 70).bfloat16()
    packed = bitnet_torch.pack_ternary(torch.randint(-1, 2, (12, 70), dtype=torch.int8))
    return ops.ternary_linear(x, packed, torch.tensor([0.2]), None).float().flatten().tolist()


def test_no_ext_fallback_warns_once_and_gives_identical_results():
    out = _run_python({"BITNET_TORCH_NO_EXT": "1"})
    assert out["info"]["backend"] == "fallback" and "BITNET_TORCH_NO_EXT" in out["info"]["reason"]
    assert len(out["warnings"]) == 1, out["warnings"]
    assert out["same"]
    assert out["y"] == _expected_subprocess_output()


_ISA_SCRIPT = r"""
import sys
import torch
torch.ops.load_library(sys.argv[1])
print(torch.ops.bitnet._cpu_isa(""))
"""


@pytest.mark.parametrize("value,expected,warns", [("scalar", "scalar", False), ("sse9", None, True)])
def test_isa_environment_variable_selects_the_path(value, expected, warns):
    """BITNET_TORCH_CPU_ISA picks the start-up path; an unknown value warns and keeps the fastest."""
    from bitnet_torch import _build

    library = _build.loaded_library_path()
    env = {**os.environ, "BITNET_TORCH_CPU_ISA": value}
    result = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT, str(library)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == (expected or _backend.available_cpu_isas()[-1])
    assert ("BITNET_TORCH_CPU_ISA=sse9 is not one of" in result.stderr) == warns, result.stderr[-2000:]


@pytest.mark.parametrize("m", [1, 9])
def test_ternary_matmul_is_exact_at_the_largest_k_on_adversarial_data(isa, m):
    """K = 2^17 - 1 with every activation -128 and every weight +1: the largest sums the kernels must hold."""
    k = (1 << 17) - 1
    x_q = torch.full((m, k), -128, dtype=torch.int8)
    packed = bitnet_torch.pack_ternary(torch.ones(8, k, dtype=torch.int8))
    expected = torch.full((m, 8), -128 * k, dtype=torch.int32)
    assert_same(ops.ternary_matmul(x_q, packed), expected, f"{isa}: K = 2^17 - 1, adversarial")


def test_ternary_ops_refuse_k_beyond_the_exact_range():
    k = 1 << 17
    with pytest.raises(ValueError, match="exceeds the supported maximum"):
        ops.ternary_matmul(torch.zeros(1, k, dtype=torch.int8), torch.zeros(1, k, dtype=torch.uint8))
