"""RMSNorm as BitNet uses it (SubLN norms and the optional norm inside BitLinear)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops

__all__ = ["RMSNorm"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm computed in fp32, the arithmetic of Transformers' ``BitNetRMSNorm``.

    ``y = weight * (x / sqrt(mean(x**2) + eps))`` with the normalisation done in fp32 and the result cast
    back to the input dtype before the (learned) gain is applied. Eager inference on CPU runs it as one op
    (``bitnet::rms_norm``: same arithmetic, the fp32 sum of squares added in another order).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._fused_applies(hidden_states):
            return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(input_dtype)

    def _fused_applies(self, hidden_states: torch.Tensor) -> bool:
        """Eager CPU inference goes to ``bitnet::rms_norm`` (one call instead of eight); training and
        ``torch.compile`` (where Inductor fuses the composite with its neighbours) keep the composite."""
        return (
            hidden_states.device.type == "cpu"
            and ops.extension_loaded()
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad))
            and hidden_states.dtype in _FUSED_DTYPES
            and self.weight.dtype in _FUSED_DTYPES
        )

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
