"""Order-based task sampling (MOSAIC §2.1).

Order r is the number of active categories. Every subset S of size r gets
``n(S) = min(per_subset, cap // C(K, r))`` positives (prompts of a category in S, which must be
refused) and ``round(neg_ratio * n(S))`` negatives (prompts that must be answered under S: neutral
and boundary prompts, and prompts of categories outside S). Splitting a per-order budget over the
subsets keeps the cost flat as C(K, r) grows, while every order is trained in the same run, so one
token set works alone and in every combination.

With ``paired`` every positive also gets a contrastive twin: the same prompt under a random policy
of the same order that leaves its category out, to be answered as the base model does. A category
prompt is then refused only as often as it is answered, so its topic alone predicts nothing and
only the control tokens decide.

With ``hard_negatives`` (h > 0) the inactive category of a negative is no longer drawn uniformly:
a share h of the draw follows ``confusion``, the rate at which each category's tokens refused the
other categories' training prompts after the last epoch. A policy then gets more negatives from the
categories it is confusing itself with (on SmolLM2 the addiction tokens refuse half the alcohol
prompts) and fewer from the ones it already leaves alone.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from ..data.schema import DataError
from ..policy import NEUTRAL, Policy

Confusion = dict[str, dict[str, float]]
"""``confusion[a][c]``: share of category c's probe prompts refused under the policy ``{a}``."""


@dataclass(frozen=True)
class TrainItem:
    """One training example: a prompt under a policy, and whether it must be refused."""

    prompt: str
    policy: Policy
    positive: bool
    category: str  # the prompt's own category, or "neutral"


@dataclass(frozen=True)
class OrderBudget:
    order: int
    subsets: int
    positives_per_subset: int
    negatives_per_subset: int

    @property
    def positives(self) -> int:
        return self.subsets * self.positives_per_subset

    @property
    def negatives(self) -> int:
        return self.subsets * self.negatives_per_subset


