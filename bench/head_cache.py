"""Training-step time with the prompt heads kept across steps vs run afresh each step, side by side.

Real MOSAIC steps (the recipe's losses and Adam) on batches drawn by the trainer's own sampler,
one of each policy order. "cached" takes every row's prompt head from a warm ``HeadCache``: what
every epoch after the first sees, since the same prompts are drawn again. "fresh" runs the heads'
prefill in the step, as without the cache. Steps alternate so machine noise hits both alike;
compare the ratio of medians, not absolute times.

    python bench/head_cache.py [--config configs/smollm2-minors.yaml] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time


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
    from mosaic_safety.training.head_cache import HeadCache
    from mosaic_safety.training.trainer import Trainer, optimizer_step

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    by_order: dict[int, list] = {}
    for batch in trainer.sampler.epoch_batches(0, config.optim.batch_size):
        if len(batch) == config.optim.batch_size:
            by_order.setdefault(batch[0].policy.order, batch)
    batches = [by_order[o] for o in sorted(by_order)]
    trainer.teacher.fill(trainer.teacher.missing([i.prompt for b in batches for i in b if not i.positive]))

    cached = HeadCache(trainer.model, config.optim.cache_mb * 2**20 or 2**32)
    fresh = HeadCache(trainer.model, 0)
    for batch in batches:  # warm: what later epochs find
        cached.heads([i.prompt for i in batch])

    def step(batch: list, cache: HeadCache) -> float:
        trainer.head_cache = cache
        t0 = time.perf_counter()
        loss, _ = trainer.loss(batch)
        optimizer_step(loss, trainer.optimizer, trainer.trainable, config.optim.grad_clip)
        return time.perf_counter() - t0

    with torch.no_grad():  # both paths compute the same loss, up to float rounding
        trainer.head_cache = cached
        with_cache = float(trainer.loss(batches[0])[0])
        trainer.head_cache = fresh
        without = float(trainer.loss(batches[0])[0])
    times: dict[str, list[float]] = {"cached": [], "fresh": []}
    for rnd in range(args.rounds + 1):
        for batch in batches:
            for name, cache in (("cached", cached), ("fresh", fresh)):
                seconds = step(batch, cache)
                if rnd:  # the first round warms up both paths
                    times[name].append(seconds)
    a, b = statistics.median(times["cached"]), statistics.median(times["fresh"])
    print(
        f"{len(batches)} batches of {config.optim.batch_size} rows (orders {sorted(by_order)}), "
        f"placement {config.tokens.placement}, m {config.tokens.m}, deep {config.tokens.deep}"
    )
    mib = cached.bytes / 2**20
    print(f"cache: {len(cached)} prompts, {mib:.1f} MiB ({mib / len(cached):.2f} MiB each)")
    print(f"loss cached {with_cache:.6f} / fresh {without:.6f}")
    print(f"median step: cached heads {a:.3f} s, fresh heads {b:.3f} s")
    print(f"ratio cached / fresh: {a / b:.2f}")


if __name__ == "__main__":
    main()
