"""The two-stage learning-rate and weight-decay schedule of BitNet b1.58 training from scratch (SPEC §2).

Stage 1 (high learning rate): a short linear warm-up to the peak, then a decay to
``stage1_end_ratio × peak``; weight decay ``weight_decay`` (0.1). About halfway (``boundary_fraction``)
the learning rate drops sharply to ``stage2_peak_ratio × peak`` and decays from there to
``final_ratio × peak`` (stage 2), with weight decay ``stage2_weight_decay`` (0).

:class:`TwoStageSchedule` is a plain callable ``step -> LR multiplier``, so it works as the
``lr_lambda`` of ``torch.optim.lr_scheduler.LambdaLR`` (:func:`build_two_stage_scheduler`), which the
Transformers ``Trainer`` takes as ``optimizers=(optimizer, scheduler)`` and a plain loop steps itself.
The weight-decay half is applied between steps by :func:`apply_weight_decay` (plain loops) or
:class:`~bitnet_torch.training.callbacks.WeightDecayScheduleCallback` (``Trainer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["DECAY_GROUP_KEY", "TwoStageSchedule", "apply_weight_decay", "build_two_stage_scheduler"]

#: Param-group flag set by :func:`~bitnet_torch.training.optim.build_adamw`: groups that take weight decay.
DECAY_GROUP_KEY = "bitnet_weight_decay"


@dataclass(frozen=True)
class TwoStageSchedule:
    """Learning-rate multipliers and weight decay of the two-stage BitNet recipe, by optimizer step.

    Args:
        total_steps: optimizer steps of the whole run (> 0).
        warmup_steps: linear warm-up steps from 0 to the peak (< the stage boundary).
        boundary_fraction: where stage 2 starts, as a fraction of ``total_steps`` (0 < f < 1; paper: about 0.5).
        stage1_end_ratio: LR multiplier reached at the end of stage 1 (decaying from 1).
        stage2_peak_ratio: LR multiplier right after the sharp drop (must be below ``stage1_end_ratio``).
        final_ratio: LR multiplier at the last step.
        decay: shape of both decays, ``"linear"`` or ``"cosine"``.
        weight_decay, stage2_weight_decay: weight decay of stage 1 (0.1) and stage 2 (0).
    """

    total_steps: int
    warmup_steps: int = 0
    boundary_fraction: float = 0.5
    stage1_end_ratio: float = 0.8
    stage2_peak_ratio: float = 0.3
    final_ratio: float = 0.0
    decay: Literal["linear", "cosine"] = "linear"
    weight_decay: float = 0.1
    stage2_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0.0 < self.boundary_fraction < 1.0:
            raise ValueError(f"boundary_fraction must be in (0, 1), got {self.boundary_fraction}")
        if not 0 <= self.warmup_steps < self.boundary_step:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be >= 0 and below the stage boundary (step {self.boundary_step})"
            )
        if not 0.0 <= self.final_ratio <= self.stage2_peak_ratio <= self.stage1_end_ratio <= 1.0:
            raise ValueError(
                "need 0 <= final_ratio <= stage2_peak_ratio <= stage1_end_ratio <= 1, got "
                f"{self.final_ratio}, {self.stage2_peak_ratio}, {self.stage1_end_ratio}"
            )
        if self.decay not in ("linear", "cosine"):
            raise ValueError(f"decay must be 'linear' or 'cosine', got {self.decay!r}")
        if self.weight_decay < 0 or self.stage2_weight_decay < 0:
            raise ValueError("weight decay must be non-negative")

    @property
    def boundary_step(self) -> int:
        """First step of stage 2."""
        return max(1, round(self.total_steps * self.boundary_fraction))

    def stage(self, step: int) -> int:
        """1 or 2."""
        return 1 if step < self.boundary_step else 2

    def _interpolate(self, start: float, end: float, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        if self.decay == "cosine":
            return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return start + (end - start) * progress

    def lr_multiplier(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        boundary = self.boundary_step
        if step < boundary:
            progress = (step - self.warmup_steps) / max(1, boundary - 1 - self.warmup_steps)
            return self._interpolate(1.0, self.stage1_end_ratio, progress)
        progress = (step - boundary) / max(1, self.total_steps - 1 - boundary)
        return self._interpolate(self.stage2_peak_ratio, self.final_ratio, progress)

    def weight_decay_at(self, step: int) -> float:
        """Weight decay of the decayed parameter groups at ``step``."""
        return self.weight_decay if self.stage(step) == 1 else self.stage2_weight_decay

    def __call__(self, step: int) -> float:
        return self.lr_multiplier(step)


def build_two_stage_scheduler(optimizer: torch.optim.Optimizer, schedule: TwoStageSchedule) -> LambdaLR:
    """A ``LambdaLR`` following ``schedule`` (the optimizer's ``lr`` is the peak)."""
    return LambdaLR(optimizer, lr_lambda=schedule)


def apply_weight_decay(optimizer: torch.optim.Optimizer, schedule: TwoStageSchedule, step: int) -> float:
    """Set the weight decay of the decayed param groups for ``step``; returns the value set.

    Groups are decayed when they carry ``DECAY_GROUP_KEY: True`` (as :func:`build_adamw` makes them);
    when no group carries the key, every group with a non-zero weight decay counts as decayed the first
    time and is tagged then. Call it before each optimizer step (cheap).
    """
    value = schedule.weight_decay_at(step)
    groups = optimizer.param_groups
    if not any(DECAY_GROUP_KEY in g for g in groups):
        for group in groups:
            group[DECAY_GROUP_KEY] = group.get("weight_decay", 0.0) > 0
    for group in groups:
        if group[DECAY_GROUP_KEY]:
            group["weight_decay"] = value
    return value
