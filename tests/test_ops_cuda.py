"""The CUDA kernels of ``torch.ops.bitnet`` against the reference, on a GPU (skipped without one).

Oracle: the pure-PyTorch reference evaluated **on the CPU** (``bitnet_torch.quant`` /
``bitnet_torch._reference_ops``). That CPU evaluation defines the contract: the same reference run on CUDA
computes the activation scale ``absmax / 127`` as ``absmax * (1 / 127)`` (PyTorch's CUDA division by a
Python scalar), which differs in the last bit for a few percent of tokens. Integer products are exact on
either device, so the large products are computed on the GPU in float64 (exact for |sum| < 2**53) and the
float epilogue is applied on the CPU in the reference's order of operations. ``quantize_pack_weight`` is
compared with the reference on the same CUDA device (its absmean is an ATen reduction whose order is
device-specific).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bitnet_torch import _reference_ops, ops
from bitnet_torch.nn import BitLinear, PackedBitLinear
from bitnet_torch.packing import pack_ternary, unpack_ternary
from bitnet_torch.quant import quantize_activation

if not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device; the CUDA sources are compile-checked by tests/test_cuda_compile.py",
        allow_module_level=True,
    )

pytestmark = pytest.mark.cuda

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOKENS = (0, 1, 3, 16, 17, 128, 513)
FEATURES_IN = (4, 100, 2560, 6912)
FEATURES_OUT = (4, 12, 6912)
DEVICE = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_loaded():
    """On a GPU machine the compiled CUDA kernels must back the ops (not the fallback)."""
    assert ops.extension_loaded(), f"the compiled extension is not loaded: {ops.extension_error()}"
    for name in ops.OP_SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bitnet::{name}", "CUDA"), f"bitnet::{name} has no CUDA kernel"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor for bit-exact comparison (NaN-safe, -0.0 != 0.0)."""
    t = t.detach().cpu().contiguous()
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}.get(t.dtype)
    return t.view(view) if view is not None else t


def assert_bit_equal(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    diff = (_bits(got) != _bits(expected)).nonzero()
    if diff.numel():
        first = tuple(diff[0].tolist())
        raise AssertionError(
            f"{what}: {diff.shape[0]} of {got.numel()} elements differ; first at {first}: "
            f"got {got.detach().cpu()[first].item()}, expected {expected.detach().cpu()[first].item()}"
        )


def _activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, max(m, 1))[:m, None]
    if m > 2:
        x[1] = 0.0  # an all-zero token
    return x.to(dtype)


def _ternary(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)


