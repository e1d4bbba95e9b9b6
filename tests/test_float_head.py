"""bitnet::float_linear (the bandwidth-bound float lm_head) and FastLinear, the model's head.

Every GEMV path (scalar, avx2, avx512, avx512_bf16, as far as this CPU has them) is forced through the
``bitnet::_float_gemv_isa`` hook and compared with a float64 product of the very same (bf16-rounded) inputs.
The paths differ from F.linear only in the order of the fp32 additions, so the bound is
``1e-5 * (|x| @ |w|.T)`` for the fp32 accumulation plus one rounding of the output dtype.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import transformers

from bitnet_torch import _reference_ops, ops
from bitnet_torch.models import BitNetConfig, BitNetForCausalLM
from bitnet_torch.nn import FastLinear, Int8Linear

ACC_RTOL = 1e-5
#: Relative size of one rounding to the output dtype (half an ulp, doubled for slack).
#: fp32 (and float64, computed in fp32) still round once when the bias is added to the fp32 sum.
OUT_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-23}
#: Absolute rounding of tiny results: float16 subnormals are 2**-24 apart.
OUT_ABS = {torch.float16: 2.0**-24}

needs_extension = pytest.mark.skipif(not ops.extension_loaded(), reason=f"compiled kernels unavailable: {ops.extension_error()}")


def _gemv_paths() -> list[str]:
    return list(torch.ops.bitnet._float_gemv_isa_available()) if ops.extension_loaded() else []


@pytest.fixture(params=["scalar", "avx2", "avx512", "avx512_bf16"])
def gemv_path(request):
    if not ops.extension_loaded():
        pytest.skip(f"compiled kernels unavailable: {ops.extension_error()}")
    if request.param not in _gemv_paths():
        pytest.skip(f"this CPU does not support the {request.param} GEMV path")
    assert torch.ops.bitnet._float_gemv_isa(request.param) == request.param
    yield request.param
    torch.ops.bitnet._float_gemv_isa("auto")


def _operands(M, K, N, x_dtype, w_dtype, bias, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed + 1000 * M + 10 * K + N)
    x = torch.randn(*(lead or (M,)), K, generator=g).to(x_dtype)
    w = torch.randn(N, K, generator=g).to(w_dtype)
    b = torch.randn(N, generator=g) if bias else None
    return x, w, b


def _products(x, w):
    """float64 x @ w.T of the same inputs, and |x| @ |w|.T (fp32 is plenty for a tolerance scale)."""
    return x.double() @ w.double().T, x.float().abs() @ w.float().abs().T


@functools.lru_cache(maxsize=None)
def _grid_case(M, K, N, x_dtype, w_dtype):
    """Operands and products of one grid shape, shared by every GEMV path (the float64 product is the slow part)."""
    x, w, _ = _operands(M, K, N, x_dtype, w_dtype, bias=False)
    return x, w, _products(x, w)


def assert_close_to_float64(y, x, w, b, what="", products=None):
    """|y - ref| <= ACC_RTOL * (|x| @ |w|.T) + OUT_EPS * (|ref| + |b|), ref in float64 of the same inputs."""
    assert y.dtype == x.dtype, f"{what}: dtype {y.dtype} != {x.dtype}"
    assert y.shape == x.shape[:-1] + (w.shape[0],), f"{what}: shape {tuple(y.shape)}"
    ref, scale = products if products is not None else _products(x, w)
    ref, scale = ref.reshape(y.shape), scale.double().reshape(y.shape)
    b_abs = torch.zeros(()) if b is None else b.double().abs()
    if b is not None:
        ref = ref + b.double()
    tol = ACC_RTOL * scale + OUT_EPS[x.dtype] * (ref.abs() + b_abs) + OUT_ABS.get(x.dtype, 1e-30)
    err = (y.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {y.numel()} outside tolerance, max err/tol {(err / tol).max():.3g}"


SHAPES = [(M, K, N) for M in (0, 1, 3, 8, 9, 64) for K in (1, 7, 2560) for N in (1, 5, 4096)]


@needs_extension
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_every_path_matches_float64(gemv_path, x_dtype, w_dtype):
    for M, K, N in SHAPES:
        if M > 8 and x_dtype == w_dtype and gemv_path != _gemv_paths()[-1]:
            continue  # prefill with one dtype goes to at::linear whatever the GEMV path: checked once
        if gemv_path == "scalar" and M * K * N > 3_000_000:
            continue  # the scalar loop on the big shapes costs seconds; the small ones cover it
        if M * K * N > 100_000_000 and gemv_path != _gemv_paths()[-1]:
            continue  # 64 tokens x the 10M-element weight: the token-chunk loop is the same as for M = 9
        x, w, products = _grid_case(M, K, N, x_dtype, w_dtype)
        for b in (None, torch.randn(N, generator=torch.Generator().manual_seed(N))):
            y = ops.float_linear(x, w, b)
            what = f"{gemv_path} M={M} K={K} N={N} x={x_dtype} w={w_dtype} bias={b is not None}"
            assert_close_to_float64(y, x, w, b, what, products)


@needs_extension
def test_head_shape_every_path_and_token_count(gemv_path):
    """K = 2560 (the 2B-4T hidden size), rows not a multiple of the 4-row block, 1..8 tokens."""
    for M in (1, 2, 4, 5, 8):
        x, w, b = _operands(M, 2560, 1027, torch.bfloat16, torch.bfloat16, bias=M % 2 == 0, seed=3)
        assert_close_to_float64(ops.float_linear(x, w, b), x, w, b, f"{gemv_path} M={M}")


@needs_extension
def test_three_d_and_non_contiguous_inputs(gemv_path):
    for x_dtype, w_dtype in [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)]:
        x, w, b = _operands(0, 40, 37, x_dtype, w_dtype, bias=True, lead=(2, 3))
        assert_close_to_float64(ops.float_linear(x, w, b), x, w, b, "3-D")
        wide = torch.randn(3, 80).to(x_dtype)
        strided = wide[:, ::2]  # [3, 40], row stride 80, column stride 2
        assert not strided.is_contiguous()
        assert_close_to_float64(ops.float_linear(strided, w, None), strided, w, None, "non-contiguous")
        transposed = torch.randn(40, 4).to(x_dtype).T
        assert_close_to_float64(ops.float_linear(transposed, w, b), transposed, w, b, "transposed")


@needs_extension
def test_paths_agree_with_each_other_and_the_reference():
    x, w, b = _operands(2, 300, 70, torch.bfloat16, torch.bfloat16, bias=True)
    ref = _reference_ops.float_linear(x, w, b)
    for path in _gemv_paths():
        torch.ops.bitnet._float_gemv_isa(path)
        try:
            got = ops.float_linear(x, w, b)
        finally:
            torch.ops.bitnet._float_gemv_isa("auto")
        # both are bf16 roundings of fp32 sums that differ by a few fp32 ulps: at most one bf16 ulp apart
        torch.testing.assert_close(got, ref, rtol=2.0**-7, atol=1e-6, msg=path)


@needs_extension
def test_path_hook_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown path"):
        torch.ops.bitnet._float_gemv_isa("sse9")
    assert torch.ops.bitnet._float_gemv_isa("") == _gemv_paths()[-1]
    assert "scalar" in _gemv_paths()


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)),
        (torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16), None),
        (torch.randn(12, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(8)),
        (torch.randn(1, 16), torch.randn(8, 16, dtype=torch.bfloat16), None),
    ],
    ids=["fp32-bias", "bf16-3d", "bf16-prefill", "mixed"],
)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.bitnet.float_linear.default, args)


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(8, 16)
    with pytest.raises(TypeError, match="weight must be bfloat16 or float32"):
        ops.float_linear(torch.randn(2, 16), w.half())
    with pytest.raises(TypeError, match="floating-point"):
        ops.float_linear(torch.ones(2, 16, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="K of x and weight differ"):
        ops.float_linear(torch.randn(2, 15), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.float_linear(torch.randn(2, 16), w, torch.randn(7))


def test_reference_is_f_linear_in_fp32():
    x, w, b = _operands(4, 33, 9, torch.bfloat16, torch.bfloat16, bias=True)
    expected = F.linear(x.float(), w.float(), b).to(torch.bfloat16)
    assert torch.equal(_reference_ops.float_linear(x, w, b), expected)


def test_cuda_tensors_are_served():
    """Nothing is compiled for CUDA: ops.py registers the reference for that key (with or without the extension)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bitnet::float_linear", "CUDA")
    assert "float_linear" in ops.OP_SCHEMAS


