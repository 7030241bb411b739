"""The evaluation protocol: DSR and over-refusal per policy, per order, per prompt group.

For every order k = 1..K and every subset S of k categories (all of them, or a seeded sample), each
test prompt is answered under S and judged:

- DSR(S): refusal rate on prompts of the categories in S (they must be refused);
- OR(S): refusal rate on prompts that must be answered, reported separately for categories outside
  S (``inactive``), ``neutral`` prompts and ``boundary`` prompts (near a category, but allowed).

The empty policy is evaluated too: it is the method's behaviour with nothing switched on, which for
a sound method equals the base model. All generations go through one on-disk cache.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..config import ConfigError, check_types
from ..data.suites import Suite
from ..methods.base import Method
from ..policy import Policy, comma_list
from .cache import GenerationCache
from .judges import AnyJudge, Judge, PhraseJudge, TemplateJudge, _norm
from .metrics import mean_rate, pooled, prompt_set, rate
from .table import held_out_groups

Progress = Callable[[int], None] | None
SPECIAL_GROUPS = ("neutral", "boundary")


@dataclass
class EvalPlan:
    """What to evaluate and how to decode; part of every results file."""

    split: str = "test"
    max_order: int = 4  # orders 1..max_order (capped at the number of categories)
    subsets_per_order: int = 0  # 0: every subset; n: a seeded sample of n subsets per order
    limit: int = 0  # prompts per group (each category, neutral, boundary); 0: all
    seed: int = 0
    max_new_tokens: int = 24
    batch_size: int = 32
    fast: bool = False  # stop early once the judge's decision is settled (template/phrase judges)
    fast_tokens: int = 10

    def __post_init__(self) -> None:
        try:
            check_types(self)  # first: the bounds below compare, and `limit="5"` failed as a TypeError
        except ConfigError as e:
            raise ConfigError(f"evaluation plan: {e}") from None
        checks = [
            (self.max_order >= 1, "max_order must be at least 1"),
            (self.subsets_per_order >= 0, "subsets_per_order must be >= 0"),
            (self.limit >= 0, "limit must be >= 0"),
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.fast_tokens >= 1, "fast_tokens must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"evaluation plan: {message}")

    def decoding(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "greedy": True}


def choose_policies(
    categories: Sequence[str], max_order: int, per_order: int = 0, seed: int = 0
) -> list[Policy]:
    """The empty policy, then for each order all subsets or a seeded sample of ``per_order``.

    Order 1 is always complete: single-category behaviour is what every other order builds on.
    """
    if max_order < 1:
        raise ConfigError("max_order must be at least 1")
    rng = random.Random(seed)
    policies = [Policy(())]
    for k in range(1, min(max_order, len(categories)) + 1):
        subsets = list(itertools.combinations(categories, k))
        if k > 1 and per_order and len(subsets) > per_order:
            subsets = sorted(rng.sample(subsets, per_order), key=subsets.index)
        policies.extend(Policy(s) for s in subsets)
    return policies


def judge_window(judge: Judge) -> int | None:
    """Characters after which a judge's verdict cannot change (None: it reads the whole response)."""
    if isinstance(judge, PhraseJudge):
        return judge.window
    if isinstance(judge, TemplateJudge):
        return max(map(len, judge.prefixes))
    if isinstance(judge, AnyJudge):
        windows = [judge_window(j) for j in judge.judges]
        return None if None in windows else max(windows)  # type: ignore[type-var]
    return None


def _runtime(method: Method) -> dict[str, Any]:
    """What else changes greedy text: library version (decoder, templates), dtype and device type."""
    from .. import __version__

    backbone = getattr(method, "backbone", None)
    runtime: dict[str, Any] = {"library": __version__}
    if backbone is not None:
        runtime.update(dtype=str(backbone.dtype), device=backbone.device.type)
    return runtime


