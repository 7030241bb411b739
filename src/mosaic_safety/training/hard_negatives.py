"""Measuring which categories each policy confuses itself with, to steer the next epoch's negatives.

Why: on SmolLM2 most of the over-refusal between categories sits in a few pairs (the addiction
tokens refuse half the alcohol prompts, the base model a fifth), while uniform sampling spends most
inactive negatives on pairs the tokens already keep apart. After every epoch each category's tokens
are run on a seeded sample of the other categories' *training* prompts (the validation split stays
for checkpoint selection), and ``OrderSampler.inactive_weights`` turns the rates into draw weights.
The measure is the selection probe's: greedy decoding opening with the trained refusal.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .sampler import Confusion
from .selection import ValidationProbe, refusal_prefixes


def confusion_probe(
    prompts: dict[str, list[str]],
    trained: Sequence[str],
    refusals: dict[str, list[int]],
    per_group: int,
    prefix_tokens: int,
    seed: int,
    batch_size: int = 32,
) -> ValidationProbe:
    """A probe over ``per_group`` training prompts of every category, under each trained policy."""
    rng = random.Random(f"{seed}:hard-negatives")
    groups = {c: rng.sample(rows, min(per_group, len(rows))) for c, rows in prompts.items() if rows}
    settings = {"per_group": per_group, "prefix_tokens": prefix_tokens, "seed": seed, "split": "train"}
    return ValidationProbe(
        groups, list(trained), refusal_prefixes(refusals, trained, prefix_tokens), settings, batch_size
    )


def confusion_from_rates(rates: dict[str, dict[str, float]]) -> Confusion:
    """Off-target rates only: a policy's rate on its own category is not a confusion."""
    return {a: {c: r for c, r in row.items() if c != a} for a, row in rates.items()}
