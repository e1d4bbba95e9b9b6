"""BitNet b1.58 layers: trainable :class:`BitLinear`, packed :class:`PackedBitLinear`, RMSNorm, conversion."""

from .bitlinear import BitLinear, BitLinearFunction
from .convert import convert_to_bitnet, pack_model, set_lambda
from .float_head import FastLinear
from .int8_linear import Int8Embedding, Int8Linear
from .packed import LINEAR_CLASS_TO_CONVENTION, PackedBitLinear
from .rmsnorm import RMSNorm

__all__ = [
    "BitLinear",
    "BitLinearFunction",
    "FastLinear",
    "Int8Embedding",
    "Int8Linear",
    "PackedBitLinear",
    "LINEAR_CLASS_TO_CONVENTION",
    "RMSNorm",
    "convert_to_bitnet",
    "pack_model",
    "set_lambda",
]
