"""Train a BitNet b1.58 causal LM from scratch with the Transformers ``Trainer`` and the paper recipe.

:func:`train_from_scratch` is the whole job behind ``bitnet-torch train`` and
``examples/train_from_scratch.py``: load a corpus (the embedded King James Bible by default), train a
byte-level BPE tokenizer, pack blocks, build a :class:`~bitnet_torch.BitNetForCausalLM` from a size preset,
train it with AdamW β=(0.9, 0.95) and the two-stage LR / weight-decay schedule (SPEC §2), report validation
perplexity against the unigram baseline, save the float master and the packed checkpoints, reload the
packed one with ``transformers.AutoModelForCausalLM`` and generate a sample.

It runs unchanged under ``torchrun --nproc_per_node N`` or ``accelerate launch`` (DDP; the ``Trainer``
reads the launcher's environment): every rank trains on its shard of each batch, rank 0 trains the
tokenizer first and the others load it, and only rank 0 writes checkpoints. ``TrainResult.engine`` names
the wrapper the Trainer actually used (``DistributedDataParallel``, ``FullyShardedDataParallel``, …).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from ..data import load_text_splits, pack_documents, pack_token_stream, tokenize_documents, train_bpe_tokenizer
from ..data.baseline import unigram_perplexity
from .callbacks import PerplexityLoggingCallback, TimeBudgetCallback, WeightDecayScheduleCallback
from .evaluation import evaluate_perplexity
from .optim import build_adamw
from .presets import get_preset
from .schedule import TwoStageSchedule, build_two_stage_scheduler

__all__ = ["TrainConfig", "TrainResult", "train_from_scratch", "build_model_from_preset", "parameter_checksum"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything :func:`train_from_scratch` needs; the defaults are the README's CPU demo.

    Data: ``data`` is ``None``/``"kjv"`` (embedded King James Bible), text files/directories, a directory
    saved by ``datasets``, or a ``datasets`` name (``text_column``). ``tokenizer`` is a saved tokenizer to
    reuse; otherwise a byte-level BPE of ``vocab_size`` is trained on the training split.
    Budget: at most ``max_steps`` optimizer steps; with ``minutes`` the step count is calibrated from the
    measured step time so that the two-stage schedule completes within the budget, and training also
    stops when the budget runs out.
    """

    output_dir: str = "bitnet-kjv"
    data: str | list[str] | None = None
    text_column: str = "text"
    tokenizer: str | None = None
    vocab_size: int = 4096
    preset: str = "5m"
    hidden_act: Literal["relu2", "silu"] | None = None  # None: the preset's (relu2); silu: 1bitLLM-style FFN
    model_overrides: dict = field(default_factory=dict)
    block_size: int = 256
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 400
    minutes: float | None = None
    learning_rate: float = 4e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    stage2_weight_decay: float = 0.0
    boundary_fraction: float = 0.5
    stage2_peak_ratio: float = 0.3
    eval_steps: int = 50
    eval_blocks: int = 32
    logging_steps: int = 10
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
class TrainResult:
    """What :func:`train_from_scratch` measured and wrote (``engine``: the wrapper the Trainer trained through)."""

    output_dir: str
    master_dir: str | None
    packed_dir: str | None
    num_parameters: int
    steps: int
    tokens_seen: int
    train_seconds: float
    total_seconds: float
    final_train_loss: float | None
    validation_perplexity: float
    unigram_perplexity: float
    reloaded_subset_perplexity: float | None
    sample: str | None
    parameter_checksum: str
    world_size: int
    engine: str
    log_history: list[dict] = field(default_factory=list)


