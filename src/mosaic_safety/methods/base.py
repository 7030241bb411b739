"""The method interface: anything that turns (prompts, per-row policies) into responses.

The evaluation harness, the comparison report and the server only talk to this interface, so a
new defence (a LoRA adapter, a side network, a system-prompt trick) is comparable with MOSAIC as
soon as it implements ``generate``. Methods that can also expose logits implement
``target_logits``; utility, KL-to-base and the Safety Alignment Margin need it.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..policy import CategoryRegistry, Policy

Progress = Callable[[int], None] | None


class MethodError(ValueError):
    """A method that cannot be built or loaded (unknown name, missing artifact, wrong options)."""


class Method(ABC):
    """A policy-conditioned generator over a frozen backbone.

    Subclasses set ``name`` and ``registry``. ``policy_dependent = False`` tells the harness that
    the responses ignore the policy (the base model), so one generation per prompt serves every
    policy.
    """

    name: str = "method"
    registry: CategoryRegistry
    policy_dependent: bool = True

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable id of everything that changes outputs (backbone, weights, options): cache key."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        policies: Sequence[Policy],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        progress: Progress = None,
    ) -> list[str]:
        """Greedy responses, one per (prompt, policy) row."""

    def target_logits(
        self, prompts: Sequence[str], policies: Sequence[Policy], targets: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Per row, ``(len(target) + 1, V)`` logits: row j predicts target token j; the last row
        predicts the token after the target (so an empty target gives the first-token logits)."""
        raise NotImplementedError(f"method {self.name!r} does not expose logits")

    @property
    def has_logits(self) -> bool:
        return type(self).target_logits is not Method.target_logits

    @property
    def tokenizer(self) -> Any:
        raise NotImplementedError

    def first_token_logits(
        self, prompts: Sequence[str], policies: Sequence[Policy], batch_size: int = 16
    ) -> torch.Tensor:
        """``(N, V)`` logits of the first response token (for margins and probes)."""
        rows: list[torch.Tensor] = []
        for s in range(0, len(prompts), batch_size):
            got = self.target_logits(
                prompts[s : s + batch_size],
                policies[s : s + batch_size],
                [[]] * len(prompts[s : s + batch_size]),
            )
            rows.extend(g[-1] for g in got)
        return torch.stack(rows) if rows else torch.zeros(0)

    # the longest text ``scrub`` replaces (0: none): a stream holds back this much minus one character
    scrub_span: int = 0
    # a prompting method adds its own system text before a client's (served conversations); a trained
    # one is conditioned on exactly the system text it was trained with, so a client's is not added to it
    merges_client_system: bool = False

    def scrub(self, texts: list[str]) -> list[str]:
        """Responses as they may be shown: a method with secrets (magic tokens) removes them."""
        return texts

    def trainable_parameters(self) -> int:
        """Parameters the method trained on top of the frozen backbone (0 for prompting methods)."""
        return 0

    def prompt_overhead(self, policy: Policy) -> int:
        """Extra prompt positions this method adds to a request under ``policy`` (tokens or vectors)."""
        return 0

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "fingerprint": self.fingerprint(),
            "trainable_parameters": self.trainable_parameters(),
            "registry": self.registry.name,
        }


def digest(*parts: Any) -> str:
    """A short sha256 of JSON-serialisable parts: building block of fingerprints and cache keys."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