def _exact_int_matmul(x_q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``x_q @ w.T`` (CPU result), computed in float64 on the GPU."""
    return (x_q.to(DEVICE).double() @ w.to(DEVICE).double().t()).round().to(torch.int32).cpu()


def _reference_linear(x, w_int, weight_scale, bias, per_row: bool) -> torch.Tensor:
    """The reference linear (``_reference_ops.ternary_linear`` / ``int8_linear``) on the CPU, any size."""
    lead = x.shape[:-1]
    x_q, x_scale = quantize_activation(x.cpu().reshape(-1, x.shape[-1]))
    acc = _exact_int_matmul(x_q, w_int)
    n = w_int.shape[0]
    w_scale = weight_scale.cpu().float().reshape(1, n) if per_row else weight_scale.cpu().float().reshape(())
    y = acc.float() * (x_scale * w_scale)
    if bias is not None:
        y = y + bias.cpu().float()
    return y.to(x.dtype).reshape(*lead, n)


# ------------------------------------------------------------------------------------------------ quantize


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 8), (1, 4), (3, 100), (2, 5, 2560), (513, 6912), (7, 0)])
def test_quantize_activation_matches_reference_bit_for_bit(shape, dtype) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    if x.numel() and x.dim() == 2 and x.shape[0] > 1:
        x[0] = 0.0
    codes, scales = ops.quantize_activation(x.to(DEVICE))
    ref_codes, ref_scales = quantize_activation(x)
    assert_bit_equal(codes, ref_codes, "codes")
    assert_bit_equal(scales, ref_scales, "scales")


def test_quantize_activation_accepts_non_contiguous_input() -> None:
    base = torch.randn(64, 300, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x = base.t()[:, ::3]  # [300, 22], strided both ways
    codes, scales = ops.quantize_activation(x)
    ref_codes, ref_scales = quantize_activation(x.cpu())
    assert_bit_equal(codes, ref_codes, "codes")
    assert_bit_equal(scales, ref_scales, "scales")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(4, 1), (12, 100), (6912, 2560), (2560, 6912)])
def test_quantize_pack_weight_matches_reference_on_the_same_device(n, k, dtype) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).to(dtype).to(DEVICE)
    packed, scale = ops.quantize_pack_weight(w)
    ref_packed, ref_scale = _reference_ops.quantize_pack_weight(w)
    assert_bit_equal(scale, ref_scale, "scale")
    assert_bit_equal(packed, ref_packed, "packed")


def test_quantize_pack_weight_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        ops.quantize_pack_weight(torch.randn(6, 8, device=DEVICE))
    with pytest.raises(ValueError, match="empty"):
        ops.quantize_pack_weight(torch.randn(0, 8, device=DEVICE))


# ------------------------------------------------------------------------------------------------ matmul / linear


@pytest.mark.parametrize(("m", "k", "n"), list(itertools.product(TOKENS, FEATURES_IN, FEATURES_OUT)))
def test_ternary_matmul_is_exact(m, k, n) -> None:
    w_t = _ternary(n, k, seed=n + k)
    x_q = torch.randint(-128, 128, (m, k), generator=torch.Generator().manual_seed(m + k), dtype=torch.int16).to(torch.int8)
    got = ops.ternary_matmul(x_q.to(DEVICE), pack_ternary(w_t).to(DEVICE))
    assert_bit_equal(got, _exact_int_matmul(x_q, w_t), f"ternary_matmul M={m} K={k} N={n}")


def test_ternary_matmul_accepts_strided_codes() -> None:
    w_t = _ternary(12, 100, seed=5)
    big = torch.randint(-128, 128, (40, 250), dtype=torch.int16).to(torch.int8)
    packed = pack_ternary(w_t).to(DEVICE)
    for rows in (slice(0, 5), slice(0, 40)):  # decode and tensor-core paths
        x_q = big.to(DEVICE)[rows, 3:103]  # unit stride along K, row stride 250, misaligned start
        assert not x_q.is_contiguous()
        got = ops.ternary_matmul(x_q, packed)
        assert_bit_equal(got, _exact_int_matmul(x_q.cpu(), w_t), f"strided ternary_matmul rows {rows}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "n"), list(itertools.product(TOKENS, FEATURES_IN, FEATURES_OUT)))
def test_ternary_linear_matches_reference_bit_for_bit(m, k, n, dtype) -> None:
    x = _activations(m, k, dtype, seed=m * 7 + k)
    w_t = _ternary(n, k, seed=n * 3 + k)
    weight_scale = torch.tensor([0.0123], dtype=dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) if n != 12 else None
    got = ops.ternary_linear(
        x.to(DEVICE), pack_ternary(w_t).to(DEVICE), weight_scale.to(DEVICE), None if bias is None else bias.to(DEVICE)
    )
    expected = _reference_linear(x, w_t, weight_scale, bias, per_row=False)
    assert_bit_equal(got, expected, f"ternary_linear M={m} K={k} N={n} {dtype}")


def test_ternary_linear_oracle_is_the_reference_op() -> None:
    """Ties the test oracle to _reference_ops.ternary_linear itself on a small shape (both on the CPU)."""
    x = _activations(5, 100, torch.bfloat16, seed=1)
    w_t = _ternary(12, 100, seed=2)
    scale, bias = torch.tensor([0.05], dtype=torch.bfloat16), torch.randn(12).to(torch.bfloat16)
    assert_bit_equal(
        _reference_linear(x, w_t, scale, bias, per_row=False),
        _reference_ops.ternary_linear(x, pack_ternary(w_t), scale, bias),
        "oracle",
    )


def test_ternary_linear_leading_dims_non_contiguous_and_mixed_dtypes() -> None:
    x_big = torch.randn(3, 9, 2 * 2560, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    x = x_big.to(DEVICE)[..., ::2]  # [3, 9, 2560], stride 2 along K
    w_t = _ternary(64, 2560, seed=6)
    packed = pack_ternary(torch.cat([w_t, w_t], dim=1)).to(DEVICE)[:, :2560]  # [16, 2560] of a [16, 5120]
    assert not x.is_contiguous() and not packed.is_contiguous()
    scale = torch.tensor([0.02], dtype=torch.bfloat16)  # scale and bias in another float dtype than x
    bias = torch.randn(64).to(torch.float32)
    got = ops.ternary_linear(x, packed, scale.to(DEVICE), bias.to(DEVICE))
    assert got.shape == (3, 9, 64)
    assert_bit_equal(got, _reference_linear(x.cpu(), w_t, scale, bias, per_row=False), "leading dims")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 2560, 5), (3, 100, 12), (16, 6912, 517), (17, 4, 4), (128, 2560, 1031), (513, 100, 6912)])
def test_int8_linear_matches_reference_bit_for_bit(m, k, n, dtype) -> None:
    gen = torch.Generator().manual_seed(m + k + n)
    x = _activations(m, k, dtype, seed=m + n)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8)
    weight_scale = torch.rand(n, generator=gen) * 0.01
    bias = torch.randn(n, generator=gen).to(dtype)
    got = ops.int8_linear(x.to(DEVICE), w.to(DEVICE), weight_scale.to(DEVICE), bias.to(DEVICE))
    assert_bit_equal(got, _reference_linear(x, w, weight_scale, bias, per_row=True), f"int8_linear M={m} K={k} N={n}")


def test_linear_ops_match_reference_on_random_shapes() -> None:
    """Hypothesis over M (both sides of the decode / tensor-core switch), K, N, dtypes and bias."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(
        m=st.integers(1, 300),
        k=st.integers(1, 700),
        n=st.integers(1, 300),
        dtype=st.sampled_from(DTYPES),
        with_bias=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def check(m, k, n, dtype, with_bias, seed):
        gen = torch.Generator().manual_seed(seed)
        x = _activations(m, k, dtype, seed)
        bias = torch.randn(4 * n, generator=gen).to(dtype) if with_bias else None
        w_t = _ternary(4 * n, k, seed)
        scale = torch.tensor([0.01], dtype=dtype)
        got = ops.ternary_linear(x.to(DEVICE), pack_ternary(w_t).to(DEVICE), scale.to(DEVICE), None if bias is None else bias.to(DEVICE))
        assert_bit_equal(got, _reference_linear(x, w_t, scale, bias, per_row=False), f"ternary_linear M={m} K={k} N={4 * n}")
        w8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8)
        scales8 = torch.rand(n, generator=gen)
        bias8 = None if bias is None else bias[:n]
        got8 = ops.int8_linear(x.to(DEVICE), w8.to(DEVICE), scales8.to(DEVICE), None if bias8 is None else bias8.to(DEVICE))
        assert_bit_equal(got8, _reference_linear(x, w8, scales8, bias8, per_row=True), f"int8_linear M={m} K={k} N={n}")

    check()


