"""``BitLinear``: the trainable (quantization-aware) BitNet b1.58 linear layer.

An ``nn.Linear`` subclass (so peft, FSDP and ``isinstance(m, nn.Linear)`` checks keep working) whose
forward quantizes the weight (absmean ternary, one scale) and the input (absmax int8 per token), multiplies
exactly in integers and rescales (SPEC §1). Backward is the straight-through estimator (SPEC §2).

With ``lambda_ == 1`` the layer runs :class:`BitLinearFunction`, which saves only the int8 activation codes and
their fp32 per-token scales for backward (a quarter of an fp32 input), and recomputes the ternary weight from the
master weight in backward. Its exact integer product runs where it is fastest (:func:`matmul_path`): the compiled
ternary x int8 kernels on AVX2 / AVX-512 / AMX, an fp32 GEMM of the integer-valued codes (exact, see
:data:`FP32_EXACT_K`) without them, ``torch._int_mm`` (or fp64) on other devices; all give the same bits.
During the lambda warm-up (``lambda_ < 1``) or with ``act_bits=None`` (weight-only quantization) the forward is
the detach formulation in float, which saves the float input like ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._reference_ops import _int8_matmul
from ..quant import (
    activation_qrange,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_activation,
    quantize_weight,
    weight_scale,
)
from .rmsnorm import RMSNorm

__all__ = ["BitLinear", "BitLinearFunction", "FP32_EXACT_K", "MATMUL_PATHS", "force_matmul_path", "matmul_path"]


#: The fp32 GEMM of the integer codes is exact up to this K: |x_q| <= 128 and |W_t| <= 1, so every partial sum of a
#: K-term dot product, in whatever order a BLAS adds them, is an integer of magnitude <= 128 * K <= 2**24, and fp32
#: represents every such integer exactly (so each addition is exact). Longer rows are split into chunks of this size.
FP32_EXACT_K = 2**17
#: The spec accumulates in int32: |sum| <= 128 * K < 2**31 needs K < 2**24.
MAX_IN_FEATURES = 2**24 - 1
#: The ternary kernels (``ternary_linear`` / ``ternary_matmul``) accept K < 2**17.
_TERNARY_KERNEL_MAX_K = 2**17 - 1

#: How the forward computes the exact integer product ``x_q @ W_t^T`` (all give the same bits):
#: ``"ternary_linear"`` -- the fused compiled op (quantize, ternary x int8 GEMM, rescale, bias);
#: ``"ternary_matmul"`` -- the compiled ternary x int8 GEMM, rescaled in PyTorch (activation bits other than 8,
#: or an output dtype the fused op cannot produce in one rounding);
#: ``"fp32_gemm"`` -- an fp32 GEMM of the integer-valued codes (exact, see ``FP32_EXACT_K``);
#: ``"int_mm"`` -- ``torch._int_mm`` or fp64 (devices without compiled kernels, e.g. CUDA int8 tensor cores).
MATMUL_PATHS = ("ternary_linear", "ternary_matmul", "fp32_gemm", "int_mm")
_forced_path: str | None = None


def force_matmul_path(path: str | None) -> None:
    """Force the forward's integer product onto one of :data:`MATMUL_PATHS` (None: choose per ISA, the default).

    For benchmarks and tests; every path gives the same bits, only the speed differs. A path the inputs do
    not allow (e.g. the ternary kernels for N not a multiple of 4) falls back to the automatic choice.
    """
    global _forced_path
    if path is not None and path not in MATMUL_PATHS:
        raise ValueError(f"unknown matmul path {path!r}; expected one of {MATMUL_PATHS} or None")
    _forced_path = path


def _cpu_kernel_isa() -> str | None:
    """The ISA of the compiled CPU kernels, or None without them (the pure-PyTorch fallback)."""
    if not ops.extension_loaded() or not hasattr(torch.ops.bitnet, "_cpu_isa"):
        return None
    if torch.compiler.is_compiling():
        return "compiled"  # the ISA query cannot be traced; the kernels are fast on every SIMD ISA
    return torch.ops.bitnet._cpu_isa("")


def matmul_path(x2d: torch.Tensor, weight: torch.Tensor, act_bits: int, out_dtype: torch.dtype) -> str:
    """The path (one of :data:`MATMUL_PATHS`) the forward takes for a 2-D input ``x2d`` and ``weight [N, K]``.

    Chosen by measurement (benchmarks/bench_training.py and its README section): on CPU the compiled ternary
    kernels beat an fp32 GEMM of the codes on AVX2 (about 2x on the forward) and AVX-512 VNNI (about 6x), while
    ``torch._int_mm`` is a plain loop on CPUs without AVX-512 VNNI (60x slower than its oneDNN path at 128 x 2560 x
    6912), so it is never used on CPU; the scalar kernels lose to the BLAS (2x-5x), so without SIMD kernels (or for
    shapes they refuse) the fp32 GEMM of the codes runs. Under ``torch.compile`` the kernels are used whenever the
    extension is loaded (the ISA query is not traceable).
    """
    n, k = weight.shape
    if x2d.device.type != "cpu":
        return "int_mm"
    isa = _cpu_kernel_isa()
    kernel_ok = isa is not None and n % 4 == 0 and 1 <= k <= _TERNARY_KERNEL_MAX_K
    fused_ok = kernel_ok and act_bits == 8 and (out_dtype == x2d.dtype or x2d.dtype == torch.float32)
    if _forced_path is not None:
        allowed = {"ternary_linear": fused_ok, "ternary_matmul": kernel_ok, "fp32_gemm": True, "int_mm": True}
        if allowed[_forced_path]:
            return _forced_path
    if kernel_ok and isa != "scalar":
        return "ternary_linear" if fused_ok else "ternary_matmul"
    return "fp32_gemm"


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would produce for ``x``: the autocast dtype when autocast is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _quantize_tokens(x2d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of a 2-D input, through the compiled op for the 8-bit case."""
    if bits == 8:
        return ops.quantize_activation(x2d)
    return quantize_activation(x2d, bits)


