"""The settings of the two training jobs, :class:`TrainConfig` (``bitnet-torch train``) and
:class:`FinetuneConfig` (``bitnet-torch finetune``): plain dataclasses with no torch import, so the command line
builds its options (and answers ``--help`` or an argument error) without loading the training stack."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["FinetuneConfig", "TrainConfig"]


@dataclass
class TrainConfig:
    """Everything :func:`train_from_scratch` needs; the defaults are the README's CPU main job.

    Data: ``data`` is ``None``/``"kjv"`` (embedded King James Bible), text files/directories, a directory
    saved by ``datasets``, or a ``datasets`` name (``text_column``). ``tokenizer`` is a saved tokenizer to
    reuse; otherwise a byte-level BPE of ``vocab_size`` is trained on the training split.

    Budget: ``max_steps`` optimizer steps (``None``: 400 without a time budget, as many as fit with one).
    With ``minutes`` the step count is calibrated from the measured step time so that the two-stage
    schedule completes within the budget; when fewer than ``min_steps`` steps would fit, ``batch_size`` is
    halved (not below ``min_batch_size``) until they do; and when fewer than ``full_depth_tokens`` tokens would
    fit, the model gets fewer layers (``fit_depth_to_budget``; not below 2), which learns more from a small
    budget. Training also stops when the budget runs out.

    Progress: ``logging_steps``/``eval_steps``/``save_steps`` of ``None`` are sized from the step count
    (about 20 loss lines, 4 evaluations and 5 checkpoints per run); ``eval_steps=0`` evaluates only at the
    end. Evaluations score at most ``eval_tokens`` validation tokens (blocks spread over the whole split;
    the unigram baseline is computed on the same tokens). ``save_steps=0`` writes no checkpoints.
    """

    output_dir: str = "bitnet-kjv"
    data: str | list[str] | None = None
    text_column: str = "text"
    tokenizer: str | None = None
    vocab_size: int = 4096
    preset: str = "5m"
    hidden_act: Literal["relu2", "silu"] | None = None  # None: the preset's (relu2); silu: 1bitLLM-style FFN
    model_overrides: dict = field(default_factory=dict)
    block_size: int = 128
    batch_size: int = 16
    min_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None
    min_steps: int = 150
    minutes: float | None = None
    fit_depth_to_budget: bool = True
    full_depth_tokens: int = 2_000_000
    learning_rate: float = 4e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    stage2_weight_decay: float = 0.0
    boundary_fraction: float = 0.5
    stage2_peak_ratio: float = 0.3
    eval_steps: int | None = None
    eval_tokens: int = 16384
    logging_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int = 2
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    bf16: bool = False
    num_threads: int | None = None
    save_master: bool = True
    save_packed: bool = True
    sample_prompt: str = "And God said"
    sample_tokens: int = 48
    disable_tqdm: bool = False
    extra_training_args: dict = field(default_factory=dict)


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune_lora`.

    ``model`` is a saved BitNet checkpoint directory with its tokenizer (e.g. ``bitnet-kjv/master`` written by
    ``bitnet-torch train``). ``dataset`` is ``None`` (synthetic KJV chat set of ``num_examples``), a JSON/JSONL
    file or a ``datasets`` name/saved directory with a ``messages`` column. ``merge``: ``None`` (default) merges on
    a master base and keeps the adapter separate on a packed one; ``True`` asks for a merge (refused on a packed
    base); ``False`` never merges.
    """

    model: str
    output_dir: str = "bitnet-kjv-lora"
    base: Literal["master", "packed"] = "master"
    merge: bool | None = None
    dataset: str | None = None
    num_examples: int = 256
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    learning_rate: float = 2e-3
    max_steps: int = 60
    batch_size: int = 8
    max_length: int = 128
    logging_steps: int = 5
    seed: int = 0
    sample_question: str = "How many chapters does Genesis have?"
    sample_tokens: int = 24
    disable_tqdm: bool = False
    bf16: bool | None = None  # None: bf16 on a GPU that supports it, fp32 otherwise
    extra_sft_args: dict = field(default_factory=dict)
