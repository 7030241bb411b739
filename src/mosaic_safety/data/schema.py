"""The one record type every data source is turned into.

Loaders, the training sampler and the evaluation runner all speak `Example`, so a JSONL file, a CSV
export, a Hugging Face dataset and a packaged benchmark are interchangeable once loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..policy import NEUTRAL

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The only split names; anything else is a data error (a typo would otherwise leak test data)."""

REQUIRED_FIELDS: tuple[str, ...] = ("id", "prompt", "category", "split")
OPTIONAL_FIELDS: tuple[str, ...] = ("source", "near", "subtopic")
FIELDS: tuple[str, ...] = REQUIRED_FIELDS + OPTIONAL_FIELDS


class DataError(ValueError):
    """Data that cannot be used. The message lists every problem as ``file:line: reason``.

    All problems of a file are collected before raising, so a user fixes a file in one pass
    instead of one error per run.
    """

    def __init__(self, problems: list[str] | str):
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        n = len(self.problems)
        head = f"{n} data problem{'s' if n != 1 else ''}:"
        super().__init__(head + "\n" + "\n".join(self.problems))


@dataclass(frozen=True)
class Example:
    """One request: its text, its category (or ``neutral``) and its split.

    ``near`` marks a boundary item: a neutral request that resembles that category and must still be
    answered. ``subtopic`` is free-form provenance (a sub-topic, or the source's own category label).
    """

    id: str
    prompt: str
    category: str
    split: str
    source: str = "builtin"
    near: str | None = None
    subtopic: str | None = None

    @property
    def is_boundary(self) -> bool:
        """A neutral request that resembles a category (it must not be refused)."""
        return self.category == NEUTRAL and self.near is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSONL form; optional fields are left out when unset so files stay minimal."""
        out: dict[str, Any] = {
            "id": self.id,
            "prompt": self.prompt,
            "category": self.category,
            "split": self.split,
            "source": self.source,
        }
        if self.subtopic is not None:
            out["subtopic"] = self.subtopic
        if self.near is not None:
            out["near"] = self.near
        return out