def _ternary_codes(weight: torch.Tensor, scale: torch.Tensor, scaled: bool) -> torch.Tensor:
    """fp32 ``W_t`` (``scaled=False``) or ``W_t * scale`` (``scaled=True``) with ``W_t`` as :func:`quantize_weight`
    computes it, in one buffer and four in-place passes instead of the spec's chain of temporaries.

    Equal bit for bit to ``quantize_weight(weight)[0].float()`` / ``torch.mul(w_t, scale)``: the same fp32
    division and round-half-to-even, then ``+ 0.0`` turns the ``-0.0`` of small negative weights into the ``+0.0``
    of the spec's int8 codes.
    """
    q = torch.div(weight.detach().float(), scale)
    q.round_().clamp_(-1.0, 1.0)
    if scaled:
        q.mul_(scale)
    return q.add_(0.0)


def _dequantized_weight(weight: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``W_t * scale`` in ``dtype``: the weight the forward pass multiplied with (``scale`` recomputed if None)."""
    if scale is None:
        scale = weight_scale(weight)
    return _ternary_codes(weight, scale, scaled=True).to(dtype)


def _fp32_codes_matmul(x_q: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """Exact ``x_q @ W_t^T`` through fp32 GEMMs of the integer-valued codes (``w_codes`` fp32 ``[N, K]``).

    One GEMM when ``K <= FP32_EXACT_K`` (returns fp32 holding exact integers, zeros as +0.0); otherwise one per K-chunk of
    that size, each exact, converted to int32 and summed there (returns int32; exact while ``K < 2**24``).
    """
    k = x_q.shape[1]
    with torch.autocast(x_q.device.type, enabled=False):  # autocast would run the GEMM in bf16/fp16: not exact
        xf = x_q.float()
        if k <= FP32_EXACT_K:
            # + 0.0: a sum of products that are all -0.0 (negative codes times zero codes) is -0.0 in fp32 but 0 in
            # the spec's integers.
            return (xf @ w_codes.t()).add_(0.0)
        acc = None
        for k0 in range(0, k, FP32_EXACT_K):
            part = (xf[:, k0 : k0 + FP32_EXACT_K] @ w_codes[:, k0 : k0 + FP32_EXACT_K].t()).to(torch.int32)
            acc = part if acc is None else acc.add_(part)
        return acc


def check_input(x: torch.Tensor, in_features: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a tensor ``[..., in_features]`` a BitLinear can multiply."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"BitLinear expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(
            f"BitLinear expected input with last dimension {in_features}, got a 0-dim tensor (a scalar has no feature "
            "dimension)"
        )
    if x.shape[-1] != in_features:
        raise ValueError(f"BitLinear expected input with last dimension {in_features}, got shape {tuple(x.shape)}")


class BitLinearFunction(torch.autograd.Function):
    """Quantized linear with a straight-through backward that saves int8 activations, not float ones.

    ``forward(x, weight, bias, act_bits)``: ``x [..., K]`` float, ``weight [N, K]`` float master weight.
    Output: ``float(x_q @ W_t^T) * (x_scale * w_scale) + bias`` in the input (or autocast) dtype, with the
    integer product exact (int32 in the spec) whichever :func:`matmul_path` computes it.
    Backward (STE): ``dx = dy @ (W_t * w_scale)``, ``dW = dy^T @ (x_q * x_scale)``, ``db = sum(dy)``.
    Saved for backward: the int8 codes and fp32 per-token scales of ``x`` (only when the weight needs a gradient),
    the 0-dim weight scale and the master weight (a parameter); ``W_t`` is recomputed in backward.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act_bits: int):
        out_dtype = _output_dtype(x)
        n, k = weight.shape
        check_input(x, k)
        if k > MAX_IN_FEATURES:
            raise ValueError(
                f"BitLinear supports in_features < 2**24 (the int32 accumulator of 128 * K), got {k}"
            )
        x2d = x.reshape(-1, k)
        path = matmul_path(x2d, weight, act_bits, out_dtype)
        need_codes = path != "ternary_linear" or ctx.needs_input_grad[1]
        x_q = x_scale = None
        if need_codes:
            x_q, x_scale = _quantize_tokens(x2d, act_bits)
        if path in ("ternary_linear", "ternary_matmul"):
            packed, w_scale = ops.quantize_pack_weight(weight.detach())
        else:
            w_scale = weight_scale(weight)
        if path == "ternary_linear":
            y = ops.ternary_linear(x2d, packed, w_scale, bias)
        else:
            if path == "ternary_matmul":
                acc = ops.ternary_matmul(x_q, packed)
            elif path == "fp32_gemm":
                acc = _fp32_codes_matmul(x_q, _ternary_codes(weight, w_scale, scaled=False))
            else:
                acc = _int8_matmul(x_q, quantize_weight(weight)[0])
            y = torch.mul(acc, x_scale * w_scale)  # int32 (or exact fp32) * fp32: float(acc) * scale
            if bias is not None:
                y.add_(bias.float())
        if not ctx.needs_input_grad[1]:
            x_q = x_scale = None
        ctx.save_for_backward(x_q, x_scale, w_scale, weight)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return y.to(out_dtype).reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x_q, x_scale, w_scale, weight = ctx.saved_tensors
        n = weight.shape[0]
        g = grad_out.reshape(-1, n)
        compute_dtype = g.dtype
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _dequantized_weight(weight, compute_dtype, w_scale)).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x_deq = torch.mul(x_q, x_scale).to(compute_dtype)
            grad_w = (g.t() @ x_deq).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


