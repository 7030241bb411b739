"""``orpo``: Odds Ratio Preference Optimization (Hong et al., 2024) with LoRA, on MOSAIC's data.

Each order-sampled item becomes a preference pair under its policy (system prompt as in
``lora_sft``): on a positive, chosen = the category's refusal template and rejected = the base
model's own answer; on a negative, chosen = the base answer and rejected = a refusal (the
refusal of the prompt's own category for an inactive-category prompt, else of an active category
picked deterministically from the prompt) — the over-refusal the pair must teach against.

The loss is ORPO's, written out here rather than through TRL: TRL's ``ORPOTrainer`` is a
``transformers.Trainer`` with its own dataset tokenisation, which would replace the order sampler,
the per-row system-prompt conditioning and the progress events shared by every method here::

    L = NLL(chosen) + lambda * -log sigmoid( log odds(chosen) - log odds(rejected) )
    log odds(y) = log p(y) - log(1 - p(y)),   log p(y) = mean token log-probability of y

with length-normalised log-probabilities as in the paper and TRL. ``orpo_lambda`` (TRL's ``beta``)
defaults to 0.1, the paper's and TRL's default; the MOSAIC paper does not give its value.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..config import TrainConfig
from ..policy import Policy
from ..training.losses import response_cross_entropy
from ..training.sampler import TrainItem
from .base import Method
from .lora_common import Example, Option
from .lora_sft import OPTIONS as SFT_OPTIONS
from .lora_sft import SFTTrainer, load_topics_adapter

NAME = "orpo"

OPTIONS: dict[str, Option] = {
    **SFT_OPTIONS,
    "orpo_lambda": Option(float, 0.1, lambda v: v >= 0, "must be >= 0"),
}


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` from ``log p``; ``p`` is kept below 1 so a saturated row stays finite."""
    logp = logp.clamp(max=-1e-6)
    return logp - torch.log1p(-torch.exp(logp))


def orpo_loss(
    chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, chosen_nll: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ORPO loss and odds-ratio term, from mean token log-probabilities and the chosen NLL."""
    ratio = -F.logsigmoid(log_odds(chosen_logp) - log_odds(rejected_logp))
    return chosen_nll + weight * ratio, ratio


class ORPOTrainer(SFTTrainer):
    """SFT's conditioning (topics in the system prompt), with preference pairs and the ORPO loss."""

    name = NAME
    schema = OPTIONS

    def teacher_prompts(self) -> list[str]:
        # positives need the base answer too: it is their rejected response
        every = {p for rows in self.pools["prompts"].values() for p in rows}
        return sorted(set(super().teacher_prompts()) | every)

    def _wrong_refusal(self, item: TrainItem) -> list[int]:
        if item.category in self.refusals:  # an inactive category's prompt, refused with its own template
            return self.refusals[item.category]
        pick = int(hashlib.sha256(item.prompt.encode()).hexdigest(), 16) % item.policy.order
        return self.refusals[item.policy.categories[pick]]

    def examples(self, items: list[TrainItem]) -> list[Example]:
        rows = []
        for item in items:
            answer = self.teacher.get(item.prompt)
            refusal = self.refusals[item.category] if item.positive else self._wrong_refusal(item)
            chosen, rejected = (refusal, answer) if item.positive else (answer, refusal)
            prompt = self.rewrite(item.prompt, item.policy)
            rows.append(Example(prompt, chosen, item.positive, item.policy.order, rejected=rejected))
        return rows

    def loss(self, batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        n = len(batch)
        prompts = [e.prompt for e in batch] * 2
        targets = [e.target for e in batch] + [e.rejected or [] for e in batch]
        enc = self.model.encode(prompts, [Policy(())] * (2 * n), targets)
        logits = self.model.logits(enc)
        mean_ce = response_cross_entropy(logits, enc.labels)  # per row: -(mean token log-probability)
        nll = mean_ce[:n]
        if self.config.optim.first_token_weight != 1.0:
            nll = response_cross_entropy(logits[:n], enc.labels[:n], self.config.optim.first_token_weight)
        per_row, ratio = orpo_loss(-mean_ce[:n], -mean_ce[n:], nll, self.options["orpo_lambda"])
        stats = {
            "loss": float(per_row.detach().mean()),
            "nll": float(nll.detach().mean()),
            "odds_ratio": float(ratio.detach().mean()),
            "pair_accuracy": float((mean_ce[:n] < mean_ce[n:]).float().mean()),
            "kl": 0.0,
        }
        return per_row.mean(), stats


RESUMABLE = True  # `mosaic train --resume` continues its epoch checkpoints


def train(
    config: TrainConfig,
    output: Path,
    reporter: Any = None,
    backbone: Backbone | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    return ORPOTrainer(config, backbone=backbone, reporter=reporter).train(output, resume=resume)


def load(artifact: Path, backbone: Backbone) -> Method:
    return load_topics_adapter(artifact, backbone, NAME, OPTIONS)
