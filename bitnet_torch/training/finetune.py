"""LoRA supervised fine-tuning of a BitNet model with trl's ``SFTTrainer`` (``bitnet-torch finetune``).

:func:`finetune_lora` loads a saved BitNet checkpoint as one of two bases and trains a peft LoRA adapter on
the seven projections with trl on a ``messages``-format chat dataset (by default a synthetic KJV question set
built locally, :func:`bitnet_torch.data.build_kjv_chat_dataset`):

* ``base="master"``: float master weights in ``BitLinear`` (frozen by peft; the LoRA update runs in float
  next to the quantized layer). By default (``merge=None``) or with ``merge=True`` the adapter is then merged
  into the master weights and re-quantized
  (:func:`~bitnet_torch.training.merge_lora_into_master`) and saves the merged model in master and packed
  form; the result reports how far the merged logits moved from the unmerged ones (the quantization change).
* ``base="packed"``: ternary codes in ``PackedBitLinear`` (2 bits per weight in memory, frozen), LoRA through
  :class:`~bitnet_torch.training.PackedBitLinearLoraLayer`. The adapter stays separate (the default; an explicit
  ``merge=True`` is refused: there are no master weights to merge into): it is saved with peft and reloaded on a
  packed base with ``PeftModel.from_pretrained``; the result checks that the reloaded model's logits are
  bit-identical to the trained one's.

Neither path touches the base model's ``quantization_config``. A local ``model`` directory is recorded in the
adapter's ``adapter_config.json`` as an absolute path, so ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)``
finds the base from any working directory without asking the Hub.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, set_seed

from ..data import build_kjv_chat_dataset
from ..data.corpus import is_saved_dataset
from .config import FinetuneConfig
from .lora import apply_lora, bitnet_lora_config, load_adapter, merge_lora_into_master

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune_lora", "load_chat_dataset"]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What :func:`finetune_lora` trained, wrote and checked."""

    adapter_dir: str
    merged_master_dir: str | None
    merged_packed_dir: str | None
    base: str
    trainable_parameters: int
    total_parameters: int
    steps: int
    first_loss: float | None
    final_loss: float | None
    train_seconds: float
    sample: str
    merged_max_abs_logit_diff: float | None
    base_max_abs_logit_diff: float | None
    adapter_reload_exact: bool | None


def load_chat_dataset(source: str | None, num_examples: int, seed: int) -> datasets.Dataset:
    """The SFT dataset: synthetic KJV chat when ``source`` is ``None``; refuses data without ``messages``."""
    if source is None:
        return build_kjv_chat_dataset(num_examples, seed=seed)
    path = Path(source)
    if path.suffix in (".json", ".jsonl"):
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    elif is_saved_dataset(path):
        dataset = datasets.load_from_disk(str(path))
        dataset = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
    else:
        dataset = datasets.load_dataset(source, split="train")
    if "messages" not in dataset.column_names:
        raise ValueError(f"the SFT dataset needs a 'messages' column (chat format); {source!r} has {dataset.column_names}")
    return dataset


def _load_base(model_dir: str, base: str):
    from ..models import BitNetForCausalLM

    if base not in ("master", "packed"):
        raise ValueError(f"base must be 'master' or 'packed', got {base!r}")
    return BitNetForCausalLM.from_pretrained(model_dir, packed=(base == "packed"))


