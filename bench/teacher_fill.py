"""Base-answer generation for negatives in length-sorted chunks vs alphabetical chunks, side by side.

``BaseResponseCache.fill`` generates in chunks of ``teacher.batch_size`` prompts. Each chunk is one
left-padded batch, so a chunk that mixes short and long prompts runs every row at the longest one's
length. The two orders alternate so machine noise hits both alike; compare the ratio. Greedy
answers must agree (up to float rounding in near-ties).

    python bench/teacher_fill.py [--config configs/smollm2-minors.yaml] [--prompts 144] [--rounds 2]
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
    parser.add_argument("--prompts", type=int, default=144)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, after one untimed warm-up round")
    args = parser.parse_args()

    from mosaic_safety.config import load_config
    from mosaic_safety.training.trainer import Trainer

    config = load_config(args.config, [])
    trainer = Trainer(config)
    model, size, tokens = trainer.model, config.teacher.batch_size, config.teacher.max_new_tokens
    pool = trainer.sampler.negative_prompts()  # sorted alphabetically, as fill used to chunk them
    alphabetical = [pool[i * len(pool) // args.prompts] for i in range(args.prompts)]
    by_length = sorted(alphabetical, key=lambda p: (sum(map(len, model.split_prompt(p))), p))

    def run(order: list[str]) -> tuple[float, dict[str, list[int]]]:
        t0 = time.perf_counter()
        out = {}
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            out.update(zip(chunk, model.generate_ids(chunk, [None] * len(chunk), tokens, size)))
        return time.perf_counter() - t0, out

    times: dict[str, list[float]] = {"length-sorted": [], "alphabetical": []}
    answers = {}
    for rnd in range(args.rounds + 1):
        for name, order in (("length-sorted", by_length), ("alphabetical", alphabetical)):
            seconds, answers[name] = run(order)
            if rnd:  # the first round warms up both orders
                times[name].append(seconds)
    same = sum(answers["length-sorted"][p] == answers["alphabetical"][p] for p in alphabetical)
    a, b = statistics.median(times["length-sorted"]), statistics.median(times["alphabetical"])
    print(
        f"{args.prompts} prompts, chunks of {size}, {tokens} new tokens; identical answers {same}/{args.prompts}"
    )
    print(f"median: length-sorted {a:.1f} s, alphabetical {b:.1f} s; ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
