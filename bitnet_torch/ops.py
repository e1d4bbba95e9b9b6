"""Python face of the ``torch.ops.bitnet`` operators: schemas, fake kernels, fallback, wrappers.

The op contract (every backend -- CPU C++, CUDA, the pure-PyTorch fallback -- implements exactly this;
the numbers are defined by :mod:`bitnet_torch._reference_ops`):

``quantize_activation(Tensor x) -> (Tensor x_q, Tensor scale)``
    ``x`` fp32/bf16/fp16 ``[..., K]`` → int8 ``[..., K]`` and fp32 ``[..., 1]`` (SPEC §1, scale = absmax/127).
``ternary_matmul(Tensor x_q, Tensor packed) -> Tensor``
    int8 ``[M, K]`` × packed uint8 ``[N/4, K]`` (SPEC §3) → exact int32 ``[M, N]``.
``ternary_linear(Tensor x, Tensor packed, Tensor weight_scale, Tensor? bias) -> Tensor``
    float ``[..., K]`` → quantize → ternary matmul → ``float(acc) * (x_scale * weight_scale) + bias``
    (fp32) → ``[..., N]`` in ``x.dtype``. ``weight_scale``: one element, multiply convention (mean |W|).
``ternary_linear_group(Tensor x, Tensor[] packed, Tensor[] weight_scale, Tensor?[] bias) -> Tensor[]``
    ``[ternary_linear(x, packed[i], weight_scale[i], bias[i]) for i]``, bit for bit, with ``x`` quantized
    once and (CPU decode) one parallel pass over all the weights: the q/k/v and gate/up projections of a layer.
``quantize_pack_weight(Tensor w) -> (Tensor packed, Tensor scale)``
    float ``[N, K]`` → packed uint8 ``[N/4, K]`` and the fp32 0-dim absmean scale.
``int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor``
    float ``[..., K]`` × int8 ``[N, K]`` with fp32 per-row scales ``[N]`` → ``[..., N]`` in ``x.dtype``
    (the int8 ``lm_head``): ``float(acc) * (x_scale * weight_scale[n]) + bias``.
``float_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor``
    float ``[..., K]`` × bf16/fp32 ``[N, K]`` → ``F.linear`` with fp32 accumulation, ``[..., N]`` in ``x.dtype``
    (the float ``lm_head``; the CPU kernel streams the weight at memory bandwidth for decode, M <= 8 tokens).
    CPU only: CUDA tensors use the reference (registered below), which is ``F.linear`` in fp32.
``decode_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale) -> Tensor``
    ``F.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale, enable_gqa=True)`` bit for bit, no dropout,
    not causal (the mask says it all): q ``[B, Hq, L, D]``, k/v ``[B, Hkv, S, D]`` (``Hq`` a multiple of
    ``Hkv``), mask bool (True = attend) or additive in q's dtype, ``[B|1, Hq|1, L|1, S]``. For decoding from a
    KV cache: the CPU kernel skips the cache positions no query may attend (a static cache's unused tail) and,
    for one query token, attends each KV head once with its query heads as rows. No autograd formula
    (inference only). CUDA tensors use the reference.
``rms_norm(Tensor x, Tensor weight, float eps) -> Tensor``
    BitNet's RMSNorm, ``weight * (x32 * rsqrt(mean(x32**2) + eps)).to(x.dtype)`` (Transformers'
    ``BitNetRMSNorm``), in one pass per row; equal to that composite up to its sum of squares, which the op
    accumulates in double (the fp32 squares, rounded once) where torch sums in fp32 in another order.
    No autograd formula (inference only). CUDA tensors use the reference.
``rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)``
    Transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (q/k ``[B, H, L, D]``, cos/sin ``[B|1, L, D]``, one
    dtype), bit for bit, in one pass. No autograd formula (inference only). CUDA tensors use the reference.
``decode_step(token_ids, positions, slots, logit_rows, embed, embed_scale, norms, packed, weight_scales, rope_cos,
rope_sin, head, head_scale, k_cache!, v_cache!, num_heads, num_kv_heads, eps, attn_scale) -> Tensor``
    One whole forward step of a packed BitNet model for R rows (row r: token ``token_ids[r]`` of the sequence in
    cache slot ``slots[r]`` at position ``positions[r]``; it attends to that slot's positions ``[0, positions[r]]``),
    writing each row's keys/values into ``k_cache``/``v_cache`` ``[layers, slots, kv_heads, positions, head_dim]``
    (model dtype) in place; returns fp32 logits ``[len(logit_rows), vocab]`` of the rows ``logit_rows``. The layout
    of the other arguments: :mod:`bitnet_torch.models.engine` (which builds them) and ``csrc/cpu/decode_engine.h``.
    Every row is computed independently of the others (batch invariant, bit for bit). CPU (the reference serves
    other devices and the fallback).

The schemas are declared in C++ (``csrc/ops.cpp``) when the extension is available; otherwise this
module declares the same schemas from Python and registers the reference implementation, after logging
one warning that says why. Either way, callers use ``torch.ops.bitnet.*`` or the wrappers below.

Every backend accepts and refuses the same inputs: :mod:`bitnet_torch._op_checks` holds one check per op
(``TypeError`` for a dtype, ``ValueError`` for a shape, e.g. ``K >= 2**17`` for the integer linears), which the
registrations of the reference (the fallback, and the CUDA implementation of the reference-only ops) run first
(:func:`checked_reference`) and which the C++ bindings mirror. ``K = 0`` is valid everywhere (outputs
``0 * scale + bias``). Non-finite inputs propagate as in the reference: a token holding a NaN or an infinity
quantizes to all-zero codes with the scale NaN or +inf, so its linear outputs are NaN (see ``_reference_ops``).
"""

