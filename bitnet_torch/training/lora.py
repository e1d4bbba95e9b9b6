"""LoRA on BitNet models with peft: which layers, the packed-base LoRA layer, and merging done right.

Two ways to fine-tune, and what each gives you:

* **Trainable master base** (``BitLinear`` projections, float master weights): peft wraps ``BitLinear``
  like any ``nn.Linear`` (it is a subclass). After training, :func:`merge_lora_into_master` adds
  ``scaling · B @ A`` into the float master weights (peft's ``merge_and_unload``, which keeps the
  ``BitLinear`` modules) — the model re-quantizes them in every forward and when packed, so the merged
  model is again a plain BitNet model whose outputs match the unmerged one *up to the change of the
  ternary codes* (an update smaller than half a quantization step is rounded away; train the adapter on
  the master weights with QAT, or keep it separate).
* **Frozen packed base** (``PackedBitLinear``, uint8 codes, not an ``nn.Linear``): peft needs a custom
  layer, :class:`PackedBitLinearLoraLayer` (``y = packed(x) + lora_B(lora_A(dropout(x))) · scaling``),
  registered through ``LoraConfig._register_custom_module`` (peft's documented custom-model API). The
  adapter stays separate (merging into ternary codes is refused: there are no master weights); outputs
  are exactly those of the same adapter on the unpacked master base at λ = 1.

Adapters are saved with ``PeftModel.save_pretrained`` (adapter weights + ``adapter_config.json`` only);
the base model's ``quantization_config`` is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..nn import BitLinear, PackedBitLinear
from ..nn.lora_layers import PackedBitLinearLoraLayer, PackedMergeError, register_peft_support

__all__ = [
    "BITNET_LORA_TARGETS",
    "PackedBitLinearLoraLayer",
    "apply_lora",
    "bitnet_lora_config",
    "load_adapter",
    "merge_lora_into_master",
]

#: The seven ternary projections of each decoder layer (SPEC §1): what LoRA adapts by default.
BITNET_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bitnet_lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = BITNET_LORA_TARGETS,
    packed_base: bool = False,
    **kwargs: Any,
) -> LoraConfig:
    """A causal-LM ``LoraConfig`` on the BitNet projections.

    With ``packed_base=True`` it also registers :class:`PackedBitLinearLoraLayer` for ``PackedBitLinear``
    targets (needed to apply it to a packed model; harmless otherwise). ``kwargs`` go to ``LoraConfig``.
    """
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        bias="none",
        **kwargs,
    )
    if packed_base:
        config._register_custom_module({PackedBitLinear: PackedBitLinearLoraLayer})
    return config


def _has_packed_projection(model: nn.Module) -> bool:
    return any(isinstance(m, PackedBitLinear) for m in model.modules())


def load_adapter(model: nn.Module, adapter_dir: str, is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` that also works on a packed base.

    The custom-layer mapping is not part of ``adapter_config.json``, so for a model with
    ``PackedBitLinear`` projections it is registered again here before peft builds the layers.
    """
    config = LoraConfig.from_pretrained(adapter_dir)
    if _has_packed_projection(model):
        config._register_custom_module({PackedBitLinear: PackedBitLinearLoraLayer})
    config.inference_mode = not is_trainable
    return PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=is_trainable, **kwargs)


def apply_lora(model: nn.Module, config: LoraConfig | None = None) -> PeftModel:
    """``get_peft_model`` with the packed-layer mapping added when ``model`` has packed projections."""
    config = config or bitnet_lora_config()
    if _has_packed_projection(model):
        config._register_custom_module({PackedBitLinear: PackedBitLinearLoraLayer})
    return get_peft_model(model, config)


def merge_lora_into_master(peft_model: PeftModel) -> nn.Module:
    """Merge every LoRA adapter into the float master weights of its ``BitLinear`` and unwrap the model.

    Returns the base model with its ``BitLinear`` modules (now holding ``W + scaling · B @ A``) and its
    config untouched, ``quantization_config`` included; the ternary codes are recomputed from the merged
    master weights in every forward and by ``save_pretrained(..., packed=True)``. Refuses (``ValueError``)
    adapters on anything but ``BitLinear`` bases — in particular packed bases, which have no master weights.
    """
    lora_layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    if not lora_layers:
        raise ValueError("the model has no LoRA layers to merge")
    wrong = {type(m.get_base_layer()).__name__ for m in lora_layers if not isinstance(m.get_base_layer(), BitLinear)}
    if wrong:
        raise ValueError(
            f"merge_lora_into_master merges into BitLinear master weights; found LoRA on {sorted(wrong)}. "
            "A packed base keeps its adapter separate (save it with save_pretrained, reload with load_adapter)."
        )
    config = getattr(peft_model.get_base_model(), "config", None)
    quantization_config = getattr(config, "quantization_config", None)
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    stray = [name for name, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    if stray:
        raise RuntimeError(f"peft left LoRA layers after merge_and_unload: {stray[:3]}")
    if quantization_config is not None and getattr(merged.config, "quantization_config", None) != quantization_config:
        raise RuntimeError("merging changed the model's quantization_config; refusing to return a dense-looking model")
    return merged
