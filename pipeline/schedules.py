"""The learning rate of every optimizer step, for each schedule `train.schedule` names.

With T = `epochs`, W = `warmup_epochs`, lr, warmup_lr and min_lr from the training config:

- `step-cosine` (vitfold's, per step s of S = T · steps_per_epoch, W · steps_per_epoch warm-up steps w):
      s < w:  warmup_lr + (lr − warmup_lr) · s / w
      else:   min_lr + ½ (lr − min_lr) (1 + cos(π · (s − w) / (S − w)))
- `epoch-cosine` (timm's `CosineLRScheduler`, `warmup_prefix=False`: the warm-up overlays the cosine's
  first epochs instead of preceding it), a value per epoch t:
      t < W:  warmup_lr + (lr − warmup_lr) · t / W
      t < T:  min_lr + ½ (lr − min_lr) (1 + cos(π · t / T))
- `warm-restarts` (torch's `CosineAnnealingWarmRestarts(T_0=restart_epochs, T_mult=restart_mult,
  eta_min=min_lr)`, no warm-up): cycle n lasts T_i = T_0 · T_mult^n epochs and starts at
  T_0 (T_mult^n − 1) / (T_mult − 1) (n · T_0 when T_mult = 1); t_cur epochs into it,
      min_lr + ½ (lr − min_lr) (1 + cos(π · t_cur / T_i))

Every schedule is min_lr from t = T on, for the `cooldown_epochs` after the T epochs (the official RLRR
loop: 100 + 10). The two per-epoch schedules run as the official loops run them: `scheduler.step(e)`
after epoch e, so epoch e trains at the value for t = max(e − 1, 0) (the value set when the scheduler is
built serves epochs 0 and 1, and the first cool-down epoch still trains at t = T − 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vitfold.pipeline.config import TrainConfig

SCHEDULES = ("step-cosine", "epoch-cosine", "warm-restarts")


def steps_per_epoch(images: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps in one epoch: full batches, and the last partial one unless `drop_last`."""
    return images // batch_size if drop_last else math.ceil(images / batch_size)


def _cosine(tc: TrainConfig, progress: float) -> float:
    """min_lr + ½ (lr − min_lr)(1 + cos(π · progress)), progress in [0, 1]."""
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def _timm_cosine(tc: TrainConfig, t: int) -> float:
    """timm CosineLRScheduler at epoch t < T (warmup_prefix=False, one cycle)."""
    if t < tc.warmup_epochs:
        return tc.warmup_lr + (tc.lr - tc.warmup_lr) * t / tc.warmup_epochs
    return _cosine(tc, t / tc.epochs)


def _warm_restarts(tc: TrainConfig, t: int) -> float:
    """CosineAnnealingWarmRestarts(T_0=restart_epochs, T_mult=restart_mult, eta_min=min_lr) at epoch t < T,
    with torch's own arithmetic for the cycle (its `step(epoch)`)."""
    first, mult = tc.restart_epochs, tc.restart_mult
    if t < first:
        return _cosine(tc, t / first)
    if mult == 1:
        return _cosine(tc, (t % first) / first)
    n = int(math.log(t / first * (mult - 1) + 1, mult))  # the cycle t is in
    return _cosine(tc, (t - first * (mult**n - 1) / (mult - 1)) / (first * mult**n))


def _per_epoch(value: Callable[[TrainConfig, int], float], tc: TrainConfig, per_epoch: int) -> list[float]:
    """Epoch e at value(t = max(e − 1, 0)) (min_lr from t = T on), as the official loops step it."""
    at = [value(tc, t) if t < tc.epochs else tc.min_lr for t in (max(e - 1, 0) for e in range(tc.total_epochs))]
    return [lr for lr in at for _ in range(per_epoch)]


def _step_cosine(tc: TrainConfig, per_epoch: int) -> list[float]:
    total = tc.epochs * per_epoch
    warmup = int(tc.warmup_epochs * per_epoch)
    return [
        tc.warmup_lr + (tc.lr - tc.warmup_lr) * s / warmup
        if s < warmup
        else _cosine(tc, min(1.0, (s - warmup) / max(1, total - warmup)))
        for s in range(total)
    ]


def learning_rates(tc: TrainConfig, per_epoch: int) -> list[float]:
    """The learning rate of every optimizer step of a run of `tc.total_epochs` epochs of `per_epoch` steps."""
    if tc.schedule == "step-cosine":
        return _step_cosine(tc, per_epoch) + [tc.min_lr] * (tc.cooldown_epochs * per_epoch)
    return _per_epoch(_timm_cosine if tc.schedule == "epoch-cosine" else _warm_restarts, tc, per_epoch)