from __future__ import annotations

import logging
import warnings

import torch

from . import _op_checks, _reference_ops
from ._autograd import records_autograd, refuse_untracked_bias_gradients, register_autograd_formulas

__all__ = [
    "OP_SCHEMAS",
    "checked_reference",
    "quantize_activation",
    "ternary_matmul",
    "ternary_linear",
    "ternary_linear_group",
    "quantize_pack_weight",
    "int8_linear",
    "float_linear",
    "decode_attention",
    "rms_norm",
    "rotary_embedding",
    "decode_step",
    "eager_cpu_inference",
    "extension_loaded",
    "extension_error",
]

logger = logging.getLogger(__name__)

#: The operator schemas, name → schema; identical to those declared in ``csrc/ops.cpp`` (tested).
OP_SCHEMAS: dict[str, str] = {
    "quantize_activation": "quantize_activation(Tensor x) -> (Tensor, Tensor)",
    "ternary_matmul": "ternary_matmul(Tensor x_q, Tensor packed) -> Tensor",
    "ternary_linear": "ternary_linear(Tensor x, Tensor packed, Tensor weight_scale, Tensor? bias) -> Tensor",
    "ternary_linear_group": (
        "ternary_linear_group(Tensor x, Tensor[] packed, Tensor[] weight_scale, Tensor?[] bias) -> Tensor[]"
    ),
    "quantize_pack_weight": "quantize_pack_weight(Tensor w) -> (Tensor, Tensor)",
    "int8_linear": "int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor",
    "float_linear": "float_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "decode_attention": "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale) -> Tensor",
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "rotary_embedding": "rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)",
    # -- decode engine (issue 12) --
    "decode_step": (
        "decode_step(Tensor token_ids, Tensor positions, Tensor slots, Tensor logit_rows, Tensor embed, "
        "Tensor? embed_scale, Tensor norms, Tensor[] packed, Tensor weight_scales, Tensor rope_cos, Tensor rope_sin, "
        "Tensor head, Tensor? head_scale, Tensor(a!) k_cache, Tensor(b!) v_cache, int num_heads, int num_kv_heads, "
        "float eps, float attn_scale) -> Tensor"
    ),
}