def test_linear_ops_refuse_mismatched_inputs() -> None:
    packed = torch.zeros(3, 16, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="K of x"):
        ops.ternary_linear(torch.randn(2, 15, device=DEVICE), packed, torch.ones(1, device=DEVICE))
    with pytest.raises(TypeError, match="uint8"):
        ops.ternary_matmul(torch.zeros(2, 16, dtype=torch.int8, device=DEVICE), packed.to(torch.int8))
    with pytest.raises(ValueError, match="one scale per output row"):
        ops.int8_linear(torch.randn(2, 16, device=DEVICE), torch.zeros(5, 16, dtype=torch.int8, device=DEVICE), torch.ones(4, device=DEVICE))
    with pytest.raises(RuntimeError, match="device"):
        ops.ternary_linear(torch.randn(2, 16, device=DEVICE), packed.cpu(), torch.ones(1, device=DEVICE))


# ------------------------------------------------------------------------------------------------ op contract


def _opcheck_cases():
    x = torch.randn(5, 100, device=DEVICE, dtype=torch.bfloat16)
    x_big = torch.randn(40, 100, device=DEVICE)
    packed = pack_ternary(_ternary(12, 100, seed=9)).to(DEVICE)
    scale = torch.tensor([0.03], device=DEVICE)
    bias = torch.randn(12, device=DEVICE)
    w8 = torch.randint(-127, 128, (7, 100), dtype=torch.int16).to(torch.int8).to(DEVICE)
    return [
        ("quantize_activation", (x,)),
        ("ternary_matmul", (ops.quantize_activation(x)[0], packed)),
        ("ternary_matmul", (ops.quantize_activation(x_big)[0], packed)),
        ("ternary_linear", (x, packed, scale, bias)),
        ("ternary_linear", (x_big, packed, scale, None)),
        ("quantize_pack_weight", (torch.randn(12, 100, device=DEVICE),)),
        ("int8_linear", (x, w8, torch.rand(7, device=DEVICE), None)),
        ("int8_linear", (x_big, w8, torch.rand(7, device=DEVICE), torch.randn(7, device=DEVICE))),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck_on_cuda(case) -> None:
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.bitnet, name).default, args)


