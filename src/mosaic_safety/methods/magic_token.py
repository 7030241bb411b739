"""``magic_token``: magic-token-guided co-training (Si et al., arXiv 2508.14904) with LoRA.

Random secret strings in the system prompt switch the adapted model's behaviour; all behaviours are
learnt together in one SFT stage (response-token cross-entropy, no preference term), as in the
paper. Two configurations (``method_options.mode``):

- ``per_category`` (default): one token per category; a policy's system prompt is its categories'
  tokens joined by spaces in canonical (registry) order, so the method runs the same protocol and
  the same order-sampled data as MOSAIC (refusal on positives, base answer on negatives).
- ``three_modes``: the paper's behaviours. ``positive`` refuses every category prompt of the
  registry and answers the rest (our platform's "lawful" behaviour); ``rejective`` refuses every
  prompt (the mode an upstream moderation signal switches on); ``negative`` gives the base
  model's unfiltered answer to everything. Each sampled prompt is trained under all three modes,
  like the paper's prompt x behaviour triples. A non-empty policy is served in ``positive`` mode;
  ``rejective`` is reachable only through ``generate_mode``. ``negative`` exists for internal
  red-teaming only: ``load`` drops its token unless called with ``allow_negative=True``, and no
  policy ever selects it.

Tokens are ``token_length`` characters of ``[a-z0-9]`` drawn with ``secrets`` (the paper's example
``rfcd9lbo`` has 8), generated at training time, stored only in the artifact's owner-only
``secrets.json``, and never put in the manifest, the logs or any message.
"""

from __future__ import annotations

import math
import secrets
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..backbone import Backbone
from ..config import TrainConfig
from ..controlled import Prompt
from ..policy import CategoryRegistry, Policy
from ..tokens import ArtifactError
from ..training.sampler import TrainItem
from .artifact import read_secrets
from .base import Method, MethodError, Progress
from .controlled_method import Rewrite
from .lora_common import (
    LORA_OPTIONS,
    AdapterMethod,
    AdapterTrainer,
    Example,
    Option,
    load_adapter,
    shuffled_batches,
    with_system,
)

NAME = "magic_token"
MODES = ("positive", "rejective", "negative")
ALPHABET = string.ascii_lowercase + string.digits

OPTIONS: dict[str, Option] = {
    **LORA_OPTIONS,
    "mode": Option(str, "per_category", choices=("per_category", "three_modes")),
    "token_length": Option(int, 8, lambda v: 4 <= v <= 64, "must be between 4 and 64"),
    "rejective_text": Option(
        str, "I'm sorry, but I can't help with that request.", lambda v: bool(v.strip()), "must not be empty"
    ),
}


def new_tokens(names: Sequence[str], length: int) -> dict[str, str]:
    """Distinct random tokens, none a substring of another (so a composition is unambiguous)."""
    while True:
        tokens = {n: "".join(secrets.choice(ALPHABET) for _ in range(length)) for n in names}
        values = list(tokens.values())
        if not any(a != b and a in b for a in values for b in values) and len(set(values)) == len(values):
            return tokens


def token_rewrite(mode: str, tokens: dict[str, str]) -> Rewrite:
    """Policy -> system prompt: composed category tokens, or the ``positive`` mode token."""

    def rewrite(prompt: str, policy: Policy) -> tuple[Prompt, Policy]:
        if not policy:
            return prompt, Policy(())
        if mode == "three_modes":
            return with_system(prompt, tokens["positive"]), Policy(())
        return with_system(prompt, " ".join(tokens[c] for c in policy)), Policy(())

    return rewrite


class MagicTokenTrainer(AdapterTrainer):
    name = NAME
    schema = OPTIONS

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        mode = self.options["mode"]
        names = self.categories if mode == "per_category" else list(MODES)
        self._tokens = new_tokens(names, self.options["token_length"])
        self._rewrite = token_rewrite(mode, self._tokens)
        self._generic_refusal = self.encode_text(self.options["rejective_text"])

    def __repr__(self) -> str:  # never show the tokens
        return f"MagicTokenTrainer(mode={self.options['mode']!r})"

    def secrets(self) -> dict[str, Any]:
        return {"mode": self.options["mode"], "tokens": dict(self._tokens)}

    def rewrite(self, prompt: str, policy: Policy) -> Prompt:
        return self._rewrite(prompt, policy)[0]

    def restore_secrets(self, ckpt: Path) -> None:
        """A resumed run keeps training on the tokens its adapter has learned, not on fresh ones."""
        self._tokens = _check_secrets(read_secrets(ckpt), self.options["mode"], self.registry, ckpt)
        self._rewrite = token_rewrite(self.options["mode"], self._tokens)

    # -- three modes --------------------------------------------------------------------------
    def teacher_prompts(self) -> list[str]:
        if self.options["mode"] == "per_category":
            return super().teacher_prompts()
        every = {p for rows in self.pools["prompts"].values() for p in rows}
        return sorted(set(super().teacher_prompts()) | every)

    def _mode_examples(self, item: TrainItem) -> list[Example]:
        answer = self.teacher.get(item.prompt)
        harmful = item.category in self.refusals
        refusal = self.refusals[item.category] if harmful else self._generic_refusal
        targets = {"positive": refusal if harmful else answer, "rejective": refusal, "negative": answer}
        return [
            Example(with_system(item.prompt, self._tokens[m]), targets[m], m != "negative" and harmful, 0)
            for m in MODES
        ]

    def epoch_batches(self, epoch: int) -> list[list[Example]]:
        if self.options["mode"] == "per_category":
            return super().epoch_batches(epoch)
        rows = [e for item in self.sampler.epoch_items(epoch) for e in self._mode_examples(item)]
        return shuffled_batches(rows, self.config.optim.batch_size, f"{self.config.optim.seed}:{epoch}:modes")

    def steps_per_epoch(self) -> int:
        if self.options["mode"] == "per_category":
            return super().steps_per_epoch()
        items = sum(b.positives + b.negatives for b in self.sampler.budgets)
        return math.ceil(len(MODES) * items / self.config.optim.batch_size)