class OrderSampler:
    """Draws a fresh, seeded set of training items each epoch, batched by order."""

    def __init__(
        self,
        categories: Sequence[str],
        prompts: dict[str, list[str]],
        neutral: list[str],
        boundary: list[str],
        max_order: int = 3,
        per_subset: int = 100,
        cap: int = 0,
        neg_ratio: float = 1.0,
        inactive_share: float = 0.5,
        boundary_share: float = 0.25,
        trainable: Sequence[str] | None = None,
        seed: int = 0,
        paired: bool = False,
        hard_negatives: float = 0.0,
    ):
        self.categories = tuple(categories)
        missing = [c for c in self.categories if not prompts.get(c)]
        if missing:
            raise DataError(f"no training prompts for categories: {', '.join(missing)}")
        # a negative falls back on neutral prompts unless it is drawn from an inactive category,
        # which every draw is only at inactive_share 1, and none can be under all K categories
        every_negative_inactive = inactive_share >= 1 and min(max_order, len(self.categories)) < len(
            self.categories
        )
        if not neutral and not boundary and neg_ratio > 0 and not every_negative_inactive:
            raise DataError(
                "no neutral or boundary prompts for the negatives: provide some, or set "
                "sampling.inactive_share=1 and sampling.max_order below the number of categories "
                f"({len(self.categories)}) so that every negative comes from a category outside its policy"
            )
        self.prompts = prompts
        self.neutral = neutral or boundary
        self.boundary = boundary
        self.trainable = tuple(trainable) if trainable is not None else self.categories
        self.max_order = min(max_order, len(self.categories))
        self.per_subset = per_subset
        self.cap = cap or len(self.trainable) * per_subset
        self.neg_ratio = neg_ratio
        self.inactive_share = inactive_share
        self.boundary_share = boundary_share
        self.seed = seed
        self.paired = paired and len(self.categories) > 1
        self.hard_negatives = hard_negatives
        self.subsets = {r: self._subsets(r) for r in range(1, self.max_order + 1)}
        self.budgets = [self._budget(r) for r in self.subsets if self.subsets[r]]

    def _subsets(self, order: int) -> list[tuple[str, ...]]:
        # In incremental training only subsets containing a new category teach anything new.
        return [s for s in combinations(self.categories, order) if set(s) & set(self.trainable)]

    def _budget(self, order: int) -> OrderBudget:
        n_subsets = len(self.subsets[order])
        n_pos = max(1, min(self.per_subset, self.cap // n_subsets))
        n_neg = math.floor(self.neg_ratio * n_pos + 0.5)  # halves up: round() would take 0.5 to 0
        if self.paired and self._twin_orders(order):
            n_neg += n_pos
        return OrderBudget(order, n_subsets, n_pos, n_neg)

    def _twin_orders(self, order: int) -> bool:
        """Whether a positive of this order has a twin policy: same order, without its category."""
        return order < len(self.categories)

    def epoch_items(self, epoch: int, confusion: Confusion | None = None) -> list[TrainItem]:
        """This epoch's items; ``confusion`` (with ``hard_negatives``) steers the inactive negatives."""
        rng = random.Random(f"{self.seed}:{epoch}")
        items: list[TrainItem] = []
        for budget in self.budgets:
            served: Counter[str] = Counter()  # positives per category so far at this order
            for subset in self.subsets[budget.order]:
                policy = Policy(subset)
                twins = self.paired and self._twin_orders(budget.order)
                for cat in self._positive_categories(subset, budget.positives_per_subset, served):
                    prompt = rng.choice(self.prompts[cat])
                    items.append(TrainItem(prompt, policy, True, cat))
                    if twins:
                        items.append(TrainItem(prompt, self._twin_policy(rng, budget.order, cat), False, cat))
                inactive = [c for c in self.categories if c not in subset]
                weights = self.inactive_weights(subset, inactive, confusion)
                plain = budget.negatives_per_subset - (budget.positives_per_subset if twins else 0)
                for _ in range(plain):
                    items.append(self._negative(rng, policy, inactive, weights))
        return items

    @staticmethod
    def _positive_categories(subset: tuple[str, ...], n: int, served: Counter[str]) -> list[str]:
        """The category of each of a subset's ``n`` positives, counted into ``served``.

        Every member in turn; the ``n mod |S|`` left over go to the members with the fewest positives
        at this order so far (ties: registry order). Always starting from the first member left the
        same categories out: with two positives per order-3 subset, the category last in the
        registry got no order-3 positive at all.
        """
        full = n - n % len(subset)
        extra = sorted(subset, key=lambda c: (served[c], subset.index(c)))[: n % len(subset)]
        cats = [subset[i % len(subset)] for i in range(full)] + [c for c in subset if c in extra]
        served.update(cats)
        return cats

    def _twin_policy(self, rng: random.Random, order: int, category: str) -> Policy:
        """A random policy of the same order that leaves ``category`` out (the contrastive twin)."""
        return Policy(rng.choice([s for s in combinations(self.categories, order) if category not in s]))

    def inactive_weights(
        self, subset: Sequence[str], inactive: list[str], confusion: Confusion | None
    ) -> list[float] | None:
        """Draw probabilities over ``inactive`` for a policy ``subset``; None means uniform.

        A category's pull is the highest rate at which any active category's tokens refused its
        prompts: under {addiction, betting}, alcohol prompts are hard if either block refuses them.
        """
        if not inactive or confusion is None or self.hard_negatives == 0:
            return None
        pull = [max(confusion.get(a, {}).get(c, 0.0) for a in subset) for c in inactive]
        total = sum(pull)
        if total <= 0:
            return None
        h = self.hard_negatives
        return [(1 - h) / len(inactive) + h * p / total for p in pull]

    def _negative(
        self, rng: random.Random, policy: Policy, inactive: list[str], weights: list[float] | None = None
    ) -> TrainItem:
        if inactive and rng.random() < self.inactive_share:
            # uniform keeps rng.choice, so a run without hard negatives draws what it always drew
            cat = rng.choice(inactive) if weights is None else rng.choices(inactive, weights)[0]
            return TrainItem(rng.choice(self.prompts[cat]), policy, False, cat)
        pool = self.boundary if self.boundary and rng.random() < self.boundary_share else self.neutral
        return TrainItem(rng.choice(pool), policy, False, NEUTRAL)

    def epoch_batches(
        self, epoch: int, batch_size: int, confusion: Confusion | None = None
    ) -> list[list[TrainItem]]:
        """Batches of a single order each (equal prefix lengths), orders interleaved at random."""
        rng = random.Random(f"{self.seed}:{epoch}:batches")
        by_order: dict[int, list[TrainItem]] = {}
        for item in self.epoch_items(epoch, confusion):
            by_order.setdefault(item.policy.order, []).append(item)
        batches = []
        for items in by_order.values():
            rng.shuffle(items)
            batches += [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        rng.shuffle(batches)
        return batches

    def steps_per_epoch(self, batch_size: int) -> int:
        return sum(math.ceil((b.positives + b.negatives) / batch_size) for b in self.budgets)

    def drawn_prompts(self, epochs: Sequence[int]) -> list[str]:
        """Every prompt these epochs draw, positive or negative (each one's prompt head gets run)."""
        if self.hard_negatives > 0:  # the draw depends on training: every prompt it could draw
            return sorted(set(self.negative_prompts()).union(*(self.prompts[c] for c in self.categories)))
        return sorted({item.prompt for e in epochs for item in self.epoch_items(e)})

    def drawn_negatives(self, epochs: Sequence[int]) -> list[str]:
        """The prompts these epochs actually draw as negatives (epochs are seeded, so this is known).

        Three epochs of the SmolLM2 recipe draw 536 of the 840 possible negatives; generating base
        answers for those alone saves a third of that generation. With ``hard_negatives`` the draw
        depends on the tokens trained so far, so every possible negative is returned instead.
        """
        if self.hard_negatives > 0:
            return self.negative_prompts()
        return sorted({item.prompt for e in epochs for item in self.epoch_items(e) if not item.positive})

    def negative_prompts(self) -> list[str]:
        """Every prompt that can be drawn as a negative (for precomputing base responses)."""
        pool = set(self.neutral) | set(self.boundary)
        if (self.inactive_share > 0 or self.paired) and len(self.categories) > 1:
            for c in self.categories:
                pool |= set(self.prompts[c])
        return sorted(pool)
