"""RMSNorm as BitNet uses it (SubLN norms and the optional norm inside BitLinear)."""

from __future__ import annotations

import torch
from torch import nn

from .. import _reference_ops, ops

__all__ = ["RMSNorm"]


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
        # Eager CPU inference: one bitnet::rms_norm call instead of eight; training and torch.compile (where
        # Inductor fuses the composite with its neighbours) keep the composite, the op's reference.
        if ops.eager_cpu_inference(hidden_states, self.weight):
            return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return _reference_ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
