"""Inference cost of every method relative to the base model, measured side by side in one run.

Each method answers the same prompts under the same order-2 policies with the same greedy budget;
rounds are interleaved (none, in_context, mosaic, ..., none, ...) so machine noise hits all alike.
Printed: median seconds per round and the ratio to ``none``, prompt overhead in positions, trainable
parameters, and the training time recorded in each artifact's manifest.

    python bench/method_cost.py --artifact mosaic=runs/smollm2-minors --artifact dsa=runs/dsa \\
        [--prompts 16] [--new-tokens 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--artifact", action="append", default=[], help="NAME=DIR of a trained method")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()

    from mosaic_safety.backbone import load_backbone
    from mosaic_safety.data import load_suite
    from mosaic_safety.methods import load_method
    from mosaic_safety.policy import Policy
    from mosaic_safety.tokens import MANIFEST_FILE

    backbone = load_backbone(args.model, "cpu", "float32")
    suite = load_suite("minors")
    methods = {
        "none": load_method("none", backbone=backbone),
        "in_context": load_method("in_context", backbone=backbone),
    }
    for spec in args.artifact:
        name, _, path = spec.partition("=")
        methods[name] = load_method(artifact=path, backbone=backbone)
    tests = suite.split("test")
    prompts = [e.prompt for e in tests[:: max(1, len(tests) // args.prompts)]][: args.prompts]
    pairs = [("alcohol", "betting"), ("horror", "sex"), ("addiction", "alcohol"), ("betting", "horror")]
    for name, m in methods.items():  # the timed policies are minors pairs: every method must know them
        missing = sorted({c for pair in pairs for c in pair} - set(m.registry.names))
        if missing:
            raise SystemExit(f"{name}: no {', '.join(missing)}; this benchmark times minors pairs")
    policies = [Policy(pairs[i % len(pairs)]) for i in range(len(prompts))]
    for m in methods.values():  # warm-up: first-call costs (allocations, caches) are not inference cost
        m.generate(prompts[:2], policies[:2], max_new_tokens=2, batch_size=args.batch)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        for name, m in methods.items():
            start = time.perf_counter()
            m.generate(prompts, policies, max_new_tokens=args.new_tokens, batch_size=args.batch)
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    base = statistics.median(times["none"])
    rows = []
    for name, m in methods.items():
        train_s = None
        art = dict(s.split("=", 1) for s in args.artifact).get(name)
        if art:
            manifest = json.loads((Path(art) / MANIFEST_FILE).read_text())
            train_s = (manifest.get("training") or {}).get("seconds")
        med = statistics.median(times[name])
        rows.append(
            {
                "method": name,
                "seconds_per_round": round(med, 3),
                "ratio_to_none": round(med / base, 3),
                "prompt_overhead": sum(m.prompt_overhead(p) for p in set(policies)) / len(set(policies)),
                "trainable_parameters": m.trainable_parameters(),
                "training_seconds": train_s,
            }
        )
    print(
        f"\n{len(prompts)} prompts x order-2 policies, {args.new_tokens} greedy tokens, {args.rounds} rounds"
    )
    print(f"{'method':<14}{'s/round':>9}{'vs none':>9}{'overhead':>10}{'params':>12}{'train s':>9}")
    for r in rows:
        print(
            f"{r['method']:<14}{r['seconds_per_round']:>9.2f}{r['ratio_to_none']:>9.2f}{r['prompt_overhead']:>10.0f}"
            f"{r['trainable_parameters']:>12,}{(r['training_seconds'] or 0):>9.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