class MagicTokenMethod(AdapterMethod):
    """The adapted model plus its secret tokens; explicit modes through ``generate_mode``."""

    def __init__(self, *args: Any, mode: str, tokens: dict[str, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mode = mode
        self._tokens = tokens
        self.modes: tuple[str, ...] = tuple(m for m in MODES if m in tokens) if mode == "three_modes" else ()

    def __repr__(self) -> str:  # never show the tokens
        return f"MagicTokenMethod(mode={self.mode!r}, modes={self.modes!r})"

    @property
    def scrub_span(self) -> int:
        return max(map(len, self._tokens.values()), default=0)

    def scrub(self, texts: list[str]) -> list[str]:
        """A model may echo its system prompt (jailbreaks ask for it): never return a secret token."""
        for token in sorted(self._tokens.values(), key=len, reverse=True):
            texts = [t.replace(token, "[magic-token]") for t in texts]
        return texts

    def generate(self, prompts: Sequence[str], policies: Sequence[Policy], **kwargs: Any) -> list[str]:
        return self.scrub(super().generate(prompts, policies, **kwargs))

    def _mode_prompts(self, prompts: Sequence[str], modes: Sequence[str]) -> list[Prompt]:
        if len(prompts) != len(modes):
            raise ValueError("prompts and modes must have the same length")
        for m in modes:
            if m == "negative" and m not in self.modes and self.mode == "three_modes":
                raise MethodError(
                    "the negative mode is for internal red-teaming only and is disabled; "
                    "load the artifact with allow_negative=True to use it"
                )
            if m not in self.modes:
                raise MethodError(
                    f"mode {m!r} is not available; available: {', '.join(self.modes) or 'none'}"
                )
        return [with_system(p, self._tokens[m]) for p, m in zip(prompts, modes)]

    def generate_mode(
        self,
        prompts: Sequence[str],
        modes: Sequence[str],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        progress: Progress = None,
    ) -> list[str]:
        """Responses under explicit behaviour modes (``three_modes`` artifacts only)."""
        inputs = self._mode_prompts(prompts, modes)
        return self.scrub(
            self.model.generate(
                inputs,
                [Policy(())] * len(inputs),
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
            )
        )

    @torch.no_grad()
    def mode_first_token_logits(self, prompts: Sequence[str], modes: Sequence[str]) -> torch.Tensor:
        """``(N, V)`` first-response-token logits under explicit modes (the paper's SAM input)."""
        inputs = self._mode_prompts(prompts, modes)
        batch = self.model.encode(inputs, [Policy(())] * len(inputs))
        return self.model.logits(batch, window=1)[:, -1].float()


def _check_secrets(data: Any, mode: str, registry: CategoryRegistry, artifact: Path) -> dict[str, str]:
    """Validate ``secrets.json`` without ever echoing its values."""
    where = f"{artifact}/secrets.json"
    if not isinstance(data, dict) or data.get("mode") != mode or not isinstance(data.get("tokens"), dict):
        raise ArtifactError(f"{where}: does not match the manifest (mode {mode!r})")
    tokens = data["tokens"]
    expected = set(registry.names) if mode == "per_category" else set(MODES)
    if set(tokens) != expected:
        raise ArtifactError(f"{where}: expected tokens for {sorted(expected)}, found keys {sorted(tokens)}")
    if not all(isinstance(t, str) and t and set(t) <= set(ALPHABET) for t in tokens.values()):
        raise ArtifactError(f"{where}: a token is not a non-empty [a-z0-9] string")
    return dict(tokens)


RESUMABLE = True  # `mosaic train --resume` continues its epoch checkpoints


def train(
    config: TrainConfig,
    output: Path,
    reporter: Any = None,
    backbone: Backbone | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    return MagicTokenTrainer(config, backbone=backbone, reporter=reporter).train(output, resume=resume)


def load(artifact: Path, backbone: Backbone, allow_negative: bool = False) -> Method:
    """The method behind the policy interface; ``allow_negative`` only for internal red-teaming."""
    loaded = load_adapter(artifact, backbone, NAME, OPTIONS)
    mode = loaded.options["mode"]
    tokens = _check_secrets(read_secrets(artifact), mode, loaded.registry, Path(artifact))
    if mode == "three_modes" and not allow_negative:
        del tokens["negative"]  # not even kept in memory: nothing can select it
    return MagicTokenMethod(
        NAME,
        loaded.model,
        loaded.base,
        loaded.registry,
        token_rewrite(mode, tokens),
        loaded.identity,
        loaded.trainable,
        empty_to_base=loaded.options["empty_policy"] == "base",
        mode=mode,
        tokens=tokens,
    )
