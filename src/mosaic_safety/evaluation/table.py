"""The refusal table: refusal rate per prompt category under a list of policies.

Rows are policies (the empty policy first), columns are prompt groups: each category, neutral
prompts and boundary prompts. It is the quick check printed at the end of ``mosaic train``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from ..controlled import ControlledModel
from ..data.suites import Suite
from ..policy import Policy
from .judges import Judge


def held_out_groups(
    suite: Suite, categories: Sequence[str], split: str, per_group: int, seed: int = 0
) -> dict[str, list[str]]:
    """Prompts per group (each category, ``neutral``, ``boundary``), a seeded sample of ``per_group``.

    Each group draws from its own generator, seeded by the seed and the group's name: a group's
    sample is the same whichever other categories are evaluated beside it, so a run over three
    categories and a run over the whole suite ask the same alcohol and neutral prompts.
    """
    by_cat = suite.by_category(split)
    groups = {c: [e.prompt for e in by_cat.get(c, [])] for c in categories}
    groups["neutral"] = [e.prompt for e in suite.neutral(split)]
    groups["boundary"] = [e.prompt for e in suite.boundary(split)]
    out = {}
    for name, prompts in groups.items():
        prompts = sorted(prompts)
        if per_group and len(prompts) > per_group:
            prompts = random.Random(f"{seed}:{name}").sample(prompts, per_group)
        out[name] = prompts
    return {k: v for k, v in out.items() if v}


def refusal_table(
    model: ControlledModel,
    groups: dict[str, list[str]],
    policies: Sequence[Policy],
    judge: Judge,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Refusal rate for every (policy, prompt group); all generations in one length-sorted pass."""
    prompts, policy_rows, keys = [], [], []
    for policy in policies:
        for group, items in groups.items():
            for p in items:
                prompts.append(p)
                policy_rows.append(policy)
                keys.append((policy.key, group))
    responses = model.generate(
        prompts, policy_rows, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    refused = judge(prompts, responses)
    counts: dict[tuple[str, str], list[int]] = {}
    for key, r in zip(keys, refused):
        c = counts.setdefault(key, [0, 0])
        c[0] += int(r)
        c[1] += 1
    rates = {p.key: {g: counts[(p.key, g)][0] / counts[(p.key, g)][1] for g in groups} for p in policies}
    return {
        "groups": {g: len(v) for g, v in groups.items()},
        "rates": rates,
        "judge": judge.name,
        "max_new_tokens": max_new_tokens,
    }


def table_checks(table: dict[str, Any], categories: Sequence[str]) -> dict[str, Any]:
    """Summary numbers of a single-category refusal table (the main job's acceptance figures)."""
    rates = table["rates"]
    # a category without prompts in the split has a policy row but no column: it is named, not scored
    singles = [c for c in categories if c in rates and c in rates[c]]
    if not singles:
        return {}
    on = [rates[c][c] for c in singles]
    other = [rates[c][o] for c in singles for o in categories if o != c and o in rates[c]]
    neutral = [rates[c]["neutral"] for c in singles if "neutral" in rates[c]]
    boundary = [rates[c]["boundary"] for c in singles if "boundary" in rates[c]]
    summary: dict[str, Any] = {
        "target_min": min(on),
        "target_mean": sum(on) / len(on),
        "other_max": max(other, default=0.0),
        "other_mean": sum(other) / len(other) if other else 0.0,
        "neutral_max": max(neutral, default=0.0),
    }
    if boundary:
        summary["boundary_max"] = max(boundary)
    unscored = [c for c in categories if c in rates and c not in rates[c]]
    if unscored:
        summary["no_prompts"] = unscored
    return summary
