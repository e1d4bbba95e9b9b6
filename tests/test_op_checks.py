"""One validation per op, shared by every backend (``bitnet_torch._op_checks`` and its C++ mirror).

Each bad input below goes through the compiled op (``torch.ops.bitnet.*`` with the extension) and through the
pure-PyTorch fallback (the reference behind the op checks, in this process via ``ops.checked_reference`` and in a
``BITNET_TORCH_NO_EXT=1`` subprocess via ``torch.ops.bitnet.*``): both must refuse it with the same kind of error
(``TypeError`` for a dtype, ``ValueError`` for a shape) and a message naming the problem. ``K = 0`` is valid on
every backend and gives the same numbers (an empty dot product: the bias, or zeros). ``int8_linear`` refuses
``K >= 2**17`` as the ternary ops do, and is exact up to that bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bitnet_torch
from bitnet_torch import _op_checks, _reference_ops, ops

REPO_ROOT = Path(__file__).resolve().parent.parent

needs_extension = pytest.mark.skipif(not ops.extension_loaded(), reason=f"compiled kernels unavailable: {ops.extension_error()}")


def _packed(n: int, k: int) -> torch.Tensor:
    return bitnet_torch.pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n * 7 + k)))


def _decode_step_args(**changes) -> tuple:
    """Valid ``decode_step`` arguments of a one-layer model (hidden 8, 2 heads over 1 KV head of 4, FFN 8, vocab 10,
    2 cache slots of 4 positions) for two rows, with ``changes`` applied by argument name."""
    hidden, heads, kv_heads, head_dim, ffn, vocab, slots, positions = 8, 2, 1, 4, 8, 10, 2, 4
    shapes = [(heads * head_dim // 4, hidden), (kv_heads * head_dim // 4, hidden), (kv_heads * head_dim // 4, hidden),
              (hidden // 4, heads * head_dim), (ffn // 4, hidden), (ffn // 4, hidden), (hidden // 4, ffn)]
    args = dict(
        token_ids=torch.tensor([1, 2]), positions=torch.tensor([0, 0]), slots=torch.tensor([0, 1]),
        logit_rows=torch.tensor([0, 1]), embed=torch.randn(vocab, hidden), embed_scale=None,
        norms=torch.ones(3 * hidden + ffn + hidden), packed=[torch.full(s, 0x55, dtype=torch.uint8) for s in shapes],
        weight_scales=torch.ones(7), rope_cos=torch.ones(positions, head_dim), rope_sin=torch.zeros(positions, head_dim),
        head=torch.randn(vocab, hidden), head_scale=None,
        k_cache=torch.zeros(1, slots, kv_heads, positions, head_dim), v_cache=torch.zeros(1, slots, kv_heads, positions, head_dim),
        num_heads=heads, num_kv_heads=kv_heads, eps=1e-5, attn_scale=0.5,
    )
    args.update(changes)
    return tuple(args.values())


def bad_cases() -> list[tuple[str, str, tuple, type, str]]:
    """``(case id, op, args, error type, message fragment)`` for inputs every backend must refuse."""
    f = torch.randn
    q, k, v = f(2, 4, 2, 8), f(2, 2, 5, 8), f(2, 2, 5, 8)
    p, s1 = _packed(8, 16), torch.ones(1)
    w8, s8 = torch.ones(8, 16, dtype=torch.int8), torch.ones(8)
    x = f(3, 16)
    big = 140000
    return [
        # decode_step
        ("step-cache-4d", "decode_step", _decode_step_args(k_cache=torch.zeros(2, 1, 4, 4)), ValueError, "k_cache must be 5-D"),
        ("step-cache-int", "decode_step", _decode_step_args(k_cache=torch.zeros(1, 2, 1, 4, 4, dtype=torch.int32)), TypeError, "k_cache must be float32"),
        ("step-kv-heads", "decode_step", _decode_step_args(num_kv_heads=2), ValueError, "must be a positive multiple of num_kv_heads"),
        ("step-packed-count", "decode_step", _decode_step_args(packed=[torch.zeros(2, 8, dtype=torch.uint8)] * 6), ValueError, "7 weights per layer"),
        ("step-packed-shape", "decode_step", _decode_step_args(packed=[torch.zeros(2, 8, dtype=torch.uint8)] * 7), ValueError, "packed[1] must have shape"),
        ("step-v-cache", "decode_step", _decode_step_args(v_cache=torch.zeros(1, 2, 1, 3, 4)), ValueError, "v_cache must have shape"),
        ("step-int32-ids", "decode_step", _decode_step_args(token_ids=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "token_ids must be"),
        ("step-no-tokens", "decode_step", _decode_step_args(token_ids=torch.zeros(0, dtype=torch.int64)), ValueError, "at least one token"),
        ("step-token-range", "decode_step", _decode_step_args(token_ids=torch.tensor([1, 10])), ValueError, "token_ids[1] = 10 is out of range"),
        ("step-position-range", "decode_step", _decode_step_args(positions=torch.tensor([0, 4])), ValueError, "positions[1] = 4 is out of range"),
        ("step-same-entry", "decode_step", _decode_step_args(slots=torch.tensor([1, 1])), ValueError, "the same (slot, position)"),
        ("step-logit-rows", "decode_step", _decode_step_args(logit_rows=torch.tensor([2])), ValueError, "logit_rows[0] = 2 is out of range"),
        ("step-norms", "decode_step", _decode_step_args(norms=torch.ones(5)), ValueError, "norms must have shape"),
        ("step-int-head", "decode_step", _decode_step_args(head=torch.ones(10, 8, dtype=torch.int8)), TypeError, "head must be bfloat16 or float32"),
        # rms_norm
        ("rms-int32-x", "rms_norm", (torch.ones(2, 4, dtype=torch.int32), torch.ones(4), 1e-6), TypeError, "float32, bfloat16 or float16"),
        ("rms-f64-x", "rms_norm", (f(2, 4, dtype=torch.float64), torch.ones(4), 1e-6), TypeError, "float32, bfloat16 or float16"),
        ("rms-int-weight", "rms_norm", (f(2, 4), torch.ones(4, dtype=torch.int64), 1e-6), TypeError, "weight must be float32"),
        ("rms-weight-shape", "rms_norm", (f(2, 4), torch.ones(5), 1e-6), ValueError, "weight must have shape [hidden]"),
        ("rms-0d", "rms_norm", (torch.tensor(1.0), torch.ones(1), 1e-6), ValueError, "weight must have shape [hidden]"),
        # rotary_embedding
        ("rot-odd-head-dim", "rotary_embedding", (f(1, 2, 3, 5), f(1, 1, 3, 5), f(1, 3, 5), f(1, 3, 5)), ValueError, "head_dim must be even"),
        ("rot-dtype", "rotary_embedding", (f(1, 2, 3, 4), f(1, 1, 3, 4), f(1, 3, 4).half(), f(1, 3, 4)), TypeError, "share a dtype"),
        ("rot-f64", "rotary_embedding", tuple(t.double() for t in (f(1, 2, 3, 4), f(1, 1, 3, 4), f(1, 3, 4), f(1, 3, 4))), TypeError, "float32, bfloat16 or float16"),
        ("rot-3d", "rotary_embedding", (f(2, 3, 4), f(1, 1, 3, 4), f(1, 3, 4), f(1, 3, 4)), ValueError, "must be 4-D"),
        ("rot-k-length", "rotary_embedding", (f(1, 2, 3, 4), f(1, 1, 2, 4), f(1, 3, 4), f(1, 3, 4)), ValueError, "differ in batch, length or head_dim"),
        ("rot-cos-shape", "rotary_embedding", (f(1, 2, 3, 4), f(1, 1, 3, 4), f(1, 2, 4), f(1, 2, 4)), ValueError, "cos and sin must be"),
        # decode_attention
        ("att-kv-shapes", "decode_attention", (q, k, f(2, 2, 5, 6), None, 1.0), ValueError, "same shape"),
        ("att-zero-kv-heads", "decode_attention", (q, f(2, 0, 5, 8), f(2, 0, 5, 8), None, 1.0), ValueError, "multiple of the key/value heads"),
        ("att-heads", "decode_attention", (f(2, 3, 2, 8), k, v, None, 1.0), ValueError, "multiple of the key/value heads"),
        ("att-batch", "decode_attention", (f(1, 4, 2, 8), k, v, None, 1.0), ValueError, "differ in batch or head_dim"),
        ("att-dtype", "decode_attention", (q, k.half(), v, None, 1.0), TypeError, "share a dtype"),
        ("att-int-q", "decode_attention", (q.int(), k.int(), v.int(), None, 1.0), TypeError, "floating-point"),
        ("att-3d", "decode_attention", (q[0], k, v, None, 1.0), ValueError, "must be 4-D"),
        ("att-mask-batch", "decode_attention", (q, k, v, torch.ones(3, 1, 1, 5, dtype=torch.bool), 1.0), ValueError, "batch = 2"),
        ("att-mask-heads", "decode_attention", (q, k, v, torch.ones(1, 3, 1, 5, dtype=torch.bool), 1.0), ValueError, "heads = 4"),
        ("att-mask-kv-heads", "decode_attention", (q, k, v, torch.ones(2, 2, 2, 5, dtype=torch.bool), 1.0), ValueError, "heads = 4"),
        ("att-mask-qlen", "decode_attention", (q, k, v, torch.zeros(1, 1, 3, 5), 1.0), ValueError, "q_len = 2"),
        ("att-mask-kvlen", "decode_attention", (q, k, v, torch.ones(1, 1, 1, 4, dtype=torch.bool), 1.0), ValueError, "kv_len = 5"),
        ("att-mask-3d", "decode_attention", (q, k, v, torch.ones(1, 2, 5, dtype=torch.bool), 1.0), ValueError, "attn_mask must be 4-D"),
        ("att-mask-dtype", "decode_attention", (q, k, v, torch.ones(1, 1, 1, 5, dtype=torch.int64), 1.0), TypeError, "attn_mask must be bool"),
        # quantize_activation
        ("qa-int", "quantize_activation", (torch.ones(2, 3, dtype=torch.int32),), TypeError, "floating-point"),
        ("qa-0d", "quantize_activation", (torch.tensor(1.0),), ValueError, "at least one dimension"),
        # ternary_matmul
        ("tm-uint8-xq", "ternary_matmul", (torch.ones(2, 16, dtype=torch.uint8), p), TypeError, "x_q must be int8"),
        ("tm-int8-packed", "ternary_matmul", (torch.ones(2, 16, dtype=torch.int8), p.to(torch.int8)), TypeError, "packed must be uint8"),
        ("tm-1d", "ternary_matmul", (torch.ones(16, dtype=torch.int8), p), ValueError, "x_q must be 2-D"),
        ("tm-k", "ternary_matmul", (torch.ones(2, 15, dtype=torch.int8), p), ValueError, "differ"),
        ("tm-big-k", "ternary_matmul", (torch.ones(1, big, dtype=torch.int8), torch.zeros(1, big, dtype=torch.uint8)), ValueError, "exceeds the supported maximum"),
        # ternary_linear
        ("tl-int-bias", "ternary_linear", (x, p, s1, torch.ones(8, dtype=torch.int64)), TypeError, "bias"),
        ("tl-bias-shape", "ternary_linear", (x, p, s1, torch.ones(1, 8)), ValueError, "bias must have shape [8]"),
        ("tl-int-x", "ternary_linear", (x.int(), p, s1, None), TypeError, "x must be a floating-point"),
        ("tl-int-scale", "ternary_linear", (x, p, torch.ones(1, dtype=torch.int32), None), TypeError, "weight_scale"),
        ("tl-scale-numel", "ternary_linear", (x, p, torch.ones(2), None), ValueError, "weight_scale must hold one element"),
        ("tl-int8-packed", "ternary_linear", (x, p.to(torch.int8), s1, None), TypeError, "packed must be uint8"),
        ("tl-k", "ternary_linear", (f(3, 15), p, s1, None), ValueError, "differ"),
        ("tl-0d", "ternary_linear", (torch.tensor(1.0), p, s1, None), ValueError, "at least one dimension"),
        ("tl-big-k", "ternary_linear", (f(1, big), torch.zeros(1, big, dtype=torch.uint8), s1, None), ValueError, "exceeds the supported maximum"),
        # ternary_linear_group
        ("tlg-empty", "ternary_linear_group", (x, [], [], []), ValueError, "at least one weight"),
        ("tlg-scales", "ternary_linear_group", (x, [p, p], [s1], [None, None]), ValueError, "weight scales"),
        ("tlg-biases", "ternary_linear_group", (x, [p], [s1], [None, None]), ValueError, "biases"),
        ("tlg-int-bias", "ternary_linear_group", (x, [p, p], [s1, s1], [None, torch.ones(8, dtype=torch.int32)]), TypeError, "bias[1]"),
        ("tlg-k", "ternary_linear_group", (x, [p, _packed(4, 15)], [s1, s1], [None, None]), ValueError, "packed[1]"),
        # quantize_pack_weight
        ("qpw-n", "quantize_pack_weight", (f(6, 16),), ValueError, "multiple of 4"),
        ("qpw-int", "quantize_pack_weight", (torch.ones(8, 16, dtype=torch.int32),), TypeError, "floating-point"),
        ("qpw-1d", "quantize_pack_weight", (f(16),), ValueError, "must be 2-D"),
        ("qpw-empty", "quantize_pack_weight", (f(4, 0),), ValueError, "empty weight"),
        # int8_linear
        ("i8-big-k", "int8_linear", (f(1, big), torch.zeros(2, big, dtype=torch.int8), torch.ones(2), None), ValueError, "exceeds the supported maximum"),
        ("i8-k-bound", "int8_linear", (f(1, 1 << 17), torch.zeros(1, 1 << 17, dtype=torch.int8), torch.ones(1), None), ValueError, "exceeds the supported maximum 131071"),
        ("i8-uint8-weight", "int8_linear", (x, w8.to(torch.uint8), s8, None), TypeError, "weight must be int8"),
        ("i8-scale-numel", "int8_linear", (x, w8, torch.ones(7), None), ValueError, "one scale per output row"),
        ("i8-int-scale", "int8_linear", (x, w8, torch.ones(8, dtype=torch.int32), None), TypeError, "weight_scale"),
        ("i8-int-bias", "int8_linear", (x, w8, s8, torch.ones(8, dtype=torch.int64)), TypeError, "bias"),
        ("i8-int-x", "int8_linear", (x.int(), w8, s8, None), TypeError, "x must be a floating-point"),
        ("i8-k", "int8_linear", (f(3, 15), w8, s8, None), ValueError, "differ"),
        # float_linear
        ("fl-int-bias", "float_linear", (x, f(8, 16), torch.ones(8, dtype=torch.int64)), TypeError, "bias must be floating-point"),
        ("fl-half-weight", "float_linear", (x, f(8, 16).half(), None), TypeError, "weight must be bfloat16 or float32"),
        ("fl-int-x", "float_linear", (x.int(), f(8, 16), None), TypeError, "floating-point"),
        ("fl-k", "float_linear", (f(3, 15), f(8, 16), None), ValueError, "K of x and weight differ"),
    ]


def empty_k_cases() -> list[tuple[str, str, tuple]]:
    """``(case id, op, args)`` with K = 0: valid on every backend (an empty dot product)."""
    bias = torch.arange(8, dtype=torch.float32) - 3.5
    p0 = torch.zeros(2, 0, dtype=torch.uint8)
    w0 = torch.zeros(8, 0, dtype=torch.int8)
    cases = []
    for m in (0, 1, 3, 11):
        x = torch.zeros(m, 0)
        cases += [
            (f"qa-m{m}", "quantize_activation", (x,)),
            (f"tm-m{m}", "ternary_matmul", (torch.zeros(m, 0, dtype=torch.int8), p0)),
            (f"tl-m{m}", "ternary_linear", (x, p0, torch.tensor([0.5]), bias)),
            (f"tl-nobias-m{m}", "ternary_linear", (x.bfloat16(), p0, torch.tensor([0.5]), None)),
            (f"tl-nan-scale-m{m}", "ternary_linear", (x, p0, torch.tensor([float("nan")]), None)),
            (f"tlg-m{m}", "ternary_linear_group", (x, [p0, p0], [torch.tensor([0.5]), torch.tensor([2.0])], [bias, None])),
            (f"i8-m{m}", "int8_linear", (x, w0, torch.rand(8, generator=torch.Generator().manual_seed(m)), bias)),
            (f"i8-nobias-m{m}", "int8_linear", (x.half(), w0, torch.ones(8), None)),
            (f"fl-m{m}", "float_linear", (x, torch.zeros(8, 0), bias)),
        ]
    cases.append(("i8-3d", "int8_linear", (torch.zeros(2, 3, 0), w0, torch.ones(8), bias)))
    return cases


def _error_of(fn, args) -> tuple[str, str] | None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the kind of error is what is compared
        return type(exc).__name__, str(exc).splitlines()[0]
    return None


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_cases_cover_every_op_and_every_op_has_a_check():
    ops_covered = {op for _, op, *_ in bad_cases()}
    assert ops_covered == set(ops.OP_SCHEMAS), set(ops.OP_SCHEMAS) ^ ops_covered
    for name in ops.OP_SCHEMAS:
        assert callable(getattr(_op_checks, f"check_{name}", None)), f"no check for {name}"


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c[0])
def test_reference_refuses_like_the_op_contract(case):
    """The fallback's implementation (the reference behind the checks) refuses each bad input as specified."""
    _, op, args, kind, fragment = case
    error = _error_of(ops.checked_reference(op), args)
    assert error is not None, f"the reference accepted {op}{tuple(getattr(a, 'shape', a) for a in args)}"
    assert error[0] == kind.__name__ and fragment in error[1], error


