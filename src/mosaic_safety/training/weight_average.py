"""An exponential moving average of the learned tensors (``optim.ema``).

Why: at a constant learning rate the control tokens of a SmolLM2 run do not settle. A category's
validation score swings between epochs (0.66 after epoch 6, 0.00 after epoch 7 for one
category of one run; docs/experiments.md), so an end-of-epoch snapshot is a random point on that
path, and choosing an epoch per category picks among noisy points. The average of the recent path
is a steadier point. Validation, the hard-negative measure, the checkpoints' tokens and the
artifact all use the average; the optimiser keeps training the live tensors, which a checkpoint
stores beside Adam's state so ``--resume`` continues the same run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

Named = Sequence[tuple[str, torch.nn.Parameter]]


def ema_decay(decay: float, updates: int) -> float:
    """The decay for the ``updates``-th update: ``min(decay, (1 + n) / (10 + n))``.

    The warm-up keeps the first steps' average from clinging to the initial tensors (the common
    TensorFlow/timm rule): with a flat ``0.99`` the average would still be one third initial
    vectors after a 100-step epoch.
    """
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """Shadow copies of ``named`` parameters, updated after every optimiser step."""

    def __init__(self, named: Named, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.named = list(named)
        self.updates = 0
        self.shadow = {name: p.detach().clone() for name, p in self.named}

    @torch.no_grad()
    def update(self) -> None:
        d = ema_decay(self.decay, self.updates)
        for name, p in self.named:
            self.shadow[name].lerp_(p.detach(), 1 - d)
        self.updates += 1

    @torch.no_grad()
    def apply(self) -> None:
        """Put the average into the parameters (the live tensors are overwritten)."""
        for name, p in self.named:
            p.copy_(self.shadow[name])

    @contextmanager
    def applied(self) -> Iterator[dict[str, torch.Tensor]]:
        """Inside: the parameters hold the average. Yields the live tensors, restored on exit."""
        live = {name: p.detach().clone() for name, p in self.named}
        self.apply()
        try:
            yield live
        finally:
            with torch.no_grad():
                for name, p in self.named:
                    p.copy_(live[name])

    def restore(self, average: dict[str, torch.Tensor], updates: int) -> None:
        """Continue from a checkpoint: ``average`` per name and the updates made so far."""
        missing = [name for name, _ in self.named if name not in average]
        if missing:
            raise KeyError(f"no averaged tensor for {', '.join(missing)}")
        with torch.no_grad():
            for name, p in self.named:
                self.shadow[name].copy_(average[name].to(p.device))
        self.updates = updates
