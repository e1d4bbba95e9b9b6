"""``BitLinear``: the trainable (quantization-aware) BitNet b1.58 linear layer.

An ``nn.Linear`` subclass (so peft, FSDP and ``isinstance(m, nn.Linear)`` checks keep working) whose
forward quantizes the weight (absmean ternary, one scale) and the input (absmax int8 per token), multiplies
exactly in integers and rescales (SPEC §1). Backward is the straight-through estimator (SPEC §2).

With ``lambda_ == 1`` and 8-bit activations the layer runs :class:`BitLinearFunction`, which saves only the
int8 activation codes and their fp32 per-token scales for backward (a quarter of an fp32 input), and
recomputes the ternary weight from the master weight in backward. During the lambda warm-up
(``lambda_ < 1``) or with ``act_bits=None`` (weight-only quantization) the forward is the detach
formulation in float, which saves the float input like ``nn.Linear``.
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
)
from .rmsnorm import RMSNorm

__all__ = ["BitLinear", "BitLinearFunction"]


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


def _dequantized_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_t * scale`` in ``dtype``: the weight the forward pass multiplied with."""
    w_t, scale = quantize_weight(weight)
    return torch.mul(w_t, scale).to(dtype)  # int8 * fp32 promotes to fp32 in one pass


class BitLinearFunction(torch.autograd.Function):
    """Quantized linear with a straight-through backward that saves int8 activations, not float ones.

    ``forward(x, weight, bias, act_bits)``: ``x [..., K]`` float, ``weight [N, K]`` float master weight.
    Output: ``float(x_q @ W_t^T) * (x_scale * w_scale) + bias`` in the input (or autocast) dtype.
    Backward (STE): ``dx = dy @ (W_t * w_scale)``, ``dW = dy^T @ (x_q * x_scale)``, ``db = sum(dy)``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act_bits: int):
        out_dtype = _output_dtype(x)
        k = x.shape[-1]
        x2d = x.reshape(-1, k)
        x_q, x_scale = _quantize_tokens(x2d, act_bits)
        w_t, w_scale = quantize_weight(weight)
        acc = _int8_matmul(x_q, w_t)
        y = torch.mul(acc, x_scale * w_scale)  # int32 * fp32 promotes to fp32: float(acc) * scale
        if bias is not None:
            y.add_(bias.float())
        ctx.save_for_backward(x_q, x_scale, weight)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x_q, x_scale, weight = ctx.saved_tensors
        n = weight.shape[0]
        g = grad_out.reshape(-1, n)
        compute_dtype = g.dtype
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _dequantized_weight(weight, compute_dtype)).to(ctx.x_dtype).reshape(ctx.x_shape)
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
        if x.shape[-1] != self.in_features:
            raise ValueError(f"BitLinear expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
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
