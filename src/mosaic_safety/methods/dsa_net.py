"""DSA building blocks: options, the guardrail head, the alignment adapter, ROC-AUC.

Kept apart from the method and the training loop so that the pieces the paper is silent about
(which layer the guardrail reads, how it pools, the adapter's shape and how it learns *which*
refusal to give) are in one place, each behind a validated option (see docs/methods/dsa.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError

POOLS = ("mean", "last")
ALPHA_MODES = ("step", "smooth")
CONDITIONS = ("category", "none")


@dataclass(frozen=True)
class DSAOptions:
    """Every DSA choice the paper leaves open; ``method_options`` in a config maps onto these."""

    guard_layer: int = -1  # hidden state after this many decoder layers; -1: round(2/3 of the depth)
    guard_pool: str = "mean"  # mean over the prompt's positions | last prompt position
    guard_hidden: int = 0  # 0: linear probe; >0: one hidden layer of this width (GELU)
    guard_epochs: int = 300  # full-batch AdamW steps on the cached features
    guard_lr: float = 1e-2
    guard_weight_decay: float = 1e-3
    adapter_rank: int = 64  # width of the residual bottleneck on the final hidden state
    condition: str = "category"  # category: embedding of the top active category | none: generic
    adapter_epochs: int = 4
    adapter_lr: float = 3e-3
    adapter_batch_size: int = 16
    kl_weight: float = 1.0  # negatives: CE + kl_weight * KL(p_base || p_adapter) on the base answer
    alpha_mode: str = "step"  # targeted alpha: step 1[s > tau] | smooth sigmoid((s - tau) / T)
    smooth_temperature: float = 0.05
    threshold: float = -1.0  # tau; -1: tuned on the val split (max gate DSR - gate OR)
    val_per_group: int = 40  # val prompts per group for tuning tau (0: all)

    @classmethod
    def parse(cls, raw: dict[str, Any] | None) -> DSAOptions:
        """Strict: unknown keys and wrong types are ``ConfigError`` (a typo must not become a default)."""
        raw = dict(raw or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown dsa method_options {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
            )
        values: dict[str, Any] = {}
        for name, value in raw.items():
            kind = type(fields[name].default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not kind:
                raise ConfigError(f"method_options.{name}: expected {kind.__name__}, got {value!r}")
            values[name] = value
        return cls(**values).validate()

    def validate(self) -> DSAOptions:
        checks = [
            (self.guard_layer == -1 or self.guard_layer >= 1, "guard_layer must be -1 (auto) or >= 1"),
            (self.guard_pool in POOLS, f"guard_pool: {' | '.join(POOLS)}"),
            (self.guard_hidden >= 0, "guard_hidden must be >= 0"),
            (self.guard_epochs >= 1, "guard_epochs must be >= 1"),
            (self.guard_lr > 0, "guard_lr must be positive"),
            (self.guard_weight_decay >= 0, "guard_weight_decay must be >= 0"),
            (self.adapter_rank >= 1, "adapter_rank must be >= 1"),
            (self.condition in CONDITIONS, f"condition: {' | '.join(CONDITIONS)}"),
            (self.adapter_epochs >= 1, "adapter_epochs must be >= 1"),
            (self.adapter_lr > 0, "adapter_lr must be positive"),
            (self.adapter_batch_size >= 1, "adapter_batch_size must be >= 1"),
            (self.kl_weight >= 0, "kl_weight must be >= 0"),
            (self.alpha_mode in ALPHA_MODES, f"alpha_mode: {' | '.join(ALPHA_MODES)}"),
            (self.smooth_temperature > 0, "smooth_temperature must be positive"),
            (
                self.threshold == -1.0 or 0.0 <= self.threshold <= 1.0,
                "threshold must be -1 (tune) or in [0, 1]",
            ),
            (self.val_per_group >= 0, "val_per_group must be >= 0"),
        ]
        for name, value in dataclasses.asdict(self).items():  # first: inf passes every bound below
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"method_options.{name} must be a finite number, got {value}")
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"method_options.{message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_guard_layer(option: int, num_layers: int) -> int:
    """The decoder depth the guardrail reads: middle-to-late layers carry the topic, not the wording."""
    layer = max(1, round(2 * num_layers / 3)) if option == -1 else option
    if not 1 <= layer <= num_layers:
        raise ConfigError(f"method_options.guard_layer {layer} is outside 1..{num_layers} for this model")
    return layer


class GuardHead(nn.Module):
    """Multi-label probe: pooled hidden state -> one logit per category (sigmoid = membership)."""

    def __init__(self, hidden_size: int, categories: int, width: int = 0):
        super().__init__()
        # Standardising with train-set statistics makes one learning rate fit every backbone scale.
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("std", torch.ones(hidden_size))
        if width:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, categories)
            )
        else:
            self.net = nn.Linear(hidden_size, categories)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net((pooled.float() - self.mean) / self.std)


class AlignmentAdapter(nn.Module):
    """Residual low-rank MLP on the final hidden state, read out by the frozen LM head.

    ``h' = h + up(gelu(down(h) + e_c))``: the category embedding ``e_c`` tells the adapter which
    category's refusal to write, since one generic refusal cannot carry a category-specific text.
    ``up`` starts at zero, so an untrained adapter reproduces the base logits exactly.
    """

    def __init__(self, hidden_size: int, categories: int, rank: int = 64, conditioned: bool = True):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank)
        self.up = nn.Linear(rank, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.conditioned = conditioned
        self.category = nn.Embedding(categories, rank)
        nn.init.normal_(self.category.weight, std=0.5)

    def forward(self, hidden: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """``hidden`` (..., d), ``category`` (...) long -> adapted hidden state (..., d)."""
        x = self.down(hidden.float())
        if self.conditioned:
            x = x + self.category(category)
        return hidden.float() + self.up(torch.nn.functional.gelu(x))


def roc_auc(scores: Sequence[float] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted as half); NaN without both classes."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    if s.shape != y.shape:
        raise ValueError("scores and labels must have the same length")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # Tied scores share the average of their ranks.
    values, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def youden_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """The threshold maximising TPR - FPR (gate DSR - gate OR): (tau, tpr, fpr).

    Candidates are midpoints between consecutive distinct scores, so the chosen tau never sits
    exactly on a training score and a score equal to tau is treated the same at every use.
    """
    s = scores.double().flatten()
    y = labels.flatten().bool()
    values = torch.unique(s)
    mids = (values[1:] + values[:-1]) / 2 if len(values) > 1 else values
    candidates = torch.cat([mids, values[:1] - 1e-6, values[-1:] + 1e-6]).clamp(0.0, 1.0)
    fired = s[None, :] > candidates[:, None]
    tpr = fired[:, y].double().mean(1) if y.any() else torch.zeros(len(candidates), dtype=torch.float64)
    fpr = fired[:, ~y].double().mean(1) if (~y).any() else torch.zeros(len(candidates), dtype=torch.float64)
    best = int(torch.argmax(tpr - fpr))
    return float(candidates[best]), float(tpr[best]), float(fpr[best])
