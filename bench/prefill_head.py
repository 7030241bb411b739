"""The first decoding forward: the LM head on a contiguous copy of the last states vs on a slice.

Every generation starts with a prefill that needs the logits of the last position only.
``prefill_logits`` (what the library runs) applies the LM head to a contiguous copy of the last
hidden states. The model's own ``logits_to_keep=1`` applies it to a strided slice, which torch on
CPU runs as a batched product over a per-row copy of the head's weight. Both run on the same
encoded batch of held-out prompts, alternating, for float32 and bf16 weights; the logits must
agree. Compare the ratios, not the times.

    python bench/prefill_head.py [--prompts 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def time_paths(lm: Any, batch: Any, rounds: int) -> tuple[float, float, float]:
    """Median seconds of the sliced and the contiguous prefill, alternating, and their max logit gap."""
    import torch

    from mosaic_safety.controlled import prefill_cache, prefill_logits

    paths = {
        "sliced": lambda: prefill_cache(lm, batch, logits_to_keep=1).logits,
        "contiguous": lambda: prefill_logits(lm, batch).logits,
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    logits = {}
    with torch.no_grad():
        for rnd in range(rounds + 1):
            for name, run in paths.items():
                t0 = time.perf_counter()
                logits[name] = run()
                if rnd:  # the first round warms up both
                    times[name].append(time.perf_counter() - t0)
    gap = float((logits["sliced"].float() - logits["contiguous"].float()).abs().max())
    return statistics.median(times["sliced"]), statistics.median(times["contiguous"]), gap


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=48, help="rows of the batch (neutral test prompts)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()

    from mosaic_safety.backbone import load_backbone
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.data import load_suite

    prompts = [e.prompt for e in load_suite("minors").neutral("test")][: args.prompts]
    for dtype in args.dtypes:
        model = ControlledModel(load_backbone(args.model, "cpu", dtype))
        batch = model.encode(prompts, [None] * len(prompts))
        old, new, gap = time_paths(model.model, batch, args.rounds)
        print(
            f"{dtype}: {len(prompts)} rows of up to {batch.inputs_embeds.shape[1]} positions: sliced {old:.3f} s, "
            f"contiguous {new:.3f} s, ratio {new / old:.2f}; max |logit diff| {gap:.2e}"
        )


if __name__ == "__main__":
    main()
