"""LoRA on BitNet models with peft: which layers, the packed-base LoRA layer, and merging done right.

Plain peft and trl work on both forms of a BitNet model once ``bitnet_torch`` is imported (see
:mod:`bitnet_torch.nn.lora_layers`): ``get_peft_model(model, LoraConfig(target_modules="all-linear"))``, named
targets, ``target_modules=None`` (the seven projections for ``model_type: bitnet``), ``SFTTrainer(peft_config=...)``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM.from_pretrained`` and ``model.load_adapter``. The helpers
here are conveniences on top (a causal-LM config on the seven projections, a merge with checks).

Two ways to fine-tune, and what each gives you:

* **Trainable master base** (``BitLinear`` projections, float master weights): peft wraps ``BitLinear``
  like any ``nn.Linear`` (it is a subclass). After training, ``merge_and_unload`` (or
  :func:`merge_lora_into_master`, the same with checks) adds ``scaling · B @ A`` into the float master weights
  and keeps the ``BitLinear`` modules -- which re-quantize them to ternary in every forward and when packed. The
  merged model computes exactly what ``BitLinear`` computes from ``W + scaling · B @ A``; that matches the unmerged
  model (float adapter next to the quantized layer) only *up to the change of the ternary codes* (an update
  smaller than half a quantization step is rounded away; keep the adapter separate to keep its exact effect).
* **Frozen packed base** (``PackedBitLinear``, uint8 codes, not an ``nn.Linear``): peft builds
  :class:`~bitnet_torch.nn.lora_layers.PackedBitLinearLoraLayer` (``y = packed(x) + lora_B(lora_A(dropout(x))) ·
  scaling``: the base in ternary x int8, the adapter in float on the un-quantized input). The adapter stays
  separate: ``merge_and_unload``/``merge_adapter`` raise :class:`~bitnet_torch.nn.lora_layers.PackedMergeError`
  before changing anything (there are no master weights to merge into); outputs are exactly those of the same
  adapter on the unpacked master base at λ = 1.

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

from ..nn import BitLinear
from ..nn.lora_layers import PackedBitLinearLoraLayer, PackedMergeError

__all__ = [
    "BITNET_LORA_TARGETS",
    "PackedBitLinearLoraLayer",
    "PackedMergeError",
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
    """A causal-LM ``LoraConfig`` (``task_type="CAUSAL_LM"``, no bias) on the BitNet projections.

    ``packed_base`` is accepted for compatibility and changes nothing: packed projections get their LoRA layer
    with any ``LoraConfig`` (``import bitnet_torch`` registers it with peft). ``kwargs`` go to ``LoraConfig``.
    """
    del packed_base
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        bias="none",
        **kwargs,
    )


def load_adapter(model: nn.Module, adapter_dir: str, is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter_dir, is_trainable=...)`` (kept for compatibility: plain peft
    loads adapters on packed bases too)."""
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable, **kwargs)


def apply_lora(model: nn.Module, config: LoraConfig | None = None) -> PeftModel:
    """``get_peft_model(model, config or bitnet_lora_config())``."""
    return get_peft_model(model, config or bitnet_lora_config())


def merge_lora_into_master(peft_model: PeftModel) -> nn.Module:
    """Merge every LoRA adapter into the float master weights of its ``BitLinear`` and unwrap the model.

    Returns the base model with its ``BitLinear`` modules (now holding ``W + scaling · B @ A``) and its
    config untouched, ``quantization_config`` included; the ternary codes are recomputed from the merged
    master weights in every forward and by ``save_pretrained(..., packed=True)``. Refuses (``ValueError``;
    :class:`PackedMergeError` for packed layers) adapters on anything but ``BitLinear`` bases -- in particular
    packed bases, which have no master weights.
    """
    lora_layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    if not lora_layers:
        raise ValueError("the model has no LoRA layers to merge")
    if any(isinstance(m, PackedBitLinearLoraLayer) for m in lora_layers):
        raise PackedMergeError("merge_lora_into_master")
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
