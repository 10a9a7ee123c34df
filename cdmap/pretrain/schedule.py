"""Schedules of a CMID run, all as fractions of the run so short runs work (spec 3.2, 5.4, 7; pitfall 2)."""

from __future__ import annotations

import math

import numpy as np


def ema_momentum(step: int, total: int, base: float = 0.996) -> float:
    """Cosine from ``base`` at step 0 to 1 at step ``total``: ``1 - (1 - base) (cos(pi k / K) + 1) / 2``."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1.0) / 2.0


def warmup_epochs(fraction: float, epochs: int) -> int:
    """The teacher-temperature warm-up in epochs: ``fraction`` of the run, at least 1."""
    return max(1, min(epochs, round(fraction * epochs)))


def teacher_temperature(epoch: int, warmup: int, start: float = 0.04, final: float = 0.07) -> float:
    """``linspace(start, final, warmup)[epoch]`` during the warm-up, then ``final`` (stepped per epoch)."""
    if epoch < warmup:
        return float(np.linspace(start, final, warmup)[epoch]) if warmup > 1 else float(start)
    return float(final)


def learning_rate(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Per-step: linear from ``0.01 lr`` over ``warmup`` steps, then cosine from ``lr`` to ``min_lr``."""
    if step < warmup:
        return lr * (0.01 + 0.99 * step / warmup)
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_warmup_steps(fraction: float, total: int, steps_per_epoch: int) -> int:
    """``fraction`` of the steps, at least one epoch's steps, at most the run."""
    return min(total, max(steps_per_epoch, round(fraction * total)))
