"""``PackedBitLinear``: the inference twin of BitLinear, holding only the packed ternary weight.

State (the names, shapes and dtypes of Microsoft's packed checkpoint, SPEC §3):

* ``weight``: uint8 ``[out_features/4, in_features]`` buffer, four ternary rows per byte;
* ``weight_scale``: ``[1]`` buffer in the model dtype;
* ``bias`` (optional): ``[out_features]`` buffer.

``scale_convention`` says what ``weight_scale`` means: ``"multiply"`` (``linear_class="autobitlinear"``,
``weight_scale = mean|W|``, what we write) or ``"divide"`` (``linear_class="bitlinear"``,
``weight_scale = 1/mean|W|``). The forward never materialises a float weight: it calls
``torch.ops.bitnet.ternary_linear`` (quantize activations → ternary×int8 matmul → rescale).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .. import ops
from ..packing import packed_shape, unpack_ternary
from .rmsnorm import RMSNorm

__all__ = ["PackedBitLinear", "ScaleConvention", "LINEAR_CLASS_TO_CONVENTION"]

ScaleConvention = Literal["multiply", "divide"]

#: ``quantization_config.linear_class`` → meaning of ``weight_scale`` (SPEC §3).
LINEAR_CLASS_TO_CONVENTION: dict[str, ScaleConvention] = {"autobitlinear": "multiply", "bitlinear": "divide"}


class PackedBitLinear(nn.Module):
    """Packed ternary linear layer for inference (no float weight at any time).

    Args:
        in_features, out_features: layer size; ``out_features`` must be a multiple of 4.
        bias: whether a bias buffer exists.
        scale_convention: ``"multiply"`` (default, autobitlinear) or ``"divide"`` (bitlinear).
        dtype: dtype of ``weight_scale`` and ``bias`` (the model dtype); outputs follow the input dtype.
        use_rms_norm, rms_norm_eps: optional RMSNorm on the input (original BitNet style).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype: torch.dtype | None = None,
        *,
        scale_convention: ScaleConvention = "multiply",
        use_rms_norm: bool = False,
        rms_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if scale_convention not in ("multiply", "divide"):
            raise ValueError(f"scale_convention must be 'multiply' or 'divide', got {scale_convention!r}")
        dtype = dtype or torch.get_default_dtype()
        self.in_features = in_features
        self.out_features = out_features
        self.scale_convention = scale_convention
        self.register_buffer("weight", torch.zeros(packed_shape(out_features, in_features), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.rms_norm = RMSNorm(in_features, eps=rms_norm_eps, device=device, dtype=dtype) if use_rms_norm else None

    @classmethod
    def from_bitlinear(cls, layer: nn.Linear, scale_dtype: torch.dtype | None = None) -> "PackedBitLinear":
        """Quantize and pack a (Bit)Linear's float weight; the result shares no storage with ``layer``."""
        rms_norm = getattr(layer, "rms_norm", None)
        dtype = scale_dtype or layer.weight.dtype
        packed = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device=layer.weight.device,
            dtype=dtype,
            use_rms_norm=rms_norm is not None,
            rms_norm_eps=rms_norm.variance_epsilon if rms_norm is not None else 1e-6,
        )
        with torch.no_grad():
            weight, scale = ops.quantize_pack_weight(layer.weight.detach())
            packed.weight.copy_(weight)
            packed.weight_scale.copy_(scale.reshape(1))
            if layer.bias is not None:
                packed.bias.copy_(layer.bias.detach())
            if rms_norm is not None:
                packed.rms_norm.weight.copy_(rms_norm.weight.detach())
        return packed

    def multiply_scale(self) -> torch.Tensor:
        """The weight scale in the multiply convention (mean |W|), whatever is stored."""
        if self.scale_convention == "divide":
            return self.weight_scale.float().reciprocal()
        return self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"PackedBitLinear expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        return ops.ternary_linear(x, self.weight, self.multiply_scale(), self.bias)

    def ternary_weight(self) -> torch.Tensor:
        """The int8 ternary matrix ``[out_features, in_features]`` (validated: raises on corrupt codes)."""
        return unpack_ternary(self.weight)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_t * mean|W|`` as a float matrix (for export or conversion back to a trainable layer)."""
        return (self.ternary_weight().float() * self.multiply_scale().float()).to(dtype)

    def to_multiply_convention(self) -> None:
        """Rewrite ``weight_scale`` in place so that it means mean |W| (what we save)."""
        if self.scale_convention == "divide":
            with torch.no_grad():
                self.weight_scale.copy_(self.multiply_scale().to(self.weight_scale.dtype))
            self.scale_convention = "multiply"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scale_convention={self.scale_convention!r}, packed_bytes={self.weight.numel()}"
        )

