"""``bitnet-torch finetune``: LoRA fine-tuning with trl."""

from __future__ import annotations

import argparse
import dataclasses

from ._common import _require_path, _add_training_options


_FINETUNE_HELP = {
    "output_dir": "where adapter/ (and merged-master/, merged-packed/) are written",
    "base": "master: LoRA next to the float master weights (can merge); packed: on the 2-bit codes (adapter only)",
    "merge": "merge the adapter into the master weights and re-quantize (default: yes on a master base; a packed "
             "base keeps the adapter separate, and --merge there is an error)",
    "dataset": "chat data with a 'messages' column: JSON/JSONL file, saved or named datasets dataset "
               "(default: a synthetic KJV question set)",
    "num_examples": "size of the synthetic KJV chat set",
    "r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "learning_rate": "peak learning rate",
    "max_steps": "optimizer steps",
    "batch_size": "sequences per step",
    "max_length": "tokens per example (longer ones are cut)",
    "logging_steps": "log the loss every N steps",
    "seed": "random seed",
    "sample_question": "question answered by the fine-tuned model at the end",
    "sample_tokens": "tokens of that answer",
    "disable_tqdm": "no progress bars",
    "bf16": "train in bfloat16 (default: only on a GPU that supports it)",
}


def run(args: argparse.Namespace) -> int:
    from ..training import FinetuneConfig, finetune_lora

    _require_path(args.model, "model directory", "dir")
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = finetune_lora(config)
    loss = "" if result.first_loss is None else f"; loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
    print(f"fine-tuned {result.trainable_parameters / 1e6:.3f}M LoRA parameters ({result.base} base) for "
          f"{result.steps} steps in {result.train_seconds:.1f}s{loss}")
    print(f"adapter: {result.adapter_dir} (load it with peft.AutoPeftModelForCausalLM.from_pretrained(path) after "
          "import bitnet_torch)")
    for label, path in (("merged master", result.merged_master_dir), ("merged packed", result.merged_packed_dir)):
        if path:
            print(f"{label}: {path}")
    print(f"sample: {result.sample}")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, heavy_options: bool = True) -> None:
    """Add the ``finetune`` subcommand to ``sub``."""
    p = sub.add_parser("finetune", parents=[common], help="LoRA fine-tuning with trl",
                       description="Fine-tune a BitNet checkpoint with LoRA adapters through trl's SFTTrainer on "
                                   "chat data; optionally merge into the master weights and re-pack.")
    p.add_argument("model", help="BitNet checkpoint directory with its tokenizer (e.g. bitnet-kjv/master)")
    if heavy_options:
        _add_training_options(p, "FinetuneConfig", _FINETUNE_HELP, run)