def build_model_from_preset(
    preset: str, tokenizer: PreTrainedTokenizerBase, max_positions: int | None = None, **overrides
):
    """A freshly initialised trainable ``BitNetForCausalLM`` (float master weights, tied embeddings).

    The vocabulary is the tokenizer's (except for presets that fix their own, which must then cover it);
    ``overrides`` replace preset fields (``hidden_size=64``, ``num_hidden_layers=2``, …).
    """
    from ..models import BitNetConfig, BitNetForCausalLM

    sizes = get_preset(preset)
    kwargs = sizes.config_kwargs(len(tokenizer))
    unknown = set(overrides) - set(kwargs)
    if unknown:
        raise ValueError(f"unknown model overrides {sorted(unknown)}; known: {sorted(kwargs)}")
    kwargs.update(overrides)
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(f"preset {preset!r} has {kwargs['vocab_size']} ids but the tokenizer has {len(tokenizer)}")
    if max_positions is not None:
        kwargs["max_position_embeddings"] = max(kwargs["max_position_embeddings"], max_positions)
    config = BitNetConfig(
        **kwargs,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BitNetForCausalLM(config)


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): equal iff the states are equal."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _load_or_train_tokenizer(config: TrainConfig, train_texts: list[str], args: TrainingArguments):
    if config.tokenizer is not None:
        return AutoTokenizer.from_pretrained(config.tokenizer)
    shared = Path(config.output_dir) / "tokenizer"
    # Rank 0 trains and saves; the other ranks then load the very same files.
    with args.main_process_first(desc="tokenizer"):
        if args.process_index == 0:
            tokenizer = train_bpe_tokenizer(train_texts, vocab_size=config.vocab_size, model_max_length=config.block_size * 8)
            tokenizer.save_pretrained(shared)
        else:
            tokenizer = AutoTokenizer.from_pretrained(shared)
    return tokenizer


def _calibrated_steps(model, train_blocks, config: TrainConfig, args: TrainingArguments) -> int:
    """How many optimizer steps fit in ``config.minutes`` (capped by ``max_steps``), from timed micro-batches.

    One untimed warm-up pass, then the fastest of three timed forward+backward passes: on a shared machine
    a single timing can be many times too slow, and over-running is caught by :class:`TimeBudgetCallback`.
    """
    device = args.device
    batch = torch.as_tensor(train_blocks[: config.batch_size]["input_ids"]).to(device)
    model.to(device).train()
    timings = []
    for _ in range(4):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            model(input_ids=batch, labels=batch).loss.backward()
        timings.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    # Forward+backward of a micro-batch, ×accumulation, +20 % for the optimizer step, logging and evaluation.
    step_seconds = min(timings[1:]) * config.gradient_accumulation_steps * 1.2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([step_seconds], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        step_seconds = float(t.item())
    steps = max(10, int(config.minutes * 60 / step_seconds))
    logger.info("calibration: ~%.2f s per step -> %d steps fit in %.1f min", step_seconds, steps, config.minutes)
    return min(config.max_steps, steps)


def _sample(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    torch.manual_seed(seed)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        top_k=40,
        temperature=0.8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0], skip_special_tokens=True)


