"""Choosing which epoch's tokens to ship, per category, on the validation split.

Why: on SmolLM2 a run is at its best after about five epochs, but a category's tokens can also fall
away late in a run (own-category refusal 65% after epoch 3, 10% after epoch 5, while the other
categories kept improving; docs/experiments.md). The last epoch is then the wrong one to ship for
that category, and because each category's block is only ever active under policies that name it,
the choice can be made per category: each block (with its deep offsets) comes from the epoch where
it did best on validation prompts.

The measure is cheap enough to run after every epoch: one teacher-forced pass per (prompt, policy)
over the first ``prefix_tokens`` tokens of the policy's refusal, counting a refusal when greedy
decoding would produce exactly that prefix. That is the trained refusal, not every refusal a judge
would count; it is what changes from epoch to epoch. A category's score under its single-category
policy is ``own - mean(other categories) - neutral``: refusing its own prompts, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..controlled import ControlledModel
from ..data.suites import Suite
from ..evaluation.table import held_out_groups
from ..policy import Policy
from ..tokens import ControlTokens, read_manifest

NEUTRAL = "neutral"


@dataclass
class ValidationProbe:
    """Validation prompts per group (each category of the run, ``neutral``), the policies to score
    (the categories being trained) and their refusal prefixes."""

    groups: dict[str, list[str]]
    policies: list[str]
    prefixes: dict[str, list[int]]  # per category: the first tokens of its refusal
    settings: dict[str, Any]  # what makes two records comparable (sample size, prefix, seed)
    batch_size: int = 32

    @classmethod
    def build(
        cls,
        suite: Suite,
        categories: Sequence[str],
        trained: Sequence[str],
        refusals: dict[str, list[int]],
        per_group: int,
        prefix_tokens: int,
        seed: int,
        batch_size: int = 32,
    ) -> ValidationProbe:
        """A seeded sample of ``per_group`` ``val`` prompts per group; an error if a group has none."""
        sampled = held_out_groups(suite, categories, "val", per_group, seed)  # the evaluation's sampling
        groups = {name: sampled.get(name, []) for name in (*categories, NEUTRAL)}  # boundary is not scored
        empty = [name for name, rows in groups.items() if not rows]
        if empty:
            raise ConfigError(
                f"suite {suite.name!r} has no 'val' prompts for {', '.join(empty)}; checkpoint selection "
                "needs them (set select.mode=last to train without it)"
            )
        prefixes = refusal_prefixes(refusals, trained, prefix_tokens)
        settings = {"per_group": per_group, "prefix_tokens": prefix_tokens, "seed": seed}
        return cls(groups, list(trained), prefixes, settings, batch_size)

    def evaluate(
        self, model: ControlledModel, progress: Callable[[int], None] | None = None
    ) -> dict[str, Any]:
        """The record stored in a checkpoint: settings, rates and per-category scores."""
        rates = self.rates(model, progress)
        return {"settings": self.settings, "rates": rates, "scores": scores(rates)}

    @property
    def size(self) -> int:
        """Rows one probe runs: every validation prompt under every single-category policy."""
        return sum(map(len, self.groups.values())) * len(self.policies)

    @torch.no_grad()
    def rates(
        self, model: ControlledModel, progress: Callable[[int], None] | None = None
    ) -> dict[str, dict[str, float]]:
        """``rates[c][group]``: share of the group's prompts refused in c's wording under policy ``{c}``."""
        rows = [(name, p) for name, prompts in self.groups.items() for p in prompts]
        rows.sort(key=lambda row: len(row[1]))  # similar lengths per batch: less left padding
        hits = {c: dict.fromkeys(self.groups, 0) for c in self.policies}
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            prompts = [p for _, p in chunk]
            heads = model.prefill_heads(prompts)  # the prompt head is shared by every policy
            for c in self.policies:
                prefix = self.prefixes[c]
                logits, _ = model.response_logits(
                    prompts, [Policy((c,))] * len(prompts), [prefix] * len(prompts), heads
                )
                greedy = logits[:, : len(prefix)].argmax(-1)
                refused = (greedy == torch.tensor(prefix, device=greedy.device)).all(-1).tolist()
                for (name, _), r in zip(chunk, refused):
                    hits[c][name] += int(r)
                if progress is not None:
                    progress(len(chunk))
        return {
            c: {name: hits[c][name] / len(self.groups[name]) for name in self.groups} for c in self.policies
        }


def refusal_prefixes(
    refusals: dict[str, list[int]], categories: Sequence[str], prefix_tokens: int
) -> dict[str, list[int]]:
    """Each category's first ``prefix_tokens`` refusal ids: the opening a probe counts as refusing."""
    # a refusal's ids end with EOS (``response_ids``); the prefix stays inside its text
    return {c: list(refusals[c][: max(1, min(prefix_tokens, len(refusals[c]) - 1))]) for c in categories}


def other_categories_rate(row: dict[str, float], category: str) -> float:
    """Mean refusal rate on the other categories' prompts, from one policy's row of rates."""
    others = [rate for group, rate in row.items() if group not in (category, NEUTRAL)]
    return sum(others) / len(others) if others else 0.0


def selectivity(rates: dict[str, dict[str, float]], category: str) -> float:
    """``own - mean(other categories) - neutral`` under the category's own policy."""
    row = rates[category]
    return row[category] - other_categories_rate(row, category) - row.get(NEUTRAL, 0.0)


def scores(rates: dict[str, dict[str, float]]) -> dict[str, float]:
    return {c: round(selectivity(rates, c), 6) for c in rates}


def best_epochs(history: dict[int, dict[str, float]], categories: Sequence[str]) -> dict[str, int]:
    """Per category, the epoch with the highest score; a tie goes to the later epoch (more trained)."""
    if not history:
        raise ValueError("no validated epochs to choose from")
    out = {}
    for c in categories:
        scored = [(s[c], epoch) for epoch, s in history.items() if c in s]
        if not scored:
            raise ValueError(f"no validation score for category {c!r}")
        out[c] = max(scored)[1]
    return out


def stored_record(
    checkpoint: Path, settings: dict[str, Any], key: str = "validation"
) -> dict[str, Any] | None:
    """A checkpoint's probe record (``metrics[key]``), if it was made with the same probe settings.

    Checkpoints of a run trained with ``select.mode=last``, or scored with another sample size,
    have none; the caller scores those afresh, so selection also works on an older run. The same
    holds for the hard-negatives measure (``key="confusion"``) on ``--resume``.
    """
    record = read_manifest(checkpoint).get("metrics", {}).get(key)
    if not isinstance(record, dict) or record.get("settings") != settings:
        return None
    return record


def take_epochs(
    tokens: ControlTokens, chosen: dict[str, int], checkpoint: Callable[[int], Path], backbone: dict[str, Any]
) -> None:
    """Copy each category's block (and deep offsets) from the checkpoint of its chosen epoch."""
    loaded: dict[int, ControlTokens] = {}
    with torch.no_grad():
        for c, epoch in chosen.items():
            if epoch not in loaded:
                loaded[epoch] = ControlTokens.load(checkpoint(epoch), backbone)
            source = loaded[epoch]
            tokens.blocks[c].copy_(source.blocks[c].to(tokens.blocks[c].device))
            if c in tokens.deep:
                tokens.deep[c].copy_(source.deep[c].to(tokens.deep[c].device))