#: Ops that no backend implements for CUDA by design: the reference registered for CUDA tensors is their
#: intended CUDA implementation, so it does not mean "the compiled CUDA kernels are missing".
_REFERENCE_ON_CUDA = frozenset({"float_linear", "decode_attention", "rms_norm", "rotary_embedding", "decode_step"})

_extension_error: str | None = None
_fallback_library: torch.library.Library | None = None
_cuda_reference_library: torch.library.Library | None = None
#: Keeps alive the CUDA registrations of the reference for the ops in ``_REFERENCE_ON_CUDA``.
_reference_only_cuda_library: list[torch.library.Library] = []


def _load_extension() -> str | None:
    """Load the compiled extension; return None on success, else the reason it is unavailable."""
    try:
        from . import _build
    except ImportError as exc:  # pragma: no cover - the module is part of the package
        return f"the build helper is missing ({exc})"
    return _build.load_extension()


def checked_reference(name: str):
    """The reference implementation of op ``name`` behind the op's argument checks (:mod:`._op_checks`): what the
    fallback and the CUDA registrations of the reference run, so they refuse exactly what the compiled ops refuse."""
    reference = getattr(_reference_ops, name)
    check = getattr(_op_checks, f"check_{name}", None)
    if check is None:
        return reference

    def run(*args):
        check(*args)
        return reference(*args)

    run.__name__ = run.__qualname__ = f"checked_{name}"
    run.__doc__ = reference.__doc__
    return run


def _define_fallback() -> None:
    """Declare the schemas from Python and register the pure-PyTorch reference (behind the op checks) for every
    device: CompositeExplicitAutograd serves any backend, and the explicit CPU and CUDA registrations say so to
    dispatcher queries (``_dispatch_has_kernel_for_dispatch_key``), as with the extension."""
    global _fallback_library
    lib = torch.library.Library("bitnet", "DEF")
    for name, schema in OP_SCHEMAS.items():
        lib.define(schema)
        implementation = checked_reference(name)
        for key in ("CompositeExplicitAutograd", "CPU", "CUDA"):
            lib.impl(name, implementation, key)
    _fallback_library = lib


def _register_reference_for_missing_cuda() -> None:
    """With a CPU-only extension, serve CUDA tensors with the pure-PyTorch reference (correct, not fast)."""
    global _cuda_reference_library
    missing = [
        name
        for name in OP_SCHEMAS
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bitnet::{name}", "CUDA")
    ]
    if not missing:
        return
    lib = torch.library.Library("bitnet", "IMPL")
    for name in missing:
        lib.impl(name, checked_reference(name), "CUDA")
    if set(missing) - _REFERENCE_ON_CUDA:
        _cuda_reference_library = lib
    else:
        _reference_only_cuda_library.append(lib)
    logger.info("bitnet_torch: no compiled CUDA kernels for %s; CUDA tensors use the reference", ", ".join(missing))


