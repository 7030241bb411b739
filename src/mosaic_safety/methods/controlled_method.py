"""Methods built on ``ControlledModel``: the base model, in-context rules, MOSAIC control tokens.

All three share the frozen backbone and the batched KV-cache decoder; they differ only in how a
policy reaches the model: not at all (``none``), as natural-language rules in the system prompt
(``in_context``), or as learned control-token vectors (``mosaic``). Methods whose weights differ
(LoRA adapters) reuse this class with a ``ControlledModel`` over their adapted backbone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..backbone import Backbone
from ..controlled import ControlledModel, Prompt, check_rows
from ..policy import CategoryRegistry, Policy
from .base import Method, Progress, digest

Rewrite = Callable[[str, Policy], tuple[Prompt, Policy]]
"""Maps a user prompt and its policy to what the controlled model sees (messages, control policy)."""


class ControlledMethod(Method):
    """A method = a ``ControlledModel`` plus a rewrite of (prompt, policy) into model input."""

    def __init__(
        self,
        name: str,
        model: ControlledModel,
        registry: CategoryRegistry,
        rewrite: Rewrite,
        identity: dict[str, Any],
        trainable: int = 0,
        policy_dependent: bool = True,
    ):
        self.name = name
        self.model = model
        self.registry = registry
        self.rewrite = rewrite
        self.identity = identity
        self.trainable = trainable
        self.policy_dependent = policy_dependent

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def backbone(self) -> Backbone:
        return self.model.backbone

    def fingerprint(self) -> str:
        return digest(self.name, self.model.backbone.output_key, self.identity)

    def _inputs(
        self, prompts: Sequence[str], policies: Sequence[Policy]
    ) -> tuple[list[Prompt], list[Policy]]:
        # before the rewrite makes a list of it: a bare text would be answered character by character
        check_rows(prompts, policies)
        if len(prompts) != len(policies):
            raise ValueError("prompts and policies must have the same length")
        # canonical first: a Policy built by hand in another order, or with a name twice, is the same
        # set, and the rewrites list its categories (topics, magic tokens, rules) in the order given
        pairs = [self.rewrite(p, self.registry.policy(list(q.categories))) for p, q in zip(prompts, policies)]
        return [p for p, _ in pairs], [q for _, q in pairs]

    def generate(
        self,
        prompts: Sequence[str],
        policies: Sequence[Policy],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        progress: Progress = None,
    ) -> list[str]:
        inputs, ctrl = self._inputs(prompts, policies)
        return self.model.generate(
            inputs, ctrl, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        )

    @torch.no_grad()
    def target_logits(
        self, prompts: Sequence[str], policies: Sequence[Policy], targets: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        inputs, ctrl = self._inputs(prompts, policies)
        batch = self.model.encode(inputs, ctrl, targets)
        logits = self.model.logits(batch).float()
        w = batch.window
        return [logits[i, w - 1 - len(t) : w] for i, t in enumerate(targets)]

    def trainable_parameters(self) -> int:
        return self.trainable

    def prompt_overhead(self, policy: Policy) -> int:
        probe = "Hello"
        (plain,), _ = self._inputs([probe], [Policy(())])
        (used,), (ctrl,) = self._inputs([probe], [policy])
        head, tail = self.model.split_prompt(used)
        base_head, base_tail = self.model.split_prompt(plain)
        vectors = self.model.tokens.compose(ctrl).shape[0] if ctrl and self.model.tokens is not None else 0
        return len(head) + len(tail) + vectors - len(base_head) - len(base_tail)


def _plain(prompt: str, policy: Policy) -> tuple[Prompt, Policy]:
    return prompt, Policy(())


def base_method(backbone: Backbone, registry: CategoryRegistry) -> ControlledMethod:
    """``none``: the frozen model, policies ignored (the no-defence reference)."""
    return ControlledMethod(
        "none", ControlledModel(backbone), registry, _plain, {"method": "none"}, policy_dependent=False
    )


def reference_method(method: Any) -> ControlledMethod | None:
    """The frozen model a method's answers are compared with (KL to base, utility): ``none`` over
    the untouched backbone. A LoRA method's own backbone carries its adapter, so its ``base``
    (the model it answers the empty policy with) is the reference, not ``method.backbone``."""
    base = getattr(method, "base", None)
    backbone = base.backbone if isinstance(base, ControlledModel) else getattr(method, "backbone", None)
    return base_method(backbone, method.registry) if backbone is not None else None


def in_context_rules(registry: CategoryRegistry, policy: Policy) -> str:
    """The system prompt of the in-context baseline: one short rule per active category.

    Each rule names the topic and the exact refusal to give; the full scope descriptions would
    triple the prompt (about 80 tokens per category) and the prefill cost with it, for a model that
    reads them no better.
    """
    lines = [
        "You are a helpful assistant on a platform with content restrictions.",
        "If a request is about a restricted topic below, reply only with that topic's refusal.",
        "Answer every other request normally, including health, safety, legal or educational questions.",
        "Restricted topics:",
    ]
    for name in policy:
        cat = registry[name]
        lines.append(f'- {cat.display}: "{cat.refusal_text}"')
    return "\n".join(lines)


def in_context_method(backbone: Backbone, registry: CategoryRegistry) -> ControlledMethod:
    """``in_context``: the paper's prompting baseline; the active categories become system-prompt rules."""

    def rewrite(prompt: str, policy: Policy) -> tuple[Prompt, Policy]:
        if not policy:
            return prompt, Policy(())
        system = in_context_rules(registry, policy)
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}], Policy(())

    identity = {"method": "in_context", "rules": in_context_rules(registry, Policy(tuple(registry.names)))}
    method = ControlledMethod("in_context", ControlledModel(backbone), registry, rewrite, identity)
    method.merges_client_system = True  # rules are text: a client's system prompt can follow them
    return method


def mosaic_method(artifact: str | Path, backbone: Backbone) -> ControlledMethod:
    """``mosaic``: control tokens from an artifact (validated against the backbone)."""
    from ..tokens import ControlTokens

    tokens = ControlTokens.load(artifact, backbone.describe())
    tokens.freeze(tokens.categories)
    model = ControlledModel(backbone, tokens)

    def rewrite(prompt: str, policy: Policy) -> tuple[Prompt, Policy]:
        return prompt, policy

    weights = hashlib.sha256((Path(artifact) / "tokens.safetensors").read_bytes()).hexdigest()[:16]
    identity = {"method": "mosaic", "tokens": weights, "placement": tokens.placement}
    return ControlledMethod(
        "mosaic", model, tokens.registry, rewrite, identity, trainable=tokens.num_parameters()
    )
