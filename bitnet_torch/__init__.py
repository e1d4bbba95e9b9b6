"""bitnet_torch: BitNet b1.58 (ternary weights, int8 activations) language models for PyTorch.

The public API at the top level:

* the executable spec: :func:`quantize_weight`, :func:`quantize_activation`, :func:`pack_ternary`,
  :func:`unpack_ternary` (SPEC.md §1, §3);
* layers: :class:`BitLinear` (quantization-aware training), :class:`PackedBitLinear` (inference),
  :func:`convert_to_bitnet`, :func:`pack_model`;
* models: :class:`BitNetConfig`, :class:`BitNetModel`, :class:`BitNetForCausalLM` (Transformers-compatible;
  importing ``bitnet_torch`` registers them with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` for
  ``model_type: "bitnet"``, see :mod:`bitnet_torch.models`);
* :func:`backend_info`: which kernels back ``torch.ops.bitnet``.
"""

from __future__ import annotations

from . import ops
from ._backend import backend_info
from .nn import BitLinear, PackedBitLinear, RMSNorm, convert_to_bitnet, pack_model, set_lambda
from .packing import pack_ternary, unpack_ternary
from .quant import lambda_schedule, quantize_activation, quantize_weight
from .models import BitNetConfig, BitNetForCausalLM, BitNetModel, compiled_decode_kwargs  # also registers them with transformers' Auto API

__version__ = "0.1.0"

__all__ = [
    "BitLinear",
    "BitNetConfig",
    "BitNetForCausalLM",
    "BitNetModel",
    "PackedBitLinear",
    "RMSNorm",
    "backend_info",
    "compiled_decode_kwargs",
    "convert_to_bitnet",
    "lambda_schedule",
    "ops",
    "pack_model",
    "pack_ternary",
    "quantize_activation",
    "quantize_weight",
    "set_lambda",
    "unpack_ternary",
]
