"""What the step benchmarks time: one full batch of each policy order, base answers ready.

Shared by ``step_caches.py``, ``autocast_step.py`` and ``variant_step.py`` (run as scripts from the
repository root, so this directory is on ``sys.path``).
"""

from __future__ import annotations

from typing import Any


def one_batch_per_order(trainer: Any) -> list[list[Any]]:
    """The first full batch of each order in epoch 0's draw, lowest order first, with the base
    model's answers to its negatives generated (cached), so a timed step runs no generation."""
    size = trainer.config.optim.batch_size
    by_order: dict[int, list[Any]] = {}
    for batch in trainer.sampler.epoch_batches(0, size):
        if len(batch) == size:
            by_order.setdefault(batch[0].policy.order, batch)
    batches = [by_order[order] for order in sorted(by_order)]
    negatives = [item.prompt for batch in batches for item in batch if not item.positive]
    trainer.teacher.fill(trainer.teacher.missing(negatives))
    return batches
