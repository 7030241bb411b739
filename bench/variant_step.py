"""Training-step time of two recipe variants, side by side, with warm step caches.

Each variant is the config with its own overrides (``--a``, ``--b``), built into its own trainer
(the backbone is loaded once per variant). Both take one batch of each policy order from their own
sampler and warm their step caches on them as the variant configures them (what every epoch after
the first sees; ``optim.cache_mb=0`` times a variant without caches). Then real steps (loss,
backward, Adam) alternate between the variants, so machine noise hits both alike. Compare the
ratio of medians, not absolute times.

    python bench/variant_step.py --a tokens.placement=user_end --b tokens.placement=assistant
    python bench/variant_step.py --a tokens.m=10 --b tokens.m=20 --rounds 5
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from typing import Any

from step_batches import one_batch_per_order


def warm_trainer(config_path: str, overrides: list[str]) -> tuple[Any, list[list[Any]]]:
    """A trainer with its own step caches (as the variant configures them, ``optim.cache_mb``) warm
    on one full batch per order: what every epoch after the first finds."""
    import torch

    from mosaic_safety.config import load_config
    from mosaic_safety.training.trainer import Trainer

    trainer = Trainer(load_config(config_path, overrides))
    batches = one_batch_per_order(trainer)
    with torch.no_grad():
        for batch in batches:
            trainer.loss(batch)
    return trainer, batches


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/smollm2-minors.yaml")
    parser.add_argument("--a", default="", help="overrides of variant A, space-separated key.sub=value")
    parser.add_argument("--b", default="", help="overrides of variant B")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over the batches")
    args = parser.parse_args()

    from mosaic_safety.training.trainer import optimizer_step

    variants = {name: shlex.split(spec) for name, spec in (("A", args.a), ("B", args.b))}
    warm = {name: warm_trainer(args.config, overrides) for name, overrides in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in warm}
    for rnd in range(args.rounds + 1):
        for name, (trainer, batches) in warm.items():
            t0 = time.perf_counter()
            for batch in batches:
                loss, _ = trainer.loss(batch)
                optimizer_step(loss, trainer.optimizer, trainer.trainable, trainer.config.optim.grad_clip)
            if rnd:  # the first round warms up both
                times[name].append(time.perf_counter() - t0)
    for name, (_, batches) in warm.items():
        rows = sum(map(len, batches))
        print(
            f"{name}: {' '.join(variants[name]) or '(the config)'}: median round "
            f"{statistics.median(times[name]):.3f} s over {len(batches)} batches, {rows} rows"
        )
    ratio = statistics.median(times["B"]) / statistics.median(times["A"])
    print(f"ratio B / A: {ratio:.2f}")


if __name__ == "__main__":
    main()