class BitLinear(nn.Linear):
    """Quantization-aware BitNet b1.58 linear layer (an ``nn.Linear`` with the same constructor plus options).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        act_bits: activation bits (8 in BitNet b1.58); ``None`` keeps activations in float (weight-only).
        use_rms_norm: apply an RMSNorm to the input before quantization (original BitNet style; the 2B-4T
            architecture uses SubLN norms outside the layer instead).
        rms_norm_eps: epsilon of that norm.
        lambda_: gradual-quantization strength in [0, 1] (SPEC §2); set it from a schedule with
            :meth:`set_lambda` between steps, never inside forward.

    ``pack()`` returns the inference twin :class:`~bitnet_torch.nn.PackedBitLinear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        act_bits: int | None = 8,
        use_rms_norm: bool = False,
        rms_norm_eps: float = 1e-6,
        lambda_: float = 1.0,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if act_bits is not None:
            activation_qrange(act_bits)  # validates
        self.act_bits = act_bits
        self.rms_norm = RMSNorm(in_features, eps=rms_norm_eps, device=device, dtype=dtype) if use_rms_norm else None
        self.lambda_ = 1.0
        self.set_lambda(lambda_)

    def set_lambda(self, lambda_: float) -> None:
        """Set the gradual-quantization strength λ in [0, 1] (1 = fully quantized)."""
        lambda_ = float(lambda_)
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")
        self.lambda_ = lambda_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        if self.lambda_ == 1.0 and self.act_bits is not None:
            return BitLinearFunction.apply(x, self.weight, self.bias, self.act_bits)
        w = fake_quantize_weight(self.weight, self.lambda_)
        if self.act_bits is not None:
            x = fake_quantize_activation(x, self.lambda_, self.act_bits)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> "BitLinear":
        """Build a BitLinear that shares ``linear``'s weight and bias parameters (no copy)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            **options,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        if layer.rms_norm is not None:
            layer.rms_norm.to_empty(device=linear.weight.device)
            nn.init.ones_(layer.rms_norm.weight)
        return layer

    def pack(self, scale_dtype: torch.dtype | None = None) -> nn.Module:
        """Return the packed inference twin (uint8 weight + ``weight_scale``), sharing nothing with ``self``."""
        from .packed import PackedBitLinear

        return PackedBitLinear.from_bitlinear(self, scale_dtype=scale_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_bits={self.act_bits}, lambda_={self.lambda_}"
