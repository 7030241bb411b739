"""DSA figures from a trained artifact: guardrail ROC-AUC per category and the alpha trade-off curve.

The trade-off uses two complementary policies (the first half of the trained categories, then the
rest), so every category prompt is a target under one policy and an inactive category under the
other; neutral and boundary prompts count toward over-refusal under both. The judge is the one of
`mosaic train`'s closing table: registry refusal template OR a refusal phrase.

    python bench/dsa_report.py --artifact runs/dsa [--per-group 20] [--auc-per-group 0] \
        [--alphas 0,0.25,0.5,1,step,smooth] [--max-new-tokens 12] [--json runs/dsa/report.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", required=True, type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--per-group", type=int, default=20, help="prompts per group for the trade-off")
    parser.add_argument("--auc-per-group", type=int, default=0, help="prompts per group for the AUC (0: all)")
    parser.add_argument("--alphas", default="0,0.25,0.5,1,step,smooth")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from mosaic_safety.data import load_suite
    from mosaic_safety.data.suites import Suite
    from mosaic_safety.evaluation.judges import AnyJudge, PhraseJudge, TemplateJudge
    from mosaic_safety.evaluation.table import held_out_groups
    from mosaic_safety.methods import load_method
    from mosaic_safety.methods.dsa import alpha_tradeoff, guardrail_auc
    from mosaic_safety.policy import Policy

    method = load_method(artifact=args.artifact)
    suite = load_suite("minors")
    cats = list(method.categories)
    t0 = time.time()
    if args.auc_per_group:  # a seeded sample per group (category, neutral, boundary) of the split
        rng = random.Random(0)
        by_group: dict[str, list] = {}
        for e in suite.split(args.split):
            by_group.setdefault("boundary" if e.is_boundary else e.category, []).append(e)
        rows = [
            x
            for g in by_group.values()
            for x in rng.sample(sorted(g, key=lambda e: e.id), min(len(g), args.auc_per_group))
        ]
        auc_suite = Suite(suite.name, suite.registry, rows)
    else:
        auc_suite = suite
    auc = guardrail_auc(method, auc_suite, args.split, batch_size=args.batch)
    auc_seconds = time.time() - t0
    print("guardrail ROC-AUC (" + args.split + "): " + ", ".join(f"{k} {v:.3f}" for k, v in auc.items()))

    groups = held_out_groups(suite, cats, args.split, args.per_group, seed=0)
    half = max(1, len(cats) // 2)
    policies = (
        [Policy(tuple(cats[:half])), Policy(tuple(cats[half:]))] if len(cats) > 1 else [Policy(tuple(cats))]
    )
    alphas = [a if a in ("step", "smooth") else float(a) for a in args.alphas.split(",")]
    judge = AnyJudge(TemplateJudge(suite.registry), PhraseJudge())
    t1 = time.time()
    curve = alpha_tradeoff(
        method, groups, policies, judge, alphas, max_new_tokens=args.max_new_tokens, batch_size=args.batch
    )
    print(f"alpha trade-off on {args.split} ({args.per_group}/group, policies {[p.key for p in policies]}):")
    for c in curve:
        print(
            f"  alpha {c['alpha']!s:7s} DSR {c['dsr']:.2f}  OR {c['or']:.2f} "
            f"(inactive {c['or_inactive']:.2f}, neutral {c['or_neutral']:.2f}, boundary {c['or_boundary']:.2f})"
        )
    result = {
        "artifact": str(args.artifact),
        "threshold": method.threshold,
        "guardrail_auc": auc,
        "auc_prompts": sum(1 for _ in auc_suite.split(args.split)),
        "auc_seconds": round(auc_seconds, 1),
        "tradeoff": curve,
        "tradeoff_policies": [p.key for p in policies],
        "tradeoff_per_group": args.per_group,
        "tradeoff_seconds": round(time.time() - t1, 1),
        "max_new_tokens": args.max_new_tokens,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
