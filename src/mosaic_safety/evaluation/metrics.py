"""Rates with Wilson 95% intervals, and the arithmetic of DSR / over-refusal summaries.

A rate on 20 prompts is ±20 points; every reported rate carries its interval so nobody reads a
5-point difference between two methods as a result.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

Z95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (``(0, 1)`` when n is 0). ``k`` may be a
    fraction: ``pooled`` scales its count down to ``n_eff`` prompts."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(votes: Iterable[bool]) -> dict[str, Any]:
    """``{k, n, rate, lo, hi}`` for a list of refusal votes (rate ``None`` when there are none)."""
    votes = list(votes)
    k, n = sum(map(bool, votes)), len(votes)
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "lo": lo, "hi": hi}


def pooled(rates: Sequence[dict[str, Any]], distinct: int | None = None) -> dict[str, Any]:
    """Sum the counts of several rates: one interval over all their prompts.

    Rates over the same prompts (one order's subsets all ask the neutral prompts) are not
    independent samples: four subsets do not make 40 neutral prompts out of 10. ``distinct`` is
    the number of different prompts behind the rates; the interval is then the pooled rate's over
    that many (``n_eff``), as if each prompt's answers agreed across subsets, which is what a
    ``none`` method's do. ``k`` and ``n`` stay the plain counts.
    """
    k = sum(r["k"] for r in rates)
    n = sum(r["n"] for r in rates)
    n_eff = min(n, distinct) if distinct is not None else n
    lo, hi = wilson(k * n_eff / n, n_eff) if n else wilson(0, 0)
    out = {"k": k, "n": n, "rate": k / n if n else None, "lo": lo, "hi": hi}
    if n_eff != n:
        out["n_eff"] = n_eff
    return out


def mean_rate(rates: Sequence[dict[str, Any]]) -> float | None:
    """Mean of per-subset rates (the paper's order-k figure); subsets with no prompts are skipped."""
    values = [r["rate"] for r in rates if r["rate"] is not None]
    return sum(values) / len(values) if values else None


def prompt_set(pairs: Iterable[tuple[str, str]]) -> str:
    """A short digest of the (group, prompt) pairs an evaluation asked, whatever their order: what
    a comparison checks before it puts two runs side by side."""
    blob = json.dumps(sorted({(str(g), str(p)) for g, p in pairs}), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
