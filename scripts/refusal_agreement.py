"""Is a refusal decided by the policy or by the prompt? Read from a `mosaic eval` results.json.

For every category prompt, count how many of the *other* categories' single policies refuse it
(0-4 with five categories). If the tokens were selective, each other-category refusal would be a
rare, independent slip and the counts would sit near a binomial with the mean rate. If the tokens
just lower one refusal threshold, the prompt decides: the counts pile up at 0 and at 4.

    python scripts/refusal_agreement.py runs/eval/mosaic/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path


def agreement(results: dict) -> dict[str, object]:
    categories = list(results["categories"])
    verdicts: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    for row in results["responses"]:
        if row["group"] in categories and "," not in row["policy"]:
            verdicts[(row["group"], row["prompt"])][row["policy"]] = row["refused"]
    needed = {"(empty)", *categories}
    for (group, prompt), by_policy in verdicts.items():
        if missing := needed - by_policy.keys():
            raise ValueError(
                f"{group} prompt {prompt[:40]!r} has no verdict under {', '.join(sorted(missing))}: "
                "evaluate the empty policy and every single-category policy (orders 1+, all subsets)"
            )
    if not verdicts or len(categories) < 2:
        raise ValueError("needs category prompts and at least two categories")
    counts, own, base = Counter(), Counter(), Counter()
    others = len(categories) - 1
    for (group, _), by_policy in verdicts.items():
        k = sum(by_policy[c] for c in categories if c != group)
        counts[k] += 1
        own[k] += by_policy[group]
        base[k] += by_policy["(empty)"]
    n = sum(counts.values())
    rate = sum(k * v for k, v in counts.items()) / (n * others)
    return {
        "prompts": n,
        "other_rate": rate,
        "observed": [counts[k] for k in range(others + 1)],
        "independent": [
            n * math.comb(others, k) * rate**k * (1 - rate) ** (others - k) for k in range(others + 1)
        ],
        "own_refused": [own[k] for k in range(others + 1)],
        "base_refused": [base[k] for k in range(others + 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json written by `mosaic eval`")
    args = parser.parse_args()
    try:
        a = agreement(json.loads(args.results.read_text()))
    except (OSError, ValueError, KeyError) as exc:  # missing file, broken JSON, another protocol
        raise SystemExit(f"{args.results}: {exc}") from None
    print(f"{a['prompts']} category prompts, other-category refusal {a['other_rate']:.0%}")
    print("other policies refusing | prompts | if independent | own policy refuses | base refuses")
    for k, seen in enumerate(a["observed"]):
        print(
            f"{k:>23d} | {seen:>7d} | {a['independent'][k]:>14.1f} | "
            f"{a['own_refused'][k]:>11d} of {seen:<3d}  | {a['base_refused'][k]:>5d} of {seen}"
        )


if __name__ == "__main__":
    main()
