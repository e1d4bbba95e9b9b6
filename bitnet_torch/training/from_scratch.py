"""Train a BitNet b1.58 causal LM from scratch with the Transformers ``Trainer`` and the paper recipe.

:func:`train_from_scratch` is the whole job behind ``bitnet-torch train`` and
``examples/train_from_scratch.py``: load a corpus (the embedded King James Bible by default), train a
byte-level BPE tokenizer, pack blocks, build a :class:`~bitnet_torch.BitNetForCausalLM` from a size preset,
train it with AdamW β=(0.9, 0.95) and the two-stage LR / weight-decay schedule (docs/SPEC.md §2), report validation
perplexity against the unigram baseline, save the float master and the packed checkpoints, reload the
packed one with ``transformers.AutoModelForCausalLM`` and generate a sample.

It runs unchanged under ``torchrun --nproc_per_node N`` or ``accelerate launch`` (DDP; the ``Trainer``
reads the launcher's environment): every rank trains on its shard of each batch, rank 0 trains the
tokenizer first and the others load it, and only rank 0 writes checkpoints. ``TrainResult.engine`` names
the wrapper the Trainer actually used (``DistributedDataParallel``, ``FullyShardedDataParallel``, …).

A run writes into ``output_dir``: ``tokenizer/``, ``train_job.json`` (the settings and the planned step
count, written before training), ``trainer/checkpoint-N`` (the Trainer's periodic checkpoints, the last
``save_total_limit`` kept), then ``master/`` and ``packed/`` and ``train_result.json``. A non-empty
``output_dir`` is refused unless ``overwrite`` (start again: the old checkpoints are removed) or ``resume``
(continue from the last checkpoint with the saved plan: the same steps, batches and learning rates as an
uninterrupted run).

With a time budget (``minutes``) the step count is sized from a quick calibration of this machine; on a
slow (or loaded) machine the model is made shallower and the batch smaller so that it still sees enough
tokens and optimizer steps to learn, and the log says when the budget is too short to finish the schedule. The budget is an upper bound: training stops when it runs
out (with a warning that the schedule was cut short).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

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
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data import load_text_splits, pack_documents, pack_token_stream, tokenize_documents, train_bpe_tokenizer
from ..data.baseline import unigram_perplexity
from .callbacks import PerplexityLoggingCallback, TimeBudgetCallback, WeightDecayScheduleCallback
from .config import TrainConfig
from .evaluation import evaluate_perplexity
from .optim import build_adamw
from .presets import get_preset
from .schedule import TwoStageSchedule, build_two_stage_scheduler

__all__ = [
    "OutputDirError",
    "TrainConfig",
    "TrainResult",
    "build_model_from_preset",
    "evaluation_subset",
    "last_complete_checkpoint",
    "parameter_checksum",
    "train_from_scratch",
]

logger = logging.getLogger(__name__)


#: Files and directories a run writes into its ``output_dir`` (what ``overwrite`` replaces).
JOB_FILE = "train_job.json"
RESULT_FILE = "train_result.json"
_RUN_ENTRIES = ("tokenizer", "trainer", "master", "packed", JOB_FILE, RESULT_FILE)
#: Settings that a resumed run must share with the run it continues (the rest may differ: threads, bars...).
_RESUME_FIXED = (
    "data", "text_column", "tokenizer", "vocab_size", "preset", "hidden_act", "model_overrides", "block_size",
    "gradient_accumulation_steps", "learning_rate", "warmup_fraction", "weight_decay", "stage2_weight_decay",
    "boundary_fraction", "stage2_peak_ratio", "seed", "bf16",
)


def _model_overrides(config: "TrainConfig") -> dict:
    """The preset fields this run replaces: ``model_overrides``, plus ``hidden_act`` when the config sets one."""
    return {**({"hidden_act": config.hidden_act} if config.hidden_act else {}), **config.model_overrides}


class OutputDirError(FileExistsError):
    """The output directory holds a previous run and neither ``overwrite`` nor ``resume`` was asked for."""


@dataclass
class TrainResult:
    """What :func:`train_from_scratch` measured and wrote (``engine``: the wrapper the Trainer trained through).

    ``steps`` of ``planned_steps`` were run (fewer when the time budget ran out) with ``batch_size`` sequences
    of ``block_size`` tokens; perplexities are over the same ``eval_tokens`` validation tokens.
    ``resumed_from_step``: the checkpoint a resumed run continued from.
    """

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
    planned_steps: int = 0
    batch_size: int = 0
    block_size: int = 0
    eval_tokens: int = 0
    resumed_from_step: int | None = None
    num_hidden_layers: int = 0

    @property
    def beat_baseline(self) -> bool:
        """True when the validation perplexity is below the unigram baseline (the model learned from context)."""
        return self.validation_perplexity < self.unigram_perplexity


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
    if config.resume and (shared / "tokenizer.json").is_file():
        logger.info("resuming: loading the tokenizer of the interrupted run from %s", shared)
        return AutoTokenizer.from_pretrained(shared)
    # Rank 0 trains and saves; the other ranks then load the very same files.
    with args.main_process_first(desc="tokenizer"):
        if args.process_index == 0:
            logger.info("training a byte-level BPE tokenizer (%d tokens) on the training split...", config.vocab_size)
            tokenizer = train_bpe_tokenizer(train_texts, vocab_size=config.vocab_size, model_max_length=config.block_size * 8)
            tokenizer.save_pretrained(shared)
        else:
            tokenizer = AutoTokenizer.from_pretrained(shared)
    return tokenizer


def _write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON all-or-nothing (a temporary file renamed over ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``folder`` that the Trainer finished writing, or ``None``.

    The Trainer writes a checkpoint's ``trainer_state.json`` last (after the weights, optimizer, scheduler
    and RNG states), so a checkpoint whose state file is missing or unreadable was interrupted mid-save
    (a killed run) and is skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.iterdir():
        name, _, number = path.name.rpartition("-")
        if name == PREFIX_CHECKPOINT_DIR and number.isdigit() and path.is_dir():
            steps.append((int(number), path))
    for _, path in sorted(steps, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("skipping the incomplete checkpoint %s (interrupted while it was written)", path)
            continue
        return path
    return None


def _prepare_output_dir(config: TrainConfig, is_main: bool) -> dict | None:
    """Refuse a previous run's directory unless asked; returns the saved job (``resume``) or ``None``.

    ``overwrite`` removes what an earlier run wrote (its checkpoints above all, so that a later ``resume``
    cannot pick them up) and nothing else. Raises :class:`OutputDirError` or ``ValueError``.
    """
    output_dir = Path(config.output_dir)
    if config.resume and config.overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run in the directory, "
                         "overwrite starts it again")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"the output directory {output_dir} is a file")
    entries = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if config.resume:
        job_path = output_dir / JOB_FILE
        if not job_path.is_file():
            raise OutputDirError(f"nothing to resume in {output_dir}: no {JOB_FILE} (a run of `bitnet-torch train` "
                                 "writes it before training)")
        job = json.loads(job_path.read_text(encoding="utf-8"))
        saved = job.get("config", {})
        current = json.loads(json.dumps(dataclasses.asdict(config), default=str))
        different = [f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in _RESUME_FIXED if saved.get(k) != current.get(k)]
        if different:
            raise ValueError("resume needs the settings of the interrupted run; these differ: " + "; ".join(different))
        if last_complete_checkpoint(output_dir / "trainer") is None:
            raise OutputDirError(f"nothing to resume in {output_dir}: the run wrote no checkpoint yet "
                                 f"(checkpoints go to {output_dir / 'trainer'}); start again with --overwrite")
        return job
    if entries and not config.overwrite:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise OutputDirError(f"the output directory {output_dir} is not empty ({shown}): pass --resume to continue "
                             "its last checkpoint, --overwrite to replace it, or another --output-dir")
    if entries and is_main:
        for name in _RUN_ENTRIES:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        logger.info("overwrite: removed the previous run's files in %s", output_dir)
    return None


def evaluation_subset(blocks, max_tokens: int):
    """At most ``max_tokens`` tokens of ``blocks``: whole blocks spread evenly over the split (all if they fit)."""
    block_size = len(blocks[0]["input_ids"])
    count = max(1, min(len(blocks), max_tokens // block_size))
    if count >= len(blocks):
        return blocks
    stride = len(blocks) / count
    return blocks.select([int(i * stride) for i in range(count)])


def _step_seconds(model, batch: torch.Tensor, config: TrainConfig, args: TrainingArguments) -> float:
    """Seconds of one optimizer step of ``batch``: one untimed warm-up pass, then the mean of two timed ones.

    Plus 25 % for the optimizer step, logging, evaluations and checkpoints (on a loaded machine the Trainer's
    steps measured 1.3-1.4x a bare forward+backward). Over-running is caught by :class:`TimeBudgetCallback`.
    Under ``torch.distributed`` every rank uses the slowest rank's timing.
    """
    model.to(args.device).train()
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            model(input_ids=batch, labels=batch).loss.backward()
        timings.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    seconds = sum(timings[1:]) / len(timings[1:]) * config.gradient_accumulation_steps * 1.25
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([seconds], device=args.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        seconds = float(t.item())
    return seconds


def _plan_steps(model, tokenizer, train_blocks, config: TrainConfig, args: TrainingArguments):
    """``(steps, batch_size, model, model_overrides)`` for ``config.minutes``, from timings on this machine.

    1. Depth: when the budget holds fewer than ``full_depth_tokens`` training tokens for the preset and
       ``fit_depth_to_budget`` is on, the model gets half the layers (not below 2), repeatedly: on a small
       compute budget a shallower model learns more (KJV, 400k tokens in the same time: 2 layers reach
       0.33x the unigram perplexity where 4 layers reach 0.52x at half the tokens).
    2. Batch: when fewer than ``min_steps`` steps fit, the batch is halved (down to ``min_batch_size``; a
       pass's time is close to proportional to its sequences): a model needs optimizer steps to learn.
    """
    overrides = _model_overrides(config)
    batch = torch.as_tensor(train_blocks[: config.batch_size]["input_ids"]).to(args.device)
    budget = config.minutes * 60
    tokens_per_step = config.batch_size * config.gradient_accumulation_steps * args.world_size * config.block_size
    logger.info("calibrating: timing 3 forward+backward passes of %d x %d tokens...", config.batch_size, config.block_size)
    step_seconds = _step_seconds(model, batch, config, args)
    layers = model.config.num_hidden_layers
    while config.fit_depth_to_budget and layers > 2 and budget / step_seconds * tokens_per_step < config.full_depth_tokens:
        layers = max(2, layers // 2)
        logger.info(
            "calibration: ~%.2f s per step -> only ~%d tokens fit in %.1f min (under %d): trying %d layers instead "
            "(a shallower model learns more from a small budget)...",
            step_seconds, budget / step_seconds * tokens_per_step, config.minutes, config.full_depth_tokens, layers,
        )
        overrides["num_hidden_layers"] = layers
        set_seed(config.seed)  # the same initialisation as a run (or a resumed run) that starts with these sizes
        model = build_model_from_preset(config.preset, tokenizer, max_positions=config.block_size, **overrides)
        step_seconds = _step_seconds(model, batch, config, args)
    batch_size = config.batch_size
    fit = int(budget / step_seconds)
    while fit < config.min_steps and batch_size // 2 >= max(1, config.min_batch_size):
        batch_size //= 2
        step_seconds /= 2
        fit = int(budget / step_seconds)
    steps = max(10, fit if config.max_steps is None else min(config.max_steps, fit))
    logger.info(
        "calibration: ~%.2f s per step of %d x %d tokens -> %d steps (%d tokens) in %.1f min with %d layers%s",
        step_seconds, batch_size, config.block_size, steps, steps * batch_size * config.block_size, config.minutes,
        layers, f" (batch halved from {config.batch_size} so that enough steps fit)" if batch_size != config.batch_size else "",
    )
    if fit < config.min_steps:
        logger.warning(
            "this machine fits only ~%d optimizer steps in %.1f min (at least %d are needed to learn well): expect a "
            "model close to the unigram baseline; give more time (--minutes %.0f)",
            fit, config.minutes, config.min_steps, math.ceil(config.minutes * config.min_steps / max(fit, 1)),
        )
    return steps, batch_size, model, overrides


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


def _every(total_steps: int, given: int | None, per_run: int) -> int:
    """An interval in steps: ``given``, or about ``per_run`` times per run."""
    return given if given is not None else max(1, total_steps // per_run)


def train_from_scratch(config: TrainConfig) -> TrainResult:
    """Run the whole from-scratch job described in the module docstring; returns a :class:`TrainResult`.

    Checkpoints (rank 0 only): ``<output_dir>/master`` (float master weights, ``quantization_mode:
    online``) and ``<output_dir>/packed`` (ternary codes, ``offline``, what bitnet.cpp's converter reads),
    each with the tokenizer. Raises ``ValueError`` for an unknown preset or a corpus too small to split,
    :class:`OutputDirError` for a previous run's directory without ``overwrite``/``resume``.
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
        max_steps=config.max_steps or 400,
        logging_steps=config.logging_steps or 10,
        eval_strategy="no",
        save_strategy="no",
        save_total_limit=config.save_total_limit,
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        disable_tqdm=config.disable_tqdm,
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for host-to-GPU copies (and warns without one)
        **({"use_cpu": True} if config.bf16 and not torch.cuda.is_available() else {}),  # CPU bf16 autocast
        **config.extra_training_args,
    )
    job = _prepare_output_dir(config, is_main=args.process_index == 0)
    if args.world_size > 1:
        args.distributed_state.wait_for_everyone()  # every rank checked the directory before anything is written

    logger.info("loading the corpus (%s)...", config.data or "the King James Bible")
    splits = load_text_splits(config.data, text_column=config.text_column)
    tokenizer = _load_or_train_tokenizer(config, splits.train, args)
    logger.info("tokenizing and packing %d training and %d validation documents...", len(splits.train), len(splits.validation))
    train_stream = tokenize_documents(tokenizer, splits.train)
    train_blocks = pack_token_stream(train_stream, config.block_size)
    validation_blocks = pack_documents(tokenizer, splits.validation, config.block_size)
    # Every evaluation scores the same bounded subset, spread over the split; the baseline is taken on it too.
    eval_subset = evaluation_subset(validation_blocks, config.eval_tokens)
    eval_tokens = len(eval_subset) * (config.block_size - 1)
    baseline = unigram_perplexity(
        train_stream, torch.as_tensor(eval_subset[:]["input_ids"])[:, 1:], vocab_size=len(tokenizer)
    )
    logger.info(
        "corpus %s: %d training tokens (%d blocks of %d), %d validation blocks (%d tokens scored); unigram perplexity %.1f",
        splits.name, train_stream.numel(), len(train_blocks), config.block_size, len(validation_blocks), eval_tokens,
        baseline,
    )

    overrides = _model_overrides(config) if job is None else dict(job["model_overrides"])
    model = build_model_from_preset(config.preset, tokenizer, max_positions=config.block_size, **overrides)
    if job is not None:
        total_steps, batch_size = int(job["total_steps"]), int(job["batch_size"])
        logger.info("resuming the planned %d steps of %d sequences", total_steps, batch_size)
    elif config.minutes is not None:
        total_steps, batch_size, model, overrides = _plan_steps(model, tokenizer, train_blocks, config, args)
    else:
        total_steps, batch_size = config.max_steps or 400, config.batch_size
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("model: preset %s%s, %.2fM parameters", config.preset,
                f" with {overrides}" if overrides else "", num_parameters / 1e6)
    args.max_steps = total_steps
    args.per_device_train_batch_size = args.per_device_eval_batch_size = batch_size
    args.logging_steps = _every(total_steps, config.logging_steps, 20)
    eval_steps = _every(total_steps, config.eval_steps, 4)
    if eval_steps > 0:
        args.eval_strategy, args.eval_steps = "steps", eval_steps
    save_steps = _every(total_steps, config.save_steps, 5)
    if save_steps > 0:
        args.save_strategy, args.save_steps = "steps", save_steps
    if job is None and args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / JOB_FILE, {"config": dataclasses.asdict(config), "total_steps": total_steps,
                                            "batch_size": batch_size, "model_overrides": overrides})

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
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=eval_subset if eval_steps > 0 else None,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        optimizers=(optimizer, build_two_stage_scheduler(optimizer, schedule)),
        callbacks=callbacks,
    )
    resume_from = str(last_complete_checkpoint(args.output_dir)) if job is not None else None
    logger.info(
        "training: %d steps of %d x %d tokens, loss every %d steps, validation every %s, checkpoints every %s in %s%s",
        total_steps, batch_size, config.block_size, args.logging_steps,
        f"{eval_steps} steps" if eval_steps > 0 else "(only at the end)",
        f"{save_steps} steps" if save_steps > 0 else "(none)", args.output_dir,
        f"; resuming from {resume_from}" if resume_from else "",
    )
    train_start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - train_start
    steps = trainer.state.global_step
    tokens_seen = steps * batch_size * config.gradient_accumulation_steps * args.world_size * config.block_size
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if steps < total_steps:
        logger.warning("training stopped at step %d of the %d planned (time budget): the learning-rate schedule did "
                       "not finish, so the model is less trained than planned", steps, total_steps)

    engine = type(trainer.model_wrapped).__name__  # DistributedDataParallel, FullyShardedDataParallel, or the model
    model = trainer.model
    logger.info("final validation on %d tokens...", eval_tokens)
    validation_ppl = evaluate_perplexity(model, eval_subset, batch_size=batch_size, progress=not config.disable_tqdm)
    checksum = parameter_checksum(model)
    logger.info("validation perplexity %.2f vs unigram baseline %.1f (%.2fx)", validation_ppl, baseline,
                validation_ppl / baseline)

    master_dir = packed_dir = None
    reloaded_ppl = sample = None
    if trainer.is_world_process_zero():
        if config.save_master:
            master_dir = str(output_dir / "master")
            logger.info("saving the float master checkpoint to %s...", master_dir)
            model.save_pretrained(master_dir)
            tokenizer.save_pretrained(master_dir)
        if config.save_packed:
            packed_dir = str(output_dir / "packed")
            logger.info("saving the packed checkpoint to %s...", packed_dir)
            model.save_pretrained(packed_dir, packed=True)
            tokenizer.save_pretrained(packed_dir)
        reload_dir = packed_dir or master_dir
        if reload_dir is not None:
            # Check the saved checkpoint against the in-memory model on the evaluation subset, then generate.
            logger.info("reloading %s with AutoModelForCausalLM and checking it on the validation tokens...", reload_dir)
            reloaded = AutoModelForCausalLM.from_pretrained(reload_dir).to(args.device)
            reloaded_ppl = evaluate_perplexity(reloaded, eval_subset, batch_size=batch_size, progress=not config.disable_tqdm)
            sample = _sample(reloaded, tokenizer, config.sample_prompt, config.sample_tokens, config.seed)
            logger.info(
                "reloaded %s: perplexity %.3f on %d validation tokens (in-memory model: %.3f); sample: %s",
                reload_dir, reloaded_ppl, eval_tokens, validation_ppl, sample,
            )
    if args.world_size > 1:
        args.distributed_state.wait_for_everyone()

    result = TrainResult(
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
        planned_steps=total_steps,
        batch_size=batch_size,
        block_size=config.block_size,
        eval_tokens=eval_tokens,
        resumed_from_step=int(Path(resume_from).name.rpartition("-")[2]) if resume_from else None,
        num_hidden_layers=model.config.num_hidden_layers,
    )
    if trainer.is_world_process_zero():
        _write_json(output_dir / RESULT_FILE, dataclasses.asdict(result))
    return result
