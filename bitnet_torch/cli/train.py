"""``bitnet-torch train``: train a model from scratch (paper recipe, two-stage schedule)."""

from __future__ import annotations

import argparse
import dataclasses

from ._common import _add_training_options


_TRAIN_HELP = {
    "output_dir": "where the run writes master/ and packed/ (each with the tokenizer), trainer/ checkpoints and "
                  "train_result.json; must be empty or new unless --resume or --overwrite",
    "data": "corpus: 'kjv' (embedded King James Bible), text files/directories, a saved or named datasets dataset",
    "text_column": "column holding the text in a datasets dataset",
    "tokenizer": "reuse a saved tokenizer instead of training a byte-level BPE",
    "vocab_size": "vocabulary of the BPE tokenizer trained on the corpus",
    "preset": "model size preset",
    "hidden_act": "FFN activation: relu2 (BitNet b1.58, the presets' default; GGUF for bitnet.cpp) or silu "
                  "(1bitLLM style; GGUF that upstream llama.cpp runs too)",
    "block_size": "tokens per training sequence",
    "batch_size": "sequences per device per optimizer step (with --minutes: halved on a slow machine, see --min-steps)",
    "min_batch_size": "with --minutes: the smallest batch the calibration may choose",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_steps": "optimizer steps (None: 400, or as many as fit in --minutes)",
    "min_steps": "with --minutes: halve the batch until at least this many steps fit (a model needs steps to learn)",
    "fit_depth_to_budget": "with --minutes: train fewer layers (not below 2) when fewer than --full-depth-tokens "
                           "fit in the budget (a shallower model learns more from a small budget)",
    "full_depth_tokens": "with --minutes: the training tokens below which the model is made shallower",
    "minutes": "time budget (an upper bound): calibrate the step count to finish the schedule within it, stop "
               "training when it runs out",
    "learning_rate": "peak learning rate of stage 1 (BitNet uses several times a float model's)",
    "warmup_fraction": "fraction of steps for the linear warm-up",
    "weight_decay": "stage-1 weight decay",
    "stage2_weight_decay": "stage-2 weight decay",
    "boundary_fraction": "where stage 2 starts (fraction of the steps)",
    "stage2_peak_ratio": "stage-2 peak LR as a fraction of stage 1's",
    "eval_steps": "evaluate every N steps (0: only at the end; default: 4 times per run)",
    "eval_tokens": "validation tokens scored per evaluation (blocks spread over the split; the unigram baseline "
                   "is computed on the same tokens)",
    "logging_steps": "print the loss every N steps (default: about 20 lines per run)",
    "save_steps": "write a resumable checkpoint to OUTPUT_DIR/trainer every N steps (0: none; default: 5 per run)",
    "save_total_limit": "checkpoints kept (the oldest are deleted)",
    "resume": "continue the interrupted run in --output-dir from its last checkpoint (same settings needed)",
    "overwrite": "start again in a non-empty --output-dir, deleting the previous run's files",
    "seed": "random seed",
    "bf16": "train in bfloat16 autocast",
    "num_threads": "CPU threads for PyTorch",
    "save_master": "write the float master checkpoint",
    "save_packed": "write the packed checkpoint",
    "sample_prompt": "prompt of the sample generated at the end",
    "sample_tokens": "tokens of that sample",
    "disable_tqdm": "no progress bars",
}




def run(args: argparse.Namespace) -> int:
    import logging

    from ..training import TrainConfig, train_from_scratch

    if not getattr(args, "verbose", 0):
        logging.getLogger("bitnet_torch").setLevel(logging.INFO)  # the job's progress lines
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = train_from_scratch(config)
    print(f"trained {result.num_parameters / 1e6:.2f}M parameters ({result.num_hidden_layers} layers) for {result.steps} steps of {result.planned_steps} "
          f"planned ({result.batch_size} x {result.block_size} tokens per step, {result.tokens_seen} tokens) "
          f"in {result.train_seconds:.1f}s")
    ratio = result.validation_perplexity / result.unigram_perplexity
    print(f"validation perplexity {result.validation_perplexity:.2f} on {result.eval_tokens} tokens: {ratio:.2f}x the "
          f"unigram baseline {result.unigram_perplexity:.2f}")
    if not result.beat_baseline:
        print("WARNING: the model did NOT beat the unigram baseline: it has learned nothing beyond word frequencies. "
              "Train longer (--minutes, --max-steps) or on a less loaded machine.")
    elif ratio > 0.8:
        print("note: only slightly below the unigram baseline; more training (--minutes) would help.")
    if result.master_dir:
        print(f"master checkpoint: {result.master_dir}")
    if result.packed_dir:
        print(f"packed checkpoint: {result.packed_dir}  (try: bitnet-torch generate {result.packed_dir} "
              f"--prompt \"{config.sample_prompt}\")")
    if result.reloaded_subset_perplexity is not None:
        print(f"reloaded with AutoModelForCausalLM.from_pretrained: perplexity {result.reloaded_subset_perplexity:.2f} "
              "on the validation tokens; sample generated by the reloaded model:")
    if result.sample:
        print(f"sample: {result.sample}")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, heavy_options: bool = True) -> None:
    """Add the ``train`` subcommand to ``sub`` (``--preset`` lists the presets)."""
    p = sub.add_parser("train", parents=[common], help="train a BitNet model from scratch",
                       description="Train a BitNet b1.58 causal LM from scratch with the paper recipe "
                                   "(AdamW 0.9/0.95, two-stage LR and weight decay) and save master + packed checkpoints. "
                                   "Checkpoints every few steps; --resume continues an interrupted run.")
    if heavy_options:
        _add_training_options(p, "TrainConfig", _TRAIN_HELP, run)
        _list_presets(p)


def _list_presets(parser: argparse.ArgumentParser) -> None:
    """Give ``--preset`` its choices and their sizes in the help."""
    try:
        from ..training.presets import PRESETS
    except ImportError:  # the training stack is unavailable: the command says so when run
        return
    for action in parser._actions:
        if action.dest == "preset":
            action.choices = list(PRESETS)
            action.help = ("model size preset: " + "; ".join(f"{name} ({p.description or f'{p.num_hidden_layers} x {p.hidden_size}'})"
                                                            for name, p in PRESETS.items()) + " (default: %(default)s)")
