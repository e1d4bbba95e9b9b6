"""Transformers ``Trainer`` callbacks of the BitNet recipe; both act between steps, never inside forward.

* :class:`WeightDecayScheduleCallback` -- weight decay 0.1 in stage 1, 0 in stage 2 (docs/SPEC.md §2).
* :class:`LambdaWarmupCallback` -- the gradual-quantization λ = min(step / warmup, 1) of every BitLinear
  (docs/SPEC.md §2), for converting a pretrained full-precision model.
* :class:`TimeBudgetCallback` -- stop after a wall-time budget (all ranks at the same step), saying so.
* :class:`PerplexityLoggingCallback` -- report ``exp(eval_loss)`` next to a baseline.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..nn import set_lambda
from ..quant import lambda_schedule
from .schedule import TwoStageSchedule, apply_weight_decay

__all__ = ["LambdaWarmupCallback", "PerplexityLoggingCallback", "TimeBudgetCallback", "WeightDecayScheduleCallback"]

logger = logging.getLogger(__name__)


class WeightDecayScheduleCallback(TrainerCallback):
    """Sets the decayed param groups' ``weight_decay`` from a :class:`TwoStageSchedule` before every step."""

    def __init__(self, schedule: TwoStageSchedule) -> None:
        self.schedule = schedule

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise RuntimeError("WeightDecayScheduleCallback needs the Trainer to pass its optimizer")
        before = self.schedule.weight_decay_at(max(state.global_step - 1, 0))
        value = apply_weight_decay(optimizer, self.schedule, state.global_step)
        if state.global_step > 0 and value != before:
            logger.info("step %d: stage 2 begins, weight decay %.3g -> %.3g", state.global_step, before, value)


class LambdaWarmupCallback(TrainerCallback):
    """Sets λ = ``lambda_schedule(global_step, warmup_steps)`` on every BitLinear before each step.

    At the end of training λ is left where the schedule put it; a warning says so when it is below 1
    (the saved model is then evaluated fully quantized, which it was not fully trained for).
    """

    def __init__(self, warmup_steps: int) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps

    def _apply(self, model, step: int) -> float:
        if model is None:
            raise RuntimeError("LambdaWarmupCallback needs the Trainer to pass its model")
        value = lambda_schedule(step, self.warmup_steps)
        if set_lambda(model, value) == 0:
            raise ValueError("LambdaWarmupCallback: the model has no BitLinear layers")
        return value

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(kwargs.get("model"), state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(kwargs.get("model"), state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        final = lambda_schedule(state.global_step, self.warmup_steps)
        if final < 1.0:
            logger.warning(
                "training ended at λ=%.3f (< 1): the λ warm-up (%d steps) did not finish", final, self.warmup_steps
            )


class TimeBudgetCallback(TrainerCallback):
    """Stops training once ``seconds`` of wall time have passed since training began (a resumed run: since it
    resumed), with a warning ("time budget reached ... at step N of M") when that cuts the planned steps short.

    Under ``torch.distributed`` the decision is all-reduced after every step so that every rank stops at
    the same step (a rank stopping alone would hang the others in their next gradient all-reduce).
    """

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"the time budget must be positive, got {seconds} s")
        self.seconds = seconds
        self._start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        assert self._start is not None, "on_train_begin was not called"
        over = time.perf_counter() - self._start > self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if over else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag.item() > 0)
        if over and not control.should_training_stop:
            if state.global_step < state.max_steps:
                logger.warning("time budget reached (%.0f s) at step %d of %d: stopping training early",
                               self.seconds, state.global_step, state.max_steps)
            control.should_training_stop = True
        return control


class PerplexityLoggingCallback(TrainerCallback):
    """Adds ``eval_perplexity = exp(eval_loss)`` to the evaluation metrics and logs it next to a baseline."""

    def __init__(self, baseline_perplexity: float | None = None) -> None:
        self.baseline_perplexity = baseline_perplexity

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            perplexity = math.exp(min(metrics["eval_loss"], 50.0))
            metrics["eval_perplexity"] = perplexity
            # The Trainer logged these metrics just before this event; record the perplexity with them.
            if state.log_history and state.log_history[-1].get("eval_loss") == metrics["eval_loss"]:
                state.log_history[-1]["eval_perplexity"] = perplexity
            if state.is_world_process_zero:
                baseline = f" (unigram baseline {self.baseline_perplexity:.1f})" if self.baseline_perplexity else ""
                logger.info("step %d: validation perplexity %.2f%s", state.global_step, perplexity, baseline)