@needs_extension
@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c[0])
def test_compiled_op_refuses_the_same_way(case):
    """The compiled op (direct torch.ops call, the C++ checks) refuses it with the same kind of error and text."""
    _, op, args, kind, fragment = case
    error = _error_of(getattr(torch.ops.bitnet, op), args)
    assert error is not None, f"the compiled op accepted {op}{tuple(getattr(a, 'shape', a) for a in args)}"
    assert error[0] == kind.__name__ and fragment in error[1], error


@needs_extension
@pytest.mark.parametrize("case", empty_k_cases(), ids=lambda c: c[0])
def test_empty_k_gives_the_same_numbers_on_both_backends(case):
    _, op, args = case
    compiled = _as_list(getattr(torch.ops.bitnet, op)(*args))
    reference = _as_list(ops.checked_reference(op)(*args))
    assert len(compiled) == len(reference)
    for c, r in zip(compiled, reference):
        assert c.dtype == r.dtype and c.shape == r.shape, (c.dtype, r.dtype, c.shape, r.shape)
        assert torch.equal(torch.isnan(c), torch.isnan(r)) if c.is_floating_point() else True
        assert torch.equal(c.nan_to_num(-7.0), r.nan_to_num(-7.0)) if c.is_floating_point() else torch.equal(c, r)


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from bitnet_torch import ops
    assert not ops.extension_loaded()
    spec = importlib.util.spec_from_file_location("cases", sys.argv[1])
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    errors = {}
    for case_id, op, args, _, _ in cases.bad_cases():
        errors[case_id] = cases._error_of(getattr(torch.ops.bitnet, op), args)
    outputs = {}
    for case_id, op, args in cases.empty_k_cases():
        outputs[case_id] = [t.double().nan_to_num(-7.0).tolist() for t in cases._as_list(getattr(torch.ops.bitnet, op)(*args))]
    print(json.dumps({"errors": errors, "outputs": outputs}))
    """
)


@pytest.mark.slow
def test_fallback_without_extension_refuses_and_accepts_the_same_inputs():
    """Under BITNET_TORCH_NO_EXT=1, torch.ops.bitnet.* refuse every bad input with the same kind of error and
    message as the op contract, and K = 0 gives the numbers of the compiled ops (or of the reference)."""
    env = {**os.environ, "BITNET_TORCH_NO_EXT": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for case_id, _, _, kind, fragment in bad_cases():
        error = result["errors"][case_id]
        assert error is not None, f"{case_id}: the fallback accepted it"
        assert error[0] == kind.__name__ and fragment in error[1], (case_id, error)
    for case_id, op, args in empty_k_cases():
        fn = getattr(torch.ops.bitnet, op) if ops.extension_loaded() else ops.checked_reference(op)
        expected = [t.double().nan_to_num(-7.0).tolist() for t in _as_list(fn(*args))]
        assert result["outputs"][case_id] == expected, case_id


# --------------------------------------------------------------------------------------------- int8 K bound



@pytest.mark.parametrize("m", [1, 9])
def test_int8_linear_is_exact_at_the_largest_k(isa, m):
    """K = 2**17 - 1 with the largest products (127 * -128): the int32 sum -2130690048 does not wrap."""
    k = _op_checks.MAX_K - 1
    x = torch.ones(m, k)
    weight = torch.full((3, k), -128, dtype=torch.int8)
    weight[1] = 127
    weight[2, ::2] = 1
    w_scale = torch.ones(3)
    y = ops.int8_linear(x, weight, w_scale)
    assert torch.equal(y, _reference_ops.int8_linear(x, weight, w_scale, None))
    x_scale = torch.tensor(1.0) / 127
    exact = torch.tensor([127 * -128 * k, 127 * 127 * k, 127 * ((k + 1) // 2) - 128 * 127 * (k // 2)], dtype=torch.float64)
    assert torch.equal(y[0].double(), (exact.float() * (x_scale * 1.0)).double())


def test_max_k_matches_the_compiled_bound():
    assert _op_checks.MAX_K == 1 << 17
