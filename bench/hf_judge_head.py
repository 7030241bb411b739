"""The local HF judge's LM head at the last position only vs over every position, side by side.

``HFJudge.margins`` reads one next-token distribution per row. Through the model's own forward the
head runs over every position of the judge prompt first, a (batch, length, vocabulary) tensor.
This times both on the same UncensorBench pairs (rounds alternate, so machine noise hits both),
checks that they give the same margins, and prints the size of the tensor the full head holds.

    python bench/hf_judge_head.py --pairs 16 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def full_head_margins(judge, prompts, responses) -> tuple[list[float], int]:
    """The margins through the model's own forward (the head over every position), and the
    largest logits tensor that held, in bytes."""
    out, largest = [0.0] * len(prompts), 0
    for idx, batch in judge.batches(prompts, responses):
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            all_logits = judge.backbone.model(**batch, position_ids=position_ids).logits
        largest = max(largest, all_logits.numel() * all_logits.element_size())
        for i, margin in zip(idx, judge.verdict_margins(all_logits[:, -1, :])):
            out[i] = margin
    return out, largest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--judge", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=16, help="UncensorBench pairs (two replies each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from mosaic_safety.evaluation.hf_judge import HFJudge
    from mosaic_safety.evaluation.judge_validation import load_uncensorbench

    judge = HFJudge.load(args.judge, batch_size=args.batch_size)
    rows = load_uncensorbench(args.pairs)
    prompts = [r.prompt for r in rows for _ in range(2)]
    responses = [reply for r in rows for reply in (r.censored, r.uncensored)]

    times: dict[str, list[float]] = {"last position": [], "every position": []}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        t0 = time.perf_counter()
        ours = judge.margins(prompts, responses)
        t1 = time.perf_counter()
        full, largest = full_head_margins(judge, prompts, responses)
        t2 = time.perf_counter()
        if rnd:
            times["last position"].append(t1 - t0)
            times["every position"].append(t2 - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(prompts)} judge prompts, batch {args.batch_size}, {args.rounds} rounds (medians)")
    for name, value in med.items():
        print(f"  head at {name:14s} {value:7.2f} s")
    print(f"ratio (last / every): {med['last position'] / med['every position']:.2f}")
    print(f"largest all-position logits tensor: {largest / 2**20:.0f} MiB")
    print(f"max margin difference: {max(abs(a - b) for a, b in zip(ours, full)):.2e}")


if __name__ == "__main__":
    main()
