"""Transformers-compatible BitNet b1.58 models: config, model classes, checkpoints, conversion, chat template.

Importing this package (which ``import bitnet_torch`` does) registers our classes with Transformers' Auto API
for ``model_type: "bitnet"``, replacing Transformers' own mapping in this process (``exist_ok=True``)::

    AutoConfig.register("bitnet", BitNetConfig, exist_ok=True)
    AutoModel.register(BitNetConfig, BitNetModel, exist_ok=True)
    AutoModelForCausalLM.register(BitNetConfig, BitNetForCausalLM, exist_ok=True)

so ``AutoConfig.from_pretrained(path)`` gives our :class:`BitNetConfig` and
``AutoModelForCausalLM.from_pretrained(path)`` our :class:`BitNetForCausalLM` for any BitNet checkpoint.
Transformers' own classes stay importable and usable (``transformers.BitNetForCausalLM.from_pretrained``).
A process that never imports ``bitnet_torch`` gets Transformers' classes; checkpoints we save load there too.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .chat import LLAMA3_CHAT_TEMPLATE, apply_llama3_chat_template
from .checkpoint import BitNetCheckpointError, checkpoint_state_dict
from .configuration import (
    MASTER_QUANTIZATION_CONFIG,
    PACKED_QUANTIZATION_CONFIG,
    BitNetConfig,
    bitnet_b1_58_2b_4t_config,
)
from .conversion import convert_llama_to_bitnet
from .generation import compiled_decode_kwargs, decode_compile_config, static_cache_length
from .modeling import BitNetForCausalLM, BitNetModel, BitNetPreTrainedModel

__all__ = [
    "BitNetCheckpointError",
    "BitNetConfig",
    "BitNetForCausalLM",
    "BitNetModel",
    "BitNetPreTrainedModel",
    "LLAMA3_CHAT_TEMPLATE",
    "MASTER_QUANTIZATION_CONFIG",
    "PACKED_QUANTIZATION_CONFIG",
    "apply_llama3_chat_template",
    "bitnet_b1_58_2b_4t_config",
    "checkpoint_state_dict",
    "compiled_decode_kwargs",
    "convert_llama_to_bitnet",
    "decode_compile_config",
    "register_auto_classes",
    "static_cache_length",
]


def register_auto_classes() -> None:
    """Make Transformers' Auto classes resolve ``model_type: "bitnet"`` to our classes (idempotent)."""
    AutoConfig.register("bitnet", BitNetConfig, exist_ok=True)
    AutoModel.register(BitNetConfig, BitNetModel, exist_ok=True)
    AutoModelForCausalLM.register(BitNetConfig, BitNetForCausalLM, exist_ok=True)


register_auto_classes()

# Plain peft LoRA calls (all-linear, named targets, PeftModel/AutoPeftModel loading, load_adapter) on packed models.
from ..nn.lora_layers import register_peft_support  # noqa: E402

register_peft_support()
