"""Quantize and pack float master weights *while* Transformers loads them (``from_pretrained(..., packed=True)``).

Transformers' ``from_pretrained`` quantizes on the fly through an ``HfQuantizer`` whose ``get_quantize_ops``
converts one checkpoint tensor at a time, loading synchronously (no read-ahead threads) so that only one
float projection exists at any moment. We register our own quantizer under a name of ours,
``"bitnet_torch_pack_on_load"`` — never under ``"bitnet"``, which stays Transformers' own — and
:func:`~bitnet_torch.models.checkpoint.load_pretrained` passes it explicitly for that one case, then removes
every trace of it from the loaded model (``hf_quantizer``, the config entry), because the model it produces is
an ordinary packed BitNet model whose ``quantization_config`` is the ``bitnet`` offline one.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import ops
from ..nn import PackedBitLinear

__all__ = ["PACK_ON_LOAD_METHOD", "PackOnLoadConfig", "PackOnLoadQuantizer"]

#: The ``quant_method`` under which the pack-on-load quantizer is registered with Transformers.
PACK_ON_LOAD_METHOD = "bitnet_torch_pack_on_load"


class PackOnLoadConfig(QuantizationConfigMixin):
    """Marker config that selects :class:`PackOnLoadQuantizer` for one ``from_pretrained`` call."""

    def __init__(self, **kwargs: Any) -> None:
        self.quant_method = PACK_ON_LOAD_METHOD


class _QuantizePack(ConversionOps):
    """Turn a float ``[N, K]`` projection weight into ``weight`` (uint8 ``[N/4, K]``) + ``weight_scale`` (``[1]``)."""

    def __init__(self, hf_quantizer: HfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model=None, missing_keys=None, **kwargs) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        for key, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            module = model.get_submodule(key.rpartition(".")[0])
            expected = (module.out_features, module.in_features)
            if tuple(weight.shape) != expected:
                raise ValueError(
                    f"{key}: checkpoint weight has shape {tuple(weight.shape)}, the model expects {expected}"
                )
            packed, scale = ops.quantize_pack_weight(weight)
            scale_key = key.rpartition(".")[0] + ".weight_scale"
            result[key] = packed
            result[scale_key] = scale.reshape(1).to(module.weight_scale.dtype)
            if missing_keys is not None:
                missing_keys.discard(scale_key)
        return result


class PackOnLoadQuantizer(HfQuantizer):
    """Packs the ``weight`` of every :class:`PackedBitLinear` as it is read from a float checkpoint."""

    requires_calibration = False

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and isinstance(model.get_submodule(module_name), PackedBitLinear)

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizePack(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register_pack_on_load() -> None:
    """Register the config and quantizer with Transformers (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(PACK_ON_LOAD_METHOD, PackOnLoadConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(PACK_ON_LOAD_METHOD, PackOnLoadQuantizer)
