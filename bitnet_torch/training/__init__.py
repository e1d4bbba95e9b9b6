"""Training recipes for BitNet b1.58 models (SPEC §2), as reusable pieces for the Transformers ``Trainer``
and for plain PyTorch loops.

* schedule: :class:`TwoStageSchedule` (warm-up, stage-1 decay, sharp drop about halfway, stage-2 decay;
  weight decay 0.1 then 0), :func:`build_two_stage_scheduler`, :func:`apply_weight_decay`;
* optimizer: :func:`build_adamw` (β = (0.9, 0.95), no decay on norms, biases, embeddings);
* ``Trainer`` callbacks: :class:`WeightDecayScheduleCallback`, :class:`LambdaWarmupCallback`,
  :class:`TimeBudgetCallback`, :class:`PerplexityLoggingCallback`;
* size presets (:data:`PRESETS`, ~4M … the 2B-4T shape);
* LoRA with peft: :func:`bitnet_lora_config`, :func:`apply_lora`, :class:`PackedBitLinearLoraLayer`,
  :class:`PackedMergeError`, :func:`merge_lora_into_master`, :func:`load_adapter`;
* whole jobs: :func:`train_from_scratch` (``bitnet-torch train``), :func:`finetune_lora` (``bitnet-torch finetune``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Where each public name lives. The submodules are imported on first use (PEP 562), so that importing
#: :mod:`bitnet_torch.training.config` (the command line's options) does not load torch and Transformers.
_LOCATIONS = {
    "BITNET_LORA_TARGETS": "lora",
    "DECAY_GROUP_KEY": "schedule",
    "FinetuneConfig": "config",
    "FinetuneResult": "finetune",
    "LambdaWarmupCallback": "callbacks",
    "ModelPreset": "presets",
    "PAPER_BETAS": "optim",
    "PRESETS": "presets",
    "PackedBitLinearLoraLayer": "lora",
    "PackedMergeError": "lora",
    "PerplexityLoggingCallback": "callbacks",
    "TimeBudgetCallback": "callbacks",
    "TrainConfig": "config",
    "TrainResult": "from_scratch",
    "TwoStageSchedule": "schedule",
    "WeightDecayScheduleCallback": "callbacks",
    "apply_lora": "lora",
    "apply_weight_decay": "schedule",
    "bitnet_lora_config": "lora",
    "build_adamw": "optim",
    "build_model_from_preset": "from_scratch",
    "build_two_stage_scheduler": "schedule",
    "count_parameters": "presets",
    "evaluate_perplexity": "evaluation",
    "finetune_lora": "finetune",
    "get_preset": "presets",
    "load_adapter": "lora",
    "load_chat_dataset": "finetune",
    "merge_lora_into_master": "lora",
    "parameter_checksum": "from_scratch",
    "split_decay_parameters": "optim",
    "train_from_scratch": "from_scratch",
}

if TYPE_CHECKING:
    from .callbacks import LambdaWarmupCallback, PerplexityLoggingCallback, TimeBudgetCallback, WeightDecayScheduleCallback
    from .evaluation import evaluate_perplexity
    from .finetune import FinetuneConfig, FinetuneResult, finetune_lora, load_chat_dataset
    from .from_scratch import TrainConfig, TrainResult, build_model_from_preset, parameter_checksum, train_from_scratch
    from .lora import (
        BITNET_LORA_TARGETS,
        PackedBitLinearLoraLayer,
        PackedMergeError,
        apply_lora,
        bitnet_lora_config,
        load_adapter,
        merge_lora_into_master,
    )
    from .optim import PAPER_BETAS, build_adamw, split_decay_parameters
    from .presets import PRESETS, ModelPreset, count_parameters, get_preset
    from .schedule import DECAY_GROUP_KEY, TwoStageSchedule, apply_weight_decay, build_two_stage_scheduler


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    if name not in _LOCATIONS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LOCATIONS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "BITNET_LORA_TARGETS",
    "DECAY_GROUP_KEY",
    "FinetuneConfig",
    "FinetuneResult",
    "LambdaWarmupCallback",
    "ModelPreset",
    "PAPER_BETAS",
    "PRESETS",
    "PackedBitLinearLoraLayer",
    "PackedMergeError",
    "PerplexityLoggingCallback",
    "TimeBudgetCallback",
    "TrainConfig",
    "TrainResult",
    "TwoStageSchedule",
    "WeightDecayScheduleCallback",
    "apply_lora",
    "apply_weight_decay",
    "bitnet_lora_config",
    "build_adamw",
    "build_model_from_preset",
    "build_two_stage_scheduler",
    "count_parameters",
    "evaluate_perplexity",
    "finetune_lora",
    "get_preset",
    "load_adapter",
    "load_chat_dataset",
    "merge_lora_into_master",
    "parameter_checksum",
    "split_decay_parameters",
    "train_from_scratch",
]
