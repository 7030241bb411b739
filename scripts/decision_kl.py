"""Where a policy's over-refusals start: KL to the base model at the first response token vs later.

Training pulls the controlled model towards the base model along the base model's own answer on
negatives, averaged over its response tokens. This script asks, per prompt, how far one policy
still moves the first-token distribution (where greedy decoding decides between answering and
"I'm sorry"), how far it moves the answer on average, and whether greedy decoding then refuses.

The prompts are the run's own training pool (``--split pool``: the exact prompts its negatives
were drawn from) or held-out test prompts (``--split test``), so a fitting problem and a
generalisation problem can be told apart.

    python scripts/decision_kl.py runs/smollm2-minors --policy betting --group neutral --split pool
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mosaic_safety import ControlledModel, ControlTokens, Policy, build_judge, load_backbone
from mosaic_safety.backbone import cache_root
from mosaic_safety.config import DataConfig
from mosaic_safety.tokens import read_manifest
from mosaic_safety.training.losses import token_kl
from mosaic_safety.training.teacher import BaseResponseCache
from mosaic_safety.training.trainer import load_training_suite, training_pools


@torch.no_grad()
def decision_drift(
    model: ControlledModel, prompts: Sequence[str], answers: Sequence[Sequence[int]], policy: Policy
) -> list[dict[str, float]]:
    """Per prompt: KL(base || controlled) at the first answer token, its mean over the answer, the argmax."""
    ctrl, labels = model.response_logits(prompts, [policy] * len(prompts), answers)
    base, _ = model.response_logits(prompts, [Policy(())] * len(prompts), answers)
    kl = token_kl(ctrl, base)
    rows = []
    for i in range(len(prompts)):
        row = kl[i][labels[i] != -100]
        rows.append({"first": float(row[0]), "mean": float(row.mean()), "argmax": int(row.argmax())})
    return rows


def pick_prompts(manifest: dict[str, Any], suite: Any, split: str, group: str, n: int) -> list[str]:
    """The first ``n`` prompts of a group: from the run's training pool, or from the test split."""
    if split == "pool":
        cfg = manifest["training"]["config"]
        # the run's own categories, as the trainer resolves them: the pools' sampling depends on them
        cats = list(suite.registry.policy(cfg["data"].get("categories") or list(suite.registry.names)))
        pools = training_pools(suite, cats, cfg["data"]["limit_per_category"], cfg["optim"]["seed"])
        rows = pools["neutral"] if group == "neutral" else pools["prompts"].get(group)
    else:
        examples = suite.neutral("test") if group == "neutral" else suite.by_category("test").get(group, [])
        rows = [e.prompt for e in examples]
    if not rows:
        raise ValueError(
            f"no prompts in group {group!r}; use 'neutral' or one of {', '.join(suite.registry.names)}"
        )
    return rows[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--policy", required=True, help="the policy to measure, e.g. betting")
    parser.add_argument("--group", default="neutral", help="'neutral' or a category (default: neutral)")
    parser.add_argument("--split", choices=("pool", "test"), default="pool")
    parser.add_argument("-n", type=int, default=20, help="prompts (default: 20)")
    args = parser.parse_args()

    manifest = read_manifest(args.artifact)
    if "training" not in manifest:
        parser.error(f"{args.artifact} has no training record to find its data and answer length")
    backbone = load_backbone(manifest["backbone"]["name"])
    model = ControlledModel(backbone, ControlTokens.load(args.artifact, backbone.describe()))
    # the suite the run trained on (a directory too) with the refusal wording it was trained to say
    suite = load_training_suite(DataConfig(**manifest["training"]["config"]["data"]))
    try:
        prompts = pick_prompts(manifest, suite, args.split, args.group, args.n)
        policy = suite.registry.policy(args.policy)
    except ValueError as exc:
        parser.error(str(exc))
    length = manifest["training"]["config"]["teacher"]["max_new_tokens"]
    teacher = BaseResponseCache(model, cache_root() / "responses", length, 32)
    teacher.fill(prompts)
    answers = [teacher.get(p) for p in prompts]
    drift = decision_drift(model, prompts, answers, policy)
    replies = model.generate(prompts, [policy] * len(prompts), max_new_tokens=16)
    refused = build_judge("template+phrase", suite.registry)(prompts, replies)
    for d, reply, r, answer in zip(drift, replies, refused, answers, strict=True):
        base = backbone.tokenizer.decode(answer[:6])
        print(
            f"{'R' if r else ' '} first {d['first']:5.2f}  mean {d['mean']:5.3f}  max@{d['argmax']:<2d} "
            f"base {base!r:36.36s} -> {reply[:48]!r}"
        )
    first = sum(d["first"] for d in drift) / len(drift)
    mean = sum(d["mean"] for d in drift) / len(drift)
    print(
        f"policy {policy}, {args.group} prompts ({args.split}): refused {sum(refused)}/{len(prompts)}; "
        f"KL at the first answer token {first:.2f}, mean over the answer {mean:.3f}"
    )


if __name__ == "__main__":
    main()
