"""Inference cost of DSA vs the bare base model, timed side by side in one run.

Same prompts, same batch, same number of greedy steps (EOS ignored, so every variant does equal
work). Variants: the base model (decoder + LM head only), DSA with alpha = 0 for every row (the
guardrail runs, the adapter never does), DSA targeted (alpha from the guardrail, policy = every
trained category), and DSA with alpha = 1 for every row (adapter + second LM-head product at every
step: the worst case). Runs are interleaved so machine noise hits all alike; the ratios of medians
are what to compare across machines. The FLOP ratios from parameter counts are printed too.

    python bench/dsa_overhead.py --artifact runs/dsa [--prompts 16] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", required=True, type=Path)
    parser.add_argument("--model", default=None, help="default: the artifact's model")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from mosaic_safety.data import load_suite
    from mosaic_safety.methods import load_method
    from mosaic_safety.methods.dsa import compute_overhead
    from mosaic_safety.policy import Policy

    method = load_method(artifact=args.artifact, model=args.model, device=args.device, dtype="float32")
    suite = load_suite("minors")
    rows = sorted(suite.split("test"), key=lambda e: e.id)
    step = max(1, len(rows) // args.prompts)
    prompts = [e.prompt for e in rows[::step][: args.prompts]]
    policy = Policy(method.categories)
    variants = {
        "base": dict(view=method, plain=True),
        "dsa alpha=0": dict(view=method.with_alpha(0.0), plain=False),
        "dsa targeted": dict(view=method.with_mode(method.options.alpha_mode), plain=False),
        "dsa alpha=1": dict(view=method.with_alpha(1.0), plain=False),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    fired: list[float] = []
    batches = [prompts[s : s + args.batch] for s in range(0, len(prompts), args.batch)]
    encoded = [method.model.encode(b, [Policy(())] * len(b)) for b in batches]
    for r in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, v in variants.items():
            t0 = time.perf_counter()
            for b, batch in zip(batches, encoded):
                _, alpha = v["view"].decode(
                    batch, [policy] * len(b), args.new_tokens, stop_at_eos=False, plain=v["plain"]
                )
                if name == "dsa targeted" and r == 0:
                    fired.extend(alpha.tolist())
            if r:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["base"])
    result = {
        "model": method.backbone.name,
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "repeats": args.repeats,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "time_ratio": {k: statistics.median(v) / base for k, v in times.items()},
        "targeted_alpha_mean": sum(fired) / len(fired),
        "flops": compute_overhead(method),
    }
    for name, ratio in result["time_ratio"].items():
        print(f"{name:14s} {result['median_seconds'][name]:7.2f}s  x{ratio:.3f}")
    print(
        f"targeted: mean alpha {result['targeted_alpha_mean']:.2f} over these prompts (policy: all categories)"
    )
    f = result["flops"]
    print(
        f"FLOP ratio per token: alpha>0 x{f['flops_ratio_alpha_on']:.3f}, alpha=0 x{f['flops_ratio_alpha_off']:.5f}; "
        f"side-network parameters {f['dsa_params']:,} ({f['param_ratio']:.2%} of the model)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
