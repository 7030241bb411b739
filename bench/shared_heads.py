"""Training-step time with the prompt heads shared vs the full forward, side by side.

A real MOSAIC step (refusal CE on positives, CE + KL against the frozen model on negatives, Adam)
on one batch drawn by the trainer's own sampler. "shared" runs each row's prompt up to its control
tokens once without gradients and reuses it for the teacher pass; "full" back-propagates through
the whole sequence and runs the teacher on its own. Steps alternate so machine noise hits both
alike; compare the ratio of medians, not absolute times. The trainer's caches across steps are off
here (both paths would otherwise take prompt heads and teacher states from them after the first
round, which is what ``bench/step_caches.py`` measures).

    python bench/shared_heads.py [--config configs/smollm2-minors.yaml] [--steps 6] [--order 1]
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
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--order", type=int, default=1, help="policy order of the timed batch")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args()

    import torch

    from mosaic_safety.config import load_config
    from mosaic_safety.training.base_states import BaseStates
    from mosaic_safety.training.head_cache import HeadCache
    from mosaic_safety.training.trainer import Trainer, optimizer_step

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    # every step computes its heads and teacher states afresh, as the first epoch does
    trainer.head_cache, trainer.base_states = HeadCache(trainer.model, 0), BaseStates(trainer.model, 0)
    batches = [
        b
        for b in trainer.sampler.epoch_batches(0, config.optim.batch_size)
        if b[0].policy.order == args.order
    ]
    batch = max(batches, key=len)
    trainer.teacher.fill(trainer.teacher.missing([i.prompt for i in batch if not i.positive]))

    with torch.no_grad():  # the two paths compute the same loss
        same = [float(trainer.loss(batch, share)[0]) for share in (True, False)]
    times: dict[bool, list[float]] = {True: [], False: []}
    for step in range(args.steps + 1):
        for share in (True, False):
            t0 = time.perf_counter()
            loss, _ = trainer.loss(batch, share)
            optimizer_step(loss, trainer.optimizer, trainer.trainable, config.optim.grad_clip)
            if step:  # the first round warms up both paths
                times[share].append(time.perf_counter() - t0)
    shared, full = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"batch {len(batch)} rows of order {args.order}, placement {config.tokens.placement}, m {config.tokens.m}"
    )
    print(f"loss shared {same[0]:.6f} / full {same[1]:.6f}")
    print(f"median step: shared heads {shared:.3f} s, full forward {full:.3f} s")
    print(f"ratio shared / full: {shared / full:.2f}")


if __name__ == "__main__":
    main()
