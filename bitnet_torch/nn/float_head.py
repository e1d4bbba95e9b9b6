"""A float output head that streams its weight at memory bandwidth on CPU: :class:`FastLinear`.

During decode the ``lm_head`` (e.g. 128256 × 2560 for BitNet 2B-4T, 656 MB in bf16) is a GEMV: every token
reads the whole matrix once, and PyTorch's bf16 ``F.linear`` reaches only about a third of the memory
bandwidth of a small CPU there. :class:`FastLinear` is an ``nn.Linear`` (same parameters, same state-dict
keys, tying and peft work unchanged) whose inference forward on CPU goes through ``bitnet::float_linear``
(:func:`bitnet_torch.ops.float_linear`: fp32 accumulation, output in the input dtype, ``F.linear`` numbers up
to the order of the fp32 additions). Everywhere else -- other devices, autocast, or whenever autograd needs a
gradient (the op has no backward) -- it is exactly ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._autograd import records_autograd

__all__ = ["FastLinear"]

_KERNEL_WEIGHT_DTYPES = (torch.bfloat16, torch.float32)


class FastLinear(nn.Linear):
    """``nn.Linear`` whose CPU inference forward runs the bandwidth-bound ``bitnet::float_linear`` kernel.

    The kernel is used when the input is a CPU tensor of the weight's dtype (bf16 or fp32), CPU autocast is
    off and no gradient is required (``torch.no_grad()``/``inference_mode``, or neither the input, the weight
    nor the bias requires one). Otherwise the forward is ``F.linear`` (so training and dtype errors behave as
    for ``nn.Linear``).
    """

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        weight, bias = self.weight, self.bias
        if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != weight.dtype:
            return False
        if weight.dtype not in _KERNEL_WEIGHT_DTYPES or torch.is_autocast_enabled("cpu"):
            return False
        return not records_autograd(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_applies(x):
            return ops.float_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FastLinear":
        """A :class:`FastLinear` sharing ``linear``'s parameters (no copy)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer
