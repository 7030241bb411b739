"""Training-step time with the step caches warm vs without them, side by side.

Real MOSAIC steps (the recipe's losses and Adam) on batches drawn by the trainer's own sampler,
one of each policy order. "cached" takes every row's prompt head from a warm ``HeadCache`` and the
frozen model's states along the negatives' targets from a warm ``BaseStates``: what every epoch
after the first sees, since the same prompts are drawn again. "fresh" runs the heads' prefill and
the teacher passes in the step, as without the caches. Steps alternate so machine noise hits both
alike; compare the ratio of medians, not absolute times.

    python bench/step_caches.py [--config configs/smollm2-minors.yaml] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from step_batches import one_batch_per_order


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/smollm2-minors.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over the batches")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args()

    import torch

    from mosaic_safety.config import load_config
    from mosaic_safety.training.base_states import BaseStates
    from mosaic_safety.training.head_cache import HeadCache
    from mosaic_safety.training.trainer import Trainer, optimizer_step

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    batches = one_batch_per_order(trainer)

    budget = config.optim.cache_mb * 2**20 or 2**32
    caches = {
        "cached": (HeadCache(trainer.model, budget), BaseStates(trainer.model, budget)),
        "fresh": (HeadCache(trainer.model, 0), BaseStates(trainer.model, 0)),
    }
    trainer.head_cache, trainer.base_states = caches["cached"]
    with torch.no_grad():  # warm: what later epochs find
        for batch in batches:
            trainer.loss(batch)

    def step(batch: list, name: str) -> float:
        trainer.head_cache, trainer.base_states = caches[name]
        t0 = time.perf_counter()
        loss, _ = trainer.loss(batch)
        optimizer_step(loss, trainer.optimizer, trainer.trainable, config.optim.grad_clip)
        return time.perf_counter() - t0

    losses = {}
    with torch.no_grad():  # both paths compute the same loss, up to float rounding
        for name in caches:
            trainer.head_cache, trainer.base_states = caches[name]
            losses[name] = float(trainer.loss(batches[0])[0])
    times: dict[str, list[float]] = {"cached": [], "fresh": []}
    for rnd in range(args.rounds + 1):
        for batch in batches:
            for name in caches:
                seconds = step(batch, name)
                if rnd:  # the first round warms up both paths
                    times[name].append(seconds)
    a, b = statistics.median(times["cached"]), statistics.median(times["fresh"])
    print(
        f"{len(batches)} batches of {config.optim.batch_size} rows (orders {[b[0].policy.order for b in batches]}), "
        f"placement {config.tokens.placement}, m {config.tokens.m}, deep {config.tokens.deep}"
    )
    heads, states = caches["cached"]
    print(
        f"heads: {len(heads)} prompts, {heads.bytes / 2**20:.1f} MiB"
        + (f" ({heads.bytes / len(heads) / 2**20:.2f} each)" if len(heads) else " (none at this placement)")
    )
    print(f"base states: {len(states)} (prompt, target) pairs, {states.bytes / 2**20:.2f} MiB")
    print(f"loss cached {losses['cached']:.6f} / fresh {losses['fresh']:.6f}")
    print(f"median step: cached {a:.3f} s, fresh {b:.3f} s")
    print(f"ratio cached / fresh: {a / b:.2f}")


if __name__ == "__main__":
    main()