def _resolve_model(model: str) -> str:
    """A local checkpoint directory as an absolute path (what the adapter records as its base); a Hub id as is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _check_recorded_base(adapter_dir: Path, model_path: str) -> None:
    """Make sure ``adapter_config.json`` names the base the adapter was trained on (absolute for a local one)."""
    config_file = adapter_dir / "adapter_config.json"
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    if saved.get("base_model_name_or_path") != model_path:
        # peft records the model's ``name_or_path``; a base built some other way may lack it.
        saved["base_model_name_or_path"] = model_path
        temporary = config_file.with_name(config_file.name + ".tmp")
        temporary.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        temporary.replace(config_file)
    logger.info("adapter base recorded as %s", model_path)


@torch.no_grad()
def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**batch).logits.float()


def finetune_lora(config: FinetuneConfig) -> FinetuneResult:
    """Train a LoRA adapter with trl on a BitNet base; save it (and the merged model); verify; sample.

    Writes ``<output_dir>/adapter`` (peft adapter + tokenizer; its ``base_model_name_or_path`` is the absolute
    path of a local ``model``) and, for ``base="master"`` unless ``merge=False``, ``<output_dir>/merged-master``
    and ``<output_dir>/merged-packed``. Raises ``ValueError`` for an explicit ``merge=True`` on a packed base (the
    adapter is kept separate there by default) and for datasets without ``messages``.
    """
    from trl import SFTConfig, SFTTrainer

    if config.base == "packed" and config.merge:
        raise ValueError(
            "merge=True was asked for on a packed base, which has no float master weights to merge into: leave "
            "merge unset (a packed base keeps the adapter separate) or fine-tune the master checkpoint "
            "(base='master') to merge"
        )
    merge = config.base == "master" if config.merge is None else config.merge
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    model_path = _resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {config.model} has no chat template; SFT on 'messages' needs one")
    model = _load_base(model_path, config.base)
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    dataset = load_chat_dataset(config.dataset, config.num_examples, config.seed)
    peft_model = apply_lora(
        model, bitnet_lora_config(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
    )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA on a %s base: %d trainable of %d parameters", config.base, trainable, total)

    args = SFTConfig(
        output_dir=str(output_dir / "trainer"),
        max_length=config.max_length,
        per_device_train_batch_size=config.batch_size,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, config.max_steps // 20),
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        disable_tqdm=config.disable_tqdm,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for host-to-GPU copies (and warns without one)
        # trl defaults to bf16, which CPUs without a GPU refuse in TrainingArguments; decide explicitly.
        bf16=config.bf16 if config.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        **config.extra_sft_args,
    )
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    adapter_dir = output_dir / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    _check_recorded_base(adapter_dir, model_path)

    messages = [{"role": "user", "content": config.sample_question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    probe = {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"]}
    unmerged_logits = _logits(peft_model, probe)

    merged_master_dir = merged_packed_dir = None
    merged_diff = base_diff = reload_exact = None
    if config.base == "packed":
        reloaded = load_adapter(_load_base(model_path, "packed"), str(adapter_dir))
        reload_exact = bool(torch.equal(_logits(reloaded, probe), unmerged_logits))
        logger.info("separate adapter reloaded on a fresh packed base: logits bit-identical = %s", reload_exact)
        generator = peft_model
    else:
        with peft_model.disable_adapter():
            base_logits = _logits(peft_model, probe)
        if merge:
            merged = merge_lora_into_master(peft_model)
            merged_logits = _logits(merged, probe)
            merged_diff = float((merged_logits - unmerged_logits).abs().max())
            base_diff = float((base_logits - unmerged_logits).abs().max())
            logger.info(
                "merged into master weights and re-quantized: max |logit change| %.4f (the adapter's own effect: %.4f)",
                merged_diff, base_diff,
            )
            merged_master_dir = str(output_dir / "merged-master")
            merged_packed_dir = str(output_dir / "merged-packed")
            merged.save_pretrained(merged_master_dir)
            merged.save_pretrained(merged_packed_dir, packed=True)
            for directory in (merged_master_dir, merged_packed_dir):
                tokenizer.save_pretrained(directory)
            generator = merged
        else:
            generator = peft_model
    generator.eval()
    torch.manual_seed(config.seed)
    with torch.no_grad():
        output = generator.generate(
            **probe, max_new_tokens=config.sample_tokens, do_sample=False,
            eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")],
            pad_token_id=tokenizer.pad_token_id,
        )
    sample = tokenizer.decode(output[0, probe["input_ids"].shape[1]:], skip_special_tokens=True)
    logger.info("Q: %s A: %s", config.sample_question, sample)
    return FinetuneResult(
        adapter_dir=str(adapter_dir),
        merged_master_dir=merged_master_dir,
        merged_packed_dir=merged_packed_dir,
        base=config.base,
        trainable_parameters=trainable,
        total_parameters=total,
        steps=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        train_seconds=train_seconds,
        sample=sample,
        merged_max_abs_logit_diff=merged_diff,
        base_max_abs_logit_diff=base_diff,
        adapter_reload_exact=reload_exact,
    )