def _register_fakes() -> None:
    """Shape/dtype-only (meta) implementations so the ops trace under torch.compile and FakeTensor."""

    @torch.library.register_fake("bitnet::quantize_activation")
    def _(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1] + (1,), dtype=torch.float32)

    @torch.library.register_fake("bitnet::ternary_matmul")
    def _(x_q, packed):
        torch._check(x_q.dim() == 2, lambda: "ternary_matmul: x_q must be 2-D [M, K]")
        torch._check(packed.dim() == 2, lambda: "ternary_matmul: packed must be 2-D [N/4, K]")
        torch._check(x_q.shape[1] == packed.shape[1], lambda: "ternary_matmul: K of x_q and packed differ")
        return x_q.new_empty((x_q.shape[0], packed.shape[0] * 4), dtype=torch.int32)

    @torch.library.register_fake("bitnet::ternary_linear")
    def _(x, packed, weight_scale, bias):
        torch._check(x.shape[-1] == packed.shape[1], lambda: "ternary_linear: K of x and packed differ")
        return x.new_empty(x.shape[:-1] + (packed.shape[0] * 4,))

    @torch.library.register_fake("bitnet::ternary_linear_group")
    def _(x, packed, weight_scale, bias):
        torch._check(len(packed) >= 1, lambda: "ternary_linear_group: packed must hold at least one weight")
        torch._check(len(weight_scale) == len(packed), lambda: "ternary_linear_group: one weight_scale per weight")
        torch._check(len(bias) == len(packed), lambda: "ternary_linear_group: one bias (or None) per weight")
        for p in packed:
            torch._check(x.shape[-1] == p.shape[1], lambda: "ternary_linear_group: K of x and packed differ")
        return [x.new_empty(x.shape[:-1] + (p.shape[0] * 4,)) for p in packed]

    @torch.library.register_fake("bitnet::quantize_pack_weight")
    def _(w):
        torch._check(w.dim() == 2, lambda: "quantize_pack_weight: w must be 2-D [N, K]")
        return w.new_empty((w.shape[0] // 4, w.shape[1]), dtype=torch.uint8), w.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("bitnet::int8_linear")
    def _(x, weight, weight_scale, bias):
        torch._check(x.shape[-1] == weight.shape[1], lambda: "int8_linear: K of x and weight differ")
        return x.new_empty(x.shape[:-1] + (weight.shape[0],))

    @torch.library.register_fake("bitnet::float_linear")
    def _(x, weight, bias):
        torch._check(weight.dim() == 2, lambda: "float_linear: weight must be 2-D [N, K]")
        torch._check(x.shape[-1] == weight.shape[1], lambda: "float_linear: K of x and weight differ")
        return x.new_empty(x.shape[:-1] + (weight.shape[0],))

    @torch.library.register_fake("bitnet::decode_attention")
    def _(q, k, v, attn_mask, scale):
        torch._check(q.dim() == 4 and k.dim() == 4, lambda: "decode_attention: q and k must be 4-D")
        torch._check(q.shape[1] % k.shape[1] == 0, lambda: "decode_attention: Hq must be a multiple of Hkv")
        return q.new_empty(q.shape[:3] + (v.shape[3],))

    @torch.library.register_fake("bitnet::rms_norm")
    def _(x, weight, eps):
        torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1], lambda: "rms_norm: weight must be [hidden]")
        return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))

    @torch.library.register_fake("bitnet::rotary_embedding")
    def _(q, k, cos, sin):
        torch._check(q.dim() == 4 and k.dim() == 4, lambda: "rotary_embedding: q and k must be 4-D")
        return q.new_empty(q.shape), k.new_empty(k.shape)

    # -- decode engine (issue 12) --
    @torch.library.register_fake("bitnet::decode_step")
    def _(token_ids, positions, slots, logit_rows, embed, embed_scale, norms, packed, weight_scales, rope_cos,
          rope_sin, head, head_scale, k_cache, v_cache, num_heads, num_kv_heads, eps, attn_scale):
        torch._check(k_cache.dim() == 5, lambda: "decode_step: k_cache must be 5-D")
        torch._check(len(packed) == 7 * k_cache.shape[0], lambda: "decode_step: 7 packed weights per layer")
        return embed.new_empty((logit_rows.shape[0], embed.shape[0]), dtype=torch.float32)


