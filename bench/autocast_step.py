"""Training-step time with bf16 autocast vs float32, side by side (``optim.autocast``).

A real MOSAIC step of the given recipe (its losses, Adam) on batches drawn by the trainer's own
sampler, one per policy order. The two precisions alternate on the same batches so machine noise
hits both alike; compare the ratio of medians, not absolute times. Also prints the loss of each
precision on the first batch, so the speed-up is not read off a broken computation.

bf16 pays off on CPUs with bf16 matrix units (AMX, avx512_bf16) and on GPUs; elsewhere it can be
slower.

    python bench/autocast_step.py [--config configs/smollm2-minors.yaml] [--steps 4]
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
    parser.add_argument("--steps", type=int, default=4, help="timed rounds (after one warm-up round)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args()

    import torch

    from mosaic_safety.config import load_config
    from mosaic_safety.training.trainer import Trainer, optimizer_step, training_autocast

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    batches = one_batch_per_order(trainer)

    def step(batch: list, mode: str) -> None:
        with training_autocast(trainer.model.device, mode):
            loss, _ = trainer.loss(batch)
        optimizer_step(loss, trainer.optimizer, trainer.trainable, config.optim.grad_clip)

    with torch.no_grad():
        losses = {}
        for mode in ("off", "bfloat16"):
            with training_autocast(trainer.model.device, mode):
                losses[mode] = float(trainer.loss(batches[0])[0])
    times: dict[str, list[float]] = {"off": [], "bfloat16": []}
    for rnd in range(args.steps + 1):
        for mode in ("off", "bfloat16"):
            t0 = time.perf_counter()
            for batch in batches:
                step(batch, mode)
            if rnd:  # the first round warms up both
                times[mode].append(time.perf_counter() - t0)
    fp32, bf16 = statistics.median(times["off"]), statistics.median(times["bfloat16"])
    rows = config.optim.batch_size
    print(f"{len(batches)} batches of {rows} rows (orders 1..{len(batches)}), on {trainer.model.device}")
    print(f"loss on the first batch: float32 {losses['off']:.4f} / bf16 autocast {losses['bfloat16']:.4f}")
    print(f"median round: float32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s")
    print(f"ratio bf16 / float32: {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