def test_fallback_without_extension_uses_the_reference():
    code = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("ignore")
        import torch
        from bitnet_torch import ops, _reference_ops
        from bitnet_torch.nn import FastLinear
        assert not ops.extension_loaded()
        x, w = torch.randn(3, 20, dtype=torch.bfloat16), torch.randn(6, 20, dtype=torch.bfloat16)
        assert torch.equal(ops.float_linear(x, w, None), _reference_ops.float_linear(x, w, None))
        layer = FastLinear(20, 6).to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(layer(x), _reference_ops.float_linear(x, layer.weight, layer.bias))
        print("fallback ok")
        """
    )
    env = {**os.environ, "BITNET_TORCH_NO_EXT": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ FastLinear


def test_fast_linear_uses_the_op_only_for_inference(monkeypatch):
    calls = []
    real = ops.float_linear
    monkeypatch.setattr(ops, "float_linear", lambda *a: calls.append(1) or real(*a))
    layer = FastLinear(32, 10, bias=True)
    x = torch.randn(2, 32)
    with torch.no_grad():
        y = layer(x)
    assert len(calls) == 1
    assert_close_to_float64(y, x, layer.weight.detach(), layer.bias.detach(), "no_grad")
    y_train = layer(x)  # weight requires grad: F.linear, and the gradients are nn.Linear's
    assert len(calls) == 1
    y_train.sum().backward()
    reference = torch.nn.Linear(32, 10)
    reference.load_state_dict(layer.state_dict())
    reference(x).sum().backward()
    assert torch.equal(layer.weight.grad, reference.weight.grad) and torch.equal(layer.bias.grad, reference.bias.grad)
    layer.requires_grad_(False)
    x_grad = x.clone().requires_grad_(True)
    layer(x_grad).sum().backward()  # a frozen head (LoRA) still passes gradients to its input
    assert len(calls) == 1 and x_grad.grad is not None
    layer(x)  # frozen head, input without grad: the op
    assert len(calls) == 2
    with torch.no_grad():
        layer.to(torch.float16)(x.half())  # an fp16 weight is not the kernel's: F.linear
    assert len(calls) == 2
    assert list(layer.state_dict()) == ["weight", "bias"]


def test_fast_linear_from_linear_shares_parameters():
    linear = torch.nn.Linear(8, 4, bias=False)
    fast = FastLinear.from_linear(linear)
    assert fast.weight is linear.weight and fast.bias is None


def _tiny_config(**overrides) -> BitNetConfig:
    values = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return BitNetConfig(**values)


@pytest.mark.parametrize("tied", [True, False])
def test_model_head_is_fast_tied_and_matches_transformers(tied, tmp_path):
    torch.manual_seed(5)
    model = BitNetForCausalLM(_tiny_config(tie_word_embeddings=tied)).eval()
    assert isinstance(model.lm_head, FastLinear)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    model.save_pretrained(tmp_path, packed=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in set(f.keys())) == (not tied)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))  # 6 tokens: the GEMV path
    with torch.no_grad():
        ours = model(ids).logits
        with torch._dynamo.config.patch(disable=True):
            theirs = transformers.BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    loaded = BitNetForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.lm_head, FastLinear)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_bf16_model_decode_logits_equal_f_linear_head():
    torch.manual_seed(6)
    model = BitNetForCausalLM(_tiny_config()).to(torch.bfloat16).eval()
    ids = torch.randint(3, 256, (1, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        logits = model(ids).logits
        expected = F.linear(hidden, model.lm_head.weight)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected, rtol=2.0**-7, atol=1e-3)
    assert_close_to_float64(logits, hidden, model.lm_head.weight, None, "bf16 model head")


def test_int8_head_option_still_replaces_the_head():
    model = BitNetForCausalLM(_tiny_config(quantize_lm_head=True))
    assert isinstance(model.lm_head, Int8Linear)
