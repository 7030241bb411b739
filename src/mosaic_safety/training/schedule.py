"""Learning-rate schedules as a pure function of the global step.

A function of the step alone (no scheduler object with its own state) keeps ``--resume`` exact:
the resumed run recomputes the same rate from the step it restarts at.
"""

from __future__ import annotations

import math

FLOOR = 0.1  # cosine and linear decay end at this fraction of the peak rate


def lr_at(step: int, total: int, peak: float, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning rate for (0-based) ``step`` of a ``total``-step run."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return peak * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "linear":
        return peak * (1 - (1 - FLOOR) * progress)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}: constant | cosine | linear")


def set_lr(optimizer: object, lr: float) -> None:
    """Set every group's rate to ``lr`` times the group's own ``lr_scale`` (1 when it has none)."""
    for group in optimizer.param_groups:  # type: ignore[attr-defined]
        group["lr"] = lr * group.get("lr_scale", 1.0)