@pytest.mark.parametrize(("m", "k", "n"), [(1, 2560, 6912), (16, 6912, 2560), (64, 2560, 6912)])
def test_ternary_linear_captures_in_a_cuda_graph(m, k, n) -> None:
    w_t = _ternary(n, k, seed=11)
    packed = pack_ternary(w_t).to(DEVICE)
    scale = torch.tensor([0.01], device=DEVICE, dtype=torch.bfloat16)
    static_x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (lazy initialisation, kernel attributes)
            ops.ternary_linear(static_x, packed, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = ops.ternary_linear(static_x, packed, scale)
    for seed in (1, 2):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        static_x.copy_(x.to(DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert_bit_equal(static_y, _reference_linear(x, w_t, scale, None, per_row=False), f"graph replay {seed}")


def test_packed_layer_compiles_with_fullgraph_on_cuda() -> None:
    layer = PackedBitLinear.from_bitlinear(BitLinear(256, 128, bias=True)).to(DEVICE)
    compiled = torch.compile(layer, fullgraph=True)
    for m in (1, 33):
        x = torch.randn(2, m, 256, device=DEVICE)
        assert_bit_equal(compiled(x), layer(x), f"torch.compile M={m}")


# ------------------------------------------------------------------------------------------------ training path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitlinear_trains_on_cuda_like_on_cpu(dtype) -> None:
    """Forward and STE backward on CUDA agree with the CPU run (the absmean may differ by float reduction order)."""
    torch.manual_seed(0)
    cpu_layer = BitLinear(256, 96, bias=True, dtype=dtype)
    gpu_layer = BitLinear(256, 96, bias=True, dtype=dtype).to(DEVICE)
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    x = torch.randn(4, 33, 256, dtype=dtype)
    x_cpu = x.clone().requires_grad_(True)
    x_gpu = x.to(DEVICE).requires_grad_(True)
    y_cpu, y_gpu = cpu_layer(x_cpu), gpu_layer(x_gpu)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, **tol)
    grad = torch.randn_like(y_cpu)
    y_cpu.backward(grad)
    y_gpu.backward(grad.to(DEVICE))
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, **tol)
    torch.testing.assert_close(gpu_layer.weight.grad.cpu(), cpu_layer.weight.grad, **tol)
    torch.testing.assert_close(gpu_layer.bias.grad.cpu(), cpu_layer.bias.grad, **tol)


def test_bitlinear_packs_on_cuda_into_the_same_weights() -> None:
    layer = BitLinear(128, 64, bias=False).to(DEVICE)
    packed = layer.pack()
    assert packed.weight.is_cuda
    w_t = unpack_ternary(packed.weight.cpu())
    ref_packed, _ = _reference_ops.quantize_pack_weight(layer.weight.detach())
    assert_bit_equal(packed.weight, ref_packed, "packed weight")
    assert torch.equal(w_t, unpack_ternary(ref_packed.cpu()))