def train_from_scratch(config: TrainConfig) -> TrainResult:
    """Run the whole from-scratch job described in the module docstring; returns a :class:`TrainResult`.

    Checkpoints (rank 0 only): ``<output_dir>/master`` (float master weights, ``quantization_mode:
    online``) and ``<output_dir>/packed`` (ternary codes, ``offline``, what bitnet.cpp's converter reads),
    each with the tokenizer. Raises ``ValueError`` for an unknown preset or a corpus too small to split.
    """
    started = time.perf_counter()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if config.eval_steps > 0 else "no",
        eval_steps=config.eval_steps if config.eval_steps > 0 else None,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        disable_tqdm=config.disable_tqdm,
        ddp_find_unused_parameters=False,
        **({"use_cpu": True} if config.bf16 and not torch.cuda.is_available() else {}),  # CPU bf16 autocast
        **config.extra_training_args,
    )

    splits = load_text_splits(config.data, text_column=config.text_column)
    tokenizer = _load_or_train_tokenizer(config, splits.train, args)
    train_stream = tokenize_documents(tokenizer, splits.train)
    train_blocks = pack_token_stream(train_stream, config.block_size)
    validation_blocks = pack_documents(tokenizer, splits.validation, config.block_size)
    baseline = unigram_perplexity(
        train_stream, torch.as_tensor(validation_blocks[:]["input_ids"])[:, 1:], vocab_size=len(tokenizer)
    )
    logger.info(
        "corpus %s: %d training tokens (%d blocks of %d), %d validation blocks; unigram perplexity %.1f",
        splits.name, train_stream.numel(), len(train_blocks), config.block_size, len(validation_blocks), baseline,
    )

    overrides = {**({"hidden_act": config.hidden_act} if config.hidden_act else {}), **config.model_overrides}
    model = build_model_from_preset(config.preset, tokenizer, max_positions=config.block_size, **overrides)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("model: preset %s, %.2fM parameters", config.preset, num_parameters / 1e6)

    total_steps = config.max_steps if config.minutes is None else _calibrated_steps(model, train_blocks, config, args)
    args.max_steps = total_steps
    boundary = max(1, round(total_steps * config.boundary_fraction))
    schedule = TwoStageSchedule(
        total_steps=total_steps,
        warmup_steps=min(max(1, round(config.warmup_fraction * total_steps)), boundary - 1),
        boundary_fraction=config.boundary_fraction,
        stage2_peak_ratio=config.stage2_peak_ratio,
        weight_decay=config.weight_decay,
        stage2_weight_decay=config.stage2_weight_decay,
    )
    optimizer = build_adamw(model, lr=config.learning_rate, weight_decay=config.weight_decay)
    callbacks = [WeightDecayScheduleCallback(schedule), PerplexityLoggingCallback(baseline)]
    if config.minutes is not None:
        callbacks.append(TimeBudgetCallback(config.minutes * 60))
    eval_subset = validation_blocks.select(range(min(config.eval_blocks, len(validation_blocks))))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=eval_subset if config.eval_steps > 0 else None,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        optimizers=(optimizer, build_two_stage_scheduler(optimizer, schedule)),
        callbacks=callbacks,
    )
    train_start = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - train_start
    steps = trainer.state.global_step
    tokens_seen = steps * config.batch_size * config.gradient_accumulation_steps * args.world_size * config.block_size
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    engine = type(trainer.model_wrapped).__name__  # DistributedDataParallel, FullyShardedDataParallel, or the model
    model = trainer.model
    validation_ppl = evaluate_perplexity(model, validation_blocks, batch_size=config.batch_size)
    checksum = parameter_checksum(model)
    logger.info("validation perplexity %.2f vs unigram baseline %.1f", validation_ppl, baseline)

    master_dir = packed_dir = None
    reloaded_ppl = sample = None
    if trainer.is_world_process_zero():
        if config.save_master:
            master_dir = str(output_dir / "master")
            model.save_pretrained(master_dir)
            tokenizer.save_pretrained(master_dir)
        if config.save_packed:
            packed_dir = str(output_dir / "packed")
            model.save_pretrained(packed_dir, packed=True)
            tokenizer.save_pretrained(packed_dir)
        reload_dir = packed_dir or master_dir
        if reload_dir is not None:
            # Check the saved checkpoint against the in-memory model on the evaluation subset, then generate.
            reloaded = AutoModelForCausalLM.from_pretrained(reload_dir).to(args.device)
            reloaded_ppl = evaluate_perplexity(reloaded, eval_subset, batch_size=config.batch_size)
            in_memory_ppl = evaluate_perplexity(model, eval_subset, batch_size=config.batch_size)
            sample = _sample(reloaded, tokenizer, config.sample_prompt, config.sample_tokens, config.seed)
            logger.info(
                "reloaded %s: perplexity %.3f on %d validation blocks (in-memory model: %.3f); sample: %s",
                reload_dir, reloaded_ppl, len(eval_subset), in_memory_ppl, sample,
            )
    if args.world_size > 1:
        args.distributed_state.wait_for_everyone()

    return TrainResult(
        output_dir=str(output_dir),
        master_dir=master_dir,
        packed_dir=packed_dir,
        num_parameters=num_parameters,
        steps=steps,
        tokens_seen=tokens_seen,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        final_train_loss=train_losses[-1] if train_losses else train_output.training_loss,
        validation_perplexity=validation_ppl,
        unigram_perplexity=baseline,
        reloaded_subset_perplexity=reloaded_ppl,
        sample=sample,
        parameter_checksum=checksum,
        world_size=args.world_size,
        engine=engine,
        log_history=list(trainer.state.log_history),
    )