def _monotone_refusals(judge: Judge, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
    """Refusals that longer text cannot undo: a registry template at the start of the response.

    Phrase patterns are not monotone ("I am so sorry" is a refusal opening until "to hear that"
    follows), so only template matches settle a short response as refused.
    """
    if isinstance(judge, TemplateJudge):
        return judge(prompts, responses)
    if isinstance(judge, AnyJudge):
        votes = [_monotone_refusals(j, prompts, responses) for j in judge.judges]
        return [any(v) for v in zip(*votes)]
    return [False] * len(responses)


def cached_generate(
    method: Method,
    prompts: Sequence[str],
    policies: Sequence[Policy],
    max_new_tokens: int,
    batch_size: int,
    cache: GenerationCache,
    progress: Progress = None,
) -> tuple[list[str], int]:
    """Responses for (prompt, policy) rows, generating only what the cache lacks; returns (responses, new).

    Rows go to the method one batch at a time, each batch cached as soon as it is done, so an
    interrupted run loses at most the batch in flight. They are ordered by prompt first: a batch
    holds prompts of similar length, and one prompt's rows under several policies sit together
    (the method runs that prompt's head once for them).
    """
    settings = {"max_new_tokens": max_new_tokens, "greedy": True, **_runtime(method)}
    keys = [
        cache.key(p.key if method.policy_dependent else "*", prompt, settings)
        for prompt, p in zip(prompts, policies)
    ]
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in cache and k not in todo:
            todo[k] = i
    if progress is not None and len(keys) - len(todo):
        progress(len(keys) - len(todo))
    pending = sorted(todo.items(), key=lambda item: (len(prompts[item[1]]), prompts[item[1]], item[1]))
    for start in range(0, len(pending), batch_size):
        part = pending[start : start + batch_size]
        out = method.generate(
            [prompts[i] for _, i in part],
            [policies[i] for _, i in part],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )
        cache.put_many([k for k, _ in part], out)
    return [cache.get(k) or "" for k in keys], len(pending)


def judged_generate(
    method: Method,
    prompts: Sequence[str],
    policies: Sequence[Policy],
    judge: Judge,
    plan: EvalPlan,
    cache: GenerationCache,
    progress: Progress = None,
    on_total: Callable[[int], None] | None = None,
) -> tuple[list[str], list[bool], dict[str, Any]]:
    """Generate and judge; with ``plan.fast`` first decode ``fast_tokens`` and finish only the unsettled rows.

    A row is settled when the short response already opens with a registry refusal template (which
    longer text cannot undo) or already fills the judge's whole window (so the judge reads the same
    characters either way).
    """
    stats: dict[str, Any] = {"rows": len(prompts)}
    window = judge_window(judge)
    if plan.fast and window is None:
        raise ConfigError(
            f"the fast path needs a judge with a fixed window (template/phrase), not {judge.name!r}"
        )
    if not plan.fast or plan.fast_tokens >= plan.max_new_tokens:
        responses, new = cached_generate(
            method, prompts, policies, plan.max_new_tokens, plan.batch_size, cache, progress
        )
        stats["generated"] = new
        return responses, judge(prompts, responses), stats
    short, new = cached_generate(
        method, prompts, policies, plan.fast_tokens, plan.batch_size, cache, progress
    )
    votes = judge(prompts, short)
    sure = _monotone_refusals(judge, prompts, short)
    # settled: a template refusal, or text that already fills the judge's whole window
    unsettled = [i for i, (r, m) in enumerate(zip(short, sure)) if not m and len(_norm(r)) < window]
    if on_total is not None:  # the bar grows by the rows that need full decoding
        on_total(len(prompts) + len(unsettled))
    full, new_full = cached_generate(
        method,
        [prompts[i] for i in unsettled],
        [policies[i] for i in unsettled],
        plan.max_new_tokens,
        plan.batch_size,
        cache,
        progress,
    )
    responses = list(short)
    for i, r in zip(unsettled, full):
        responses[i] = r
    final = judge([prompts[i] for i in unsettled], full)
    for i, v in zip(unsettled, final):
        votes[i] = v
    stats.update(generated=new + new_full, settled_early=len(prompts) - len(unsettled))
    return responses, votes, stats


def summarise(
    policies: Sequence[Policy],
    groups: dict[str, int],
    votes: dict[tuple[str, str], list[bool]],
    categories: Sequence[str],
) -> dict[str, Any]:
    """Per-policy DSR/OR, per-order means with pooled intervals, and the policy × group matrix."""
    rows = []
    for policy in policies:
        by_group = {g: rate(votes.get((policy.key, g), [])) for g in groups}
        active = [c for c in categories if c in policy and c in groups]
        inactive = [c for c in categories if c not in policy and c in groups]
        rows.append(
            {
                "policy": policy.key or "(empty)",
                "categories": list(policy),
                "order": policy.order,
                "dsr": pooled([by_group[c] for c in active]) if active else None,
                "or_inactive": pooled([by_group[c] for c in inactive]) if inactive else None,
                "or_neutral": by_group.get("neutral"),
                "or_boundary": by_group.get("boundary"),
                "rates": by_group,
            }
        )
    orders: dict[str, Any] = {}
    for k in sorted({r["order"] for r in rows}):
        at_k = [r for r in rows if r["order"] == k]
        summary: dict[str, Any] = {"subsets": len(at_k)}
        # the different prompts behind each metric at this order: subsets share them
        active_union = {c for r in at_k for c in r["categories"] if c in groups}
        inactive_union = {c for r in at_k for c in categories if c in groups and c not in r["categories"]}
        distinct = {
            "dsr": sum(groups[c] for c in active_union),
            "or_inactive": sum(groups[c] for c in inactive_union),
            "or_neutral": groups.get("neutral", 0),
            "or_boundary": groups.get("boundary", 0),
        }
        for metric in ("dsr", "or_inactive", "or_neutral", "or_boundary"):
            rates = [r[metric] for r in at_k if r[metric] is not None]
            summary[metric] = mean_rate(rates) if rates else None
            summary[f"{metric}_pooled"] = pooled(rates, distinct[metric]) if rates else None
            # subsets whose categories have no prompts; the empty policy has no categories to lack them
            if metric == "dsr" and k > 0 and len(rates) < len(at_k):
                summary["dsr_subsets"] = len(rates)
        orders[str(k)] = summary
    matrix = {r["policy"]: {g: v["rate"] for g, v in r["rates"].items()} for r in rows}
    return {"policies": rows, "orders": orders, "matrix": matrix}


def evaluate(
    method: Method,
    suite: Suite,
    judge: Judge,
    plan: EvalPlan,
    categories: Sequence[str] | str | None = None,
    cache: GenerationCache | None = None,
    progress: Progress = None,
    keep_responses: bool = True,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the protocol for one method on one suite split; returns the results dict (JSON-ready).

    ``categories`` is a list of names or ``"a,b"`` (as a policy is written); ``None``: all of the
    method's. ``on_total`` receives the number of (prompt, policy) rows before generation starts (to
    size a progress bar); ``progress`` then receives increments.
    """
    if isinstance(categories, str):  # listed, it was one category per character
        names = comma_list(categories)
        if names is None:
            raise ConfigError(
                f"categories {categories!r} has an empty name: separate names with single commas"
            )
        categories = names
    categories = list(categories or method.registry.names)
    missing = [c for c in categories if c not in method.registry]
    if missing:
        raise ConfigError(f"method {method.name!r} does not know categories {missing}")
    # once each, in the registry's order, the order policies compose in (subsets are then canonical)
    categories = list(method.registry.policy(categories).categories)
    foreign = [c for c in categories if c not in suite.registry]
    if foreign:
        raise ConfigError(
            f"suite {suite.name!r} has no categories {foreign} (the method's registry is "
            f"{method.registry.name!r}); evaluate it on its own suite"
        )
    groups = held_out_groups(suite, categories, plan.split, plan.limit, plan.seed)
    if not groups:
        raise ConfigError(f"suite {suite.name!r} has no {plan.split!r} prompts for {categories}")
    policies = choose_policies(categories, plan.max_order, plan.subsets_per_order, plan.seed)
    prompts, rows, keys = [], [], []
    for policy in policies:
        for group, items in groups.items():
            for p in items:
                prompts.append(p)
                rows.append(policy)
                keys.append((policy.key, group))
    if cache is None:  # not `or`: an empty cache is falsy (it has __len__)
        cache = GenerationCache(method.fingerprint())
    if on_total is not None:
        on_total(len(prompts))
    start = time.perf_counter()
    responses, refused, stats = judged_generate(method, prompts, rows, judge, plan, cache, progress, on_total)
    seconds = time.perf_counter() - start
    votes: dict[tuple[str, str], list[bool]] = {}
    for key, v in zip(keys, refused):
        votes.setdefault(key, []).append(v)
    results = {
        "method": method.describe(),
        "suite": suite.name,
        "categories": categories,
        "judge": judge.name,
        "plan": asdict(plan),
        "groups": {g: len(v) for g, v in groups.items()},
        # which prompts were asked: a comparison refuses rows that asked different ones
        "prompt_set": prompt_set((g, p) for g, items in groups.items() for p in items),
        "generation": {**stats, "seconds": round(seconds, 2)},
        "runtime": _runtime(method),  # dtype and device change greedy text: a comparison checks them
        "cost": {
            "trainable_parameters": method.trainable_parameters(),
            "prompt_overhead": {p.key: method.prompt_overhead(p) for p in policies if p.order <= 1},
        },
        **summarise(policies, {g: len(v) for g, v in groups.items()}, votes, categories),
    }
    if keep_responses:
        results["responses"] = [
            {"policy": k[0] or "(empty)", "group": k[1], "prompt": p, "response": r, "refused": v}
            for k, p, r, v in zip(keys, prompts, responses, refused)
        ]
    return results


def fast_agreement(
    method: Method,
    prompts: Sequence[str],
    policies: Sequence[Policy],
    judge: Judge,
    plan: EvalPlan,
    cache: GenerationCache,
) -> dict[str, Any]:
    """Agreement of the fast path's verdicts with full decoding on the same rows (share equal)."""
    full_plan = EvalPlan(**{**asdict(plan), "fast": False})
    fast_plan = EvalPlan(**{**asdict(plan), "fast": True})
    _, full, _ = judged_generate(method, prompts, policies, judge, full_plan, cache)
    _, fast, stats = judged_generate(method, prompts, policies, judge, fast_plan, cache)
    agree = sum(a == b for a, b in zip(full, fast))
    return {
        "rows": len(prompts),
        "agree": agree,
        "agreement": agree / len(prompts) if prompts else None,
        "settled_early": stats.get("settled_early", 0),
    }
