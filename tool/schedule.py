"""Optimiser and learning-rate schedules of the two training scripts (SPEC §9)."""
from __future__ import annotations

from typing import Sequence

import torch

POLY_POWER = 0.9
# train_from_init's second phase uses this lr for every group (no group multipliers).
SECOND_PHASE_LR = 0.0007
GROUP_LR_MULTIPLIERS = (1.0, 2.0, 10.0, 20.0)
SCHEDULES = ("poly", "two_phase")
OPTIMIZERS = ("sgd", "adam")


def build_optimizer(param_groups: Sequence[Sequence[torch.nn.Parameter]], lr: float,
                    weight_decay: float, momentum: float | None = None,
                    kind: str = "sgd") -> torch.optim.Optimizer:
    """SGD over the 4 groups (pretrained w/b, from-scratch w/b): lr x1,x2,x10,x20, wd (wd,0,wd,0).

    momentum=None reproduces the released quirk: the weight-decay value lands in SGD's momentum slot.
    kind="adam": AdamW over the same groups, lrs and (decoupled) decays instead (not released: it
    trains a randomly initialised classifier several times faster, see tool/demo.py).
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; valid: {', '.join(OPTIMIZERS)}")
    if len(param_groups) != 4:
        raise ValueError(f"expected 4 parameter groups (SPEC §3), got {len(param_groups)}")
    decays = (weight_decay, 0.0, weight_decay, 0.0)
    groups = [{"params": list(params), "lr": lr * mult, "weight_decay": decay}
              for params, mult, decay in zip(param_groups, GROUP_LR_MULTIPLIERS, decays)]
    if kind == "adam":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=weight_decay if momentum is None else momentum)


class LearningRateSchedule:
    """lr of every group before update t (t = updates already made), or None = leave lrs unchanged."""

    def __init__(self, kind: str, initial_lrs: Sequence[float], max_step: int, cls_steps: float | None = None,
                 seg_lr: float | None = None) -> None:
        """two_phase: phase 1 = the first `cls_steps` updates (default max_step / 2, as released), phase 2
        at base lr `seg_lr` (default: the released 0.0007) for the rest; each phase has its own poly
        decay. poly takes neither."""
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
        if max_step < 1:
            raise ValueError(f"max_step must be >= 1, got {max_step}")
        if cls_steps is not None and not 0 < cls_steps < max_step:
            raise ValueError(f"--cls_steps must be in 1..max_step-1 = {max_step - 1}, got {cls_steps}")
        if kind == "poly" and (cls_steps is not None or seg_lr is not None):
            raise ValueError("--cls_steps and --seg_lr need the two_phase schedule, not poly")
        seg_lr = SECOND_PHASE_LR if seg_lr is None else seg_lr
        if seg_lr <= 0:
            raise ValueError(f"--seg_lr must be positive, got {seg_lr}")
        self.kind = kind
        self.initial_lrs = list(initial_lrs)
        self.max_step = max_step
        self.cls_steps = max_step / 2 if cls_steps is None else cls_steps
        self.seg_lr = seg_lr

    def lrs_at(self, t: int) -> list[float] | None:
        if self.kind == "poly":
            if t >= self.max_step:
                return None
            factor = (1 - t / self.max_step) ** POLY_POWER
            return [lr * factor for lr in self.initial_lrs]
        phase_1 = self.cls_steps
        if t < phase_1:
            factor = (1 - t / phase_1) ** POLY_POWER
            return [lr * factor for lr in self.initial_lrs]
        if t < self.max_step:
            factor = (1 - (t - phase_1) / (self.max_step - phase_1)) ** POLY_POWER
            return [self.seg_lr * factor] * len(self.initial_lrs)
        return None

    def classification_only(self, t: int) -> bool:
        """train_from_init's phase 1 (logits only) lasts while t - 1 < cls_steps (released: max_step / 2)."""
        return self.kind == "two_phase" and t - 1 < self.cls_steps

    def apply(self, optimizer: torch.optim.Optimizer, t: int) -> None:
        lrs = self.lrs_at(t)
        if lrs is not None:
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
