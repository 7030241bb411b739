"""Which category's rule fired: match a response against the active categories' refusal texts.

MOSAIC trains each category to answer with its own refusal template, so the template a response
opens with names the rule. A refusal that matches no active template (the model refused in its own
words) is reported as ``unknown`` (detected by the phrase judge); anything else is not a refusal.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..evaluation.judges import PhraseJudge, _norm
from ..policy import CategoryRegistry

UNKNOWN = "unknown"


class RefusalAttributor:
    """``attribute(response, active) -> category | "unknown" | None`` (None = not a refusal)."""

    def __init__(self, registry: CategoryRegistry, min_chars: int = 30):
        self.registry = registry
        self.min_chars = min_chars
        self.templates = {c.name: _norm(c.refusal_text) for c in registry}
        self.phrase = PhraseJudge()

    def attribute(self, response: str, active: Iterable[str]) -> str | None:
        text = _norm(response)
        if not text:
            return None
        found: dict[str, int] = {}
        for name in active:
            template = self.templates[name]
            # a response cut by max_tokens is a prefix of the template; a full one starts with it
            n = _common_prefix(text, template)
            complete = n == len(template) or n == len(text)
            if complete and n >= min(self.min_chars, len(template)):
                found[name] = n
        if found:
            longest = max(found.values())
            best = [name for name, n in found.items() if n == longest]
            # cut before the templates diverge: a refusal, but not attributable to one rule
            return best[0] if len(best) == 1 else UNKNOWN
        return UNKNOWN if self.phrase([""], [response])[0] else None


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