def _initialise() -> None:
    global _extension_error
    _extension_error = _load_extension()
    if _extension_error is not None:
        message = (
            "bitnet_torch: the compiled kernels are unavailable, using the pure-PyTorch fallback "
            f"(correct but slow). Reason: {_extension_error}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        _define_fallback()
    else:
        _register_reference_for_missing_cuda()
    _register_fakes()
    register_autograd_formulas()


def extension_loaded() -> bool:
    """True when the compiled C++/CUDA kernels back ``torch.ops.bitnet``."""
    return _extension_error is None


def _has_compiled_cuda_kernels() -> bool:
    """True when the loaded extension brings its own CUDA kernels (not the reference registered for CUDA)."""
    return extension_loaded() and _cuda_reference_library is None


#: The dtypes of the fused inference ops (rms_norm, rotary_embedding).
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def eager_cpu_inference(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors is eager CPU inference that a fused op of the compiled extension can serve:
    all on CPU in fp32/bf16/fp16, no autograd to record, not being traced by ``torch.compile`` (where Inductor
    fuses the composite with its neighbours instead)."""
    return (
        extension_loaded()
        and not torch.compiler.is_compiling()
        and not records_autograd(*tensors)
        and all(t.device.type == "cpu" and t.dtype in _FUSED_DTYPES for t in tensors)
    )


def extension_error() -> str | None:
    """Why the compiled extension is unavailable (None when it is loaded)."""
    return _extension_error


_initialise()


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization through the fastest backend (same numbers as the spec)."""
    return torch.ops.bitnet.quantize_activation(x)


def ternary_matmul(x_q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 ``[M, K]`` activations and a packed ternary ``[N/4, K]`` weight."""
    return torch.ops.bitnet.ternary_matmul(x_q, packed)


def ternary_linear(
    x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused packed BitLinear forward (multiply-convention ``weight_scale``); output in ``x.dtype``."""
    return torch.ops.bitnet.ternary_linear(x, packed, weight_scale, bias)


def ternary_linear_group(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    weight_scale: list[torch.Tensor],
    bias: list[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Several packed linears of the same input (e.g. q/k/v): the outputs of :func:`ternary_linear`, bit for bit.

    The input is quantized once and, for decode on CPU, all weights are streamed in one parallel pass.
    """
    if bias is None:
        bias = [None] * len(packed)
    elif torch.is_grad_enabled():
        # Also when x needs no gradient: then autograd never reaches the formula's own check.
        refuse_untracked_bias_gradients(bias)
    return torch.ops.bitnet.ternary_linear_group(x, list(packed), list(weight_scale), list(bias))


def quantize_pack_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean-quantize and pack a float ``[N, K]`` weight: (uint8 ``[N/4, K]``, fp32 0-dim scale)."""
    return torch.ops.bitnet.quantize_pack_weight(w)


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """int8-weight (per-row fp32 scale) × per-token int8-activation linear; output in ``x.dtype``."""
    return torch.ops.bitnet.int8_linear(x, weight, weight_scale, bias)


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with fp32 accumulation for a bf16/fp32 weight; output in ``x.dtype`` (no autograd formula)."""
    return torch.ops.bitnet.float_linear(x, weight, bias)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Grouped-query SDPA of a few query tokens against a KV cache (``F.scaled_dot_product_attention`` with
    ``enable_gqa=True``, bit for bit), skipping the cache positions no query may attend. Inference only."""
    return torch.ops.bitnet.decode_attention(q, k, v, attn_mask, float(scale))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """BitNet's RMSNorm (Transformers' ``BitNetRMSNorm`` arithmetic) in one pass per row. Inference only."""
    return torch.ops.bitnet.rms_norm(x, weight, float(eps))


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' ``apply_rotary_pos_emb`` (bit for bit) in one pass. Inference only."""
    return torch.ops.bitnet.rotary_embedding(q, k, cos, sin)


# -- decode engine (issue 12) --
def decode_step(
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    logit_rows: torch.Tensor,
    embed: torch.Tensor,
    embed_scale: torch.Tensor | None,
    norms: torch.Tensor,
    packed: list[torch.Tensor],
    weight_scales: torch.Tensor,
    rope_cos: torch.Tensor,
    rope_sin: torch.Tensor,
    head: torch.Tensor,
    head_scale: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    attn_scale: float,
) -> torch.Tensor:
    """One forward step of a packed BitNet model for a batch of rows, writing the KV cache in place (inference only;
    :class:`bitnet_torch.models.engine.DecodeEngine` is the interface meant for users)."""
    return torch.ops.bitnet.decode_step(
        token_ids, positions, slots, logit_rows, embed, embed_scale, norms, list(packed), weight_scales, rope_cos,
        rope_sin, head, head_scale, k_cache, v_cache, int(num_heads), int(num_kv_heads), float(eps), float(attn_scale),
    )
