"""Evaluation-style generation with prompt heads shared across policies vs one prefill per row.

The workload of ``mosaic eval`` at order 1: every held-out prompt under the empty policy and each
single-category policy, greedy. "shared" runs each prompt's head once per batch
(``ControlledModel.decode_steps_over_heads``); "plain" prefills every row whole. The two alternate
so machine noise hits both alike; compare the ratio, not absolute times. The tokens must agree.

    python bench/generate_heads.py --artifact runs/smollm2-minors [--prompts 24] [--tokens 24]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts (spread over the groups)")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per response")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, after one untimed warm-up round")
    args = parser.parse_args()

    from mosaic_safety.backbone import load_backbone
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.data import load_suite
    from mosaic_safety.evaluation.table import held_out_groups
    from mosaic_safety.tokens import ControlTokens, read_manifest

    backbone = load_backbone(read_manifest(args.artifact)["backbone"]["name"])
    model = ControlledModel(backbone, ControlTokens.load(args.artifact, backbone.describe()))
    categories = list(model.tokens.categories)
    groups = held_out_groups(load_suite("minors"), categories, "test", args.prompts, seed=0)
    pool = [p for rows in groups.values() for p in rows]
    prompts = [pool[i * len(pool) // args.prompts] for i in range(args.prompts)]
    policies = ["", *categories]
    rows = [(p, q) for q in policies for p in prompts]

    def run(share: bool) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        out = model.generate_ids(
            [p for p, _ in rows], [q for _, q in rows], args.tokens, args.batch, share_heads=share
        )
        return time.perf_counter() - t0, out

    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for rnd in range(args.rounds + 1):
        for share in (True, False):
            seconds, outputs[share] = run(share)
            if rnd:  # the first round warms up both paths (allocations, the prompt-split cache)
                times[share].append(seconds)
    same = sum(a == b for a, b in zip(outputs[True], outputs[False]))
    shared, plain = statistics.median(times[True]), statistics.median(times[False])
    print(f"{len(prompts)} prompts x {len(policies)} policies = {len(rows)} rows, {args.tokens} new tokens")
    print(f"identical responses: {same}/{len(rows)}")
    print(f"median: shared heads {shared:.2f} s, plain {plain:.2f} s")
    print(f"ratio shared / plain: {shared / plain:.2f}")


if __name__ == "__main__":
    main()
