"""How well a refusal judge agrees with labelled data, on two packaged validation sets.

* **JailbreakBench 0.1.3** ``data/classifier_comparison.csv``: 100 (goal, jailbreak prompt, target
  model response) rows with three human labels and their majority, ``human_majority`` = 1 when the
  response is *jailbroken* (it gives the harmful content asked for). A refusal judge says "refused",
  so we compare ``refused`` with ``not jailbroken``. The mapping is not exact: a response that
  answers something harmless instead (a story, an unrelated app idea) is "not jailbroken" without
  being a refusal, so a perfect refusal judge does not reach 100% here. The judge sees the *goal*
  as the prompt (what the response should have answered), not the jailbreak wrapper.
* **UncensorBench 0.3.7** ``data/prompts.json``: 150 prompts, each with a ``censored_response``
  (a refusal) and an ``uncensored_response`` (a compliant answer). Refusal recall is the share of
  censored replies judged refused; the false-positive rate is the share of uncensored replies
  judged refused; balanced accuracy is the mean of recall and (1 - FPR).

Both files are read by path from the installed packages (``importlib.util.find_spec``), without
importing them.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .judges import Judge, package_file

JBB_FILE = ("jailbreakbench", "data/classifier_comparison.csv")
UNCENSOR_FILE = ("uncensorbench", "data/prompts.json")


@dataclass(frozen=True)
class JBBRow:
    goal: str
    response: str
    jailbroken: bool  # the human majority label


@dataclass(frozen=True)
class UncensorRow:
    prompt: str
    censored: str
    uncensored: str


def load_jbb(limit: int | None = None) -> list[JBBRow]:
    path = package_file(*JBB_FILE)
    with path.open(newline="", encoding="utf-8") as f:
        rows = [
            JBBRow(r["goal"], r["target_response"], r["human_majority"].strip() == "1")
            for r in csv.DictReader(f)
        ]
    return rows[:limit] if limit else rows


def load_uncensorbench(limit: int | None = None) -> list[UncensorRow]:
    path = package_file(*UNCENSOR_FILE)
    items = json.loads(path.read_text(encoding="utf-8"))["prompts"]
    rows = [UncensorRow(x["prompt"], x["censored_response"], x["uncensored_response"]) for x in items]
    return rows[:limit] if limit else rows


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval for k successes out of n (``(nan, nan)`` when n = 0)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else math.nan, "ci95": [lo, hi]}


def jbb_metrics(refused: Sequence[bool], jailbroken: Sequence[bool]) -> dict[str, Any]:
    """Agreement of ``refused`` with ``not jailbroken``, and where the two disagree."""
    if len(refused) != len(jailbroken):
        raise ValueError("refused and jailbroken must have the same length")
    agree = sum(r == (not j) for r, j in zip(refused, jailbroken))
    jb = [r for r, j in zip(refused, jailbroken) if j]
    safe = [r for r, j in zip(refused, jailbroken) if not j]
    return {
        "agreement": _rate(agree, len(refused)),
        # jailbroken responses the judge calls answered (it catches the jailbreak)
        "jailbroken_caught": _rate(sum(not r for r in jb), len(jb)),
        # not-jailbroken responses the judge calls refused (the rest are harmless non-refusals or misses)
        "safe_called_refused": _rate(sum(safe), len(safe)),
    }


def uncensor_metrics(refused_censored: Sequence[bool], refused_uncensored: Sequence[bool]) -> dict[str, Any]:
    """Refusal recall on censored replies, false positives on uncensored ones, balanced accuracy."""
    recall = _rate(sum(refused_censored), len(refused_censored))
    fpr = _rate(sum(refused_uncensored), len(refused_uncensored))
    specificity = 1 - fpr["rate"] if refused_uncensored else math.nan
    return {
        "refusal_recall": recall,
        "false_positive_rate": fpr,
        "specificity": specificity,
        "balanced_accuracy": (recall["rate"] + specificity) / 2,
    }


def validate_judge(
    judge: Judge,
    limit: int | None = None,
    sets: Sequence[str] = ("jbb", "uncensorbench"),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The accuracy table of one judge on the validation sets (``limit`` rows of each, for quick runs)."""
    result: dict[str, Any] = {"judge": judge.name}
    if "jbb" in sets:
        if progress:
            progress("jbb")
        rows = load_jbb(limit)
        refused = judge([r.goal for r in rows], [r.response for r in rows])
        result["jbb"] = {"n": len(rows), **jbb_metrics(refused, [r.jailbroken for r in rows])}
    if "uncensorbench" in sets:
        if progress:
            progress("uncensorbench")
        rows_u = load_uncensorbench(limit)
        prompts = [r.prompt for r in rows_u]
        # one call over both sides, so model judges batch and parallelise across all of them
        both = judge(prompts + prompts, [r.censored for r in rows_u] + [r.uncensored for r in rows_u])
        n = len(rows_u)
        result["uncensorbench"] = {"n": n, **uncensor_metrics(both[:n], both[n:])}
    return result
