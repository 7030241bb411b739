"""Can the frozen backbone tell the categories apart at all? Linear probes on its hidden states.

Control tokens read the prompt through the frozen model's own states. If a linear reader of those
states cannot separate two categories on held-out prompts, no amount of token training will make
one category's tokens refuse the first and answer the second; if it can, the limit lies in what
the tokens learn. Per layer, logistic regression is trained on the suite's train split and scored
on its test split, on the state of the last position (where the first answer token is decided)
and on the mean over the sequence:

- a probe over all groups: accuracy and each group's recall;
- one detector per category, its threshold set on the test split so that it fires on 90% of the
  category's prompts: where else it fires. With ``--base-tokens`` also OR-ed with the base model's
  own refusals, which is what a model would score that refuses exactly where the detector fires
  and otherwise answers as the base model (the acceptance measure of the core issue).

With ``--artifact DIR --policy NAME`` the states are read under that trained policy (its control
tokens and deep offsets in the sequence), and the policy's own refusals are measured beside them.

    python scripts/separability.py --cache runs/sep/states.pt --train-limit 120 --base-tokens 24
    python scripts/separability.py --artifact runs/X --policy addiction --cache runs/sep/X.pt \
        --train-limit 120 --base-tokens 24 --layers 9 21 30
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mosaic_safety import ControlledModel, ControlTokens, Policy, build_judge, load_backbone, load_suite
from mosaic_safety.logits import margin_over_rivals


@torch.no_grad()
def prompt_states(
    model: ControlledModel, prompts: Sequence[str], policy: Policy | None = None, batch_size: int = 32
) -> torch.Tensor:
    """Per prompt and layer: [last-position state ; mean state over the sequence], shape (n, L+1, 2H).

    The sequence is the one generation sees: the chat template, and under ``policy`` its control
    tokens (with their deep offsets); the last position is where the first answer token is decided.
    """
    policy = policy or Policy(())
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = model.encode(chunk, [policy] * len(chunk))
        out = model.decoder_output(batch, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states, dim=1).float().cpu()  # (b, L+1, T, H)
        weights = batch.attention_mask.cpu()[:, None, :, None].float()
        mean = (hidden * weights).sum(2) / weights.sum(2)
        rows.append(torch.cat([hidden[:, :, -1], mean], dim=-1))
    return torch.cat(rows)


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 500, l2: float = 1e-3, balance: bool = False
) -> torch.nn.Linear:
    """Logistic regression on standardised features, full-batch L-BFGS (classes weighted equally if asked)."""
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    weight = (len(y) / (classes * torch.bincount(y, minlength=classes).float())) if balance else None

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y, weight=weight) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def probe_logits(
    train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, classes: int, balance: bool = False
) -> torch.Tensor:
    """A probe fitted on ``train`` (standardised by the train split's statistics), applied to ``test``."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    probe = fit_probe((train - mu) / sd, y_train, classes, balance=balance)
    with torch.no_grad():
        return probe((test - mu) / sd)


def fires_at_recall(score: torch.Tensor, own: torch.Tensor, recall: float) -> torch.Tensor:
    """Where ``score`` reaches the threshold that ``recall`` of the ``own`` rows reach."""
    ranked = score[own].sort().values
    missed = int((1 - recall) * len(ranked) + 1e-9)  # 1 - 0.9 is 0.0999...: plain int() misses one row
    return score >= ranked[missed]


def head_margin(model: ControlledModel, final: torch.Tensor, token: int) -> torch.Tensor:
    """How far the frozen LM head puts ``token`` above every other token, from final-layer states:
    the score by which greedy decoding opens a refusal (it does where the margin is positive)."""
    with torch.no_grad():
        logits = model.states_to_logits(final.to(model.device, model.backbone.dtype)).float().cpu()
    return margin_over_rivals(logits, torch.full(logits.shape[:-1], token))


def detector_fires(
    train: torch.Tensor,
    y_train: torch.Tensor,
    test: torch.Tensor,
    y_test: torch.Tensor,
    target: int,
    recall: float,
) -> torch.Tensor:
    """Where a one-vs-rest linear detector for ``target`` fires on the test rows, its threshold set on
    the test split itself so that it fires on ``recall`` of the target's prompts (the oracle threshold
    favours the detector, so what it over-flags is a lower bound for such a reader)."""
    logits = probe_logits(train, (y_train == target).long(), test, 2, balance=True)
    return fires_at_recall(logits[:, 1] - logits[:, 0], y_test == target, recall)


def refusals(
    model: ControlledModel,
    suite: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    policy: Policy | None = None,
) -> torch.Tensor:
    """Which prompts the model refuses under ``policy`` (the base model without one): greedy answers
    judged by the evaluation's template+phrase judge."""
    policy = policy or Policy(())
    responses: list[str] = []
    for start in range(0, len(prompts), 48):
        chunk = list(prompts[start : start + 48])
        responses += model.generate(chunk, [policy] * len(chunk), max_new_tokens=max_new_tokens)
        print(f"answers under {policy or '(empty)'}: {len(responses)}/{len(prompts)}", flush=True)
    # the suite's refusal templates and the wording the tokens were trained to say (data.refusal)
    registries = [suite.registry] + ([model.tokens.registry] if model.tokens is not None else [])
    return torch.tensor(build_judge("template+phrase", registries)(list(prompts), responses))


def sample_rows(labels: torch.Tensor, per_group: int, seed: int = 0) -> torch.Tensor:
    """A seeded sample of up to ``per_group`` rows of every label (the data files are ordered by
    subtopic, so the first rows of a category would leave whole subtopics out)."""
    rng = random.Random(seed)
    keep: list[int] = []
    for label in labels.unique().tolist():
        rows = torch.nonzero(labels == label).flatten().tolist()
        keep += sorted(rng.sample(rows, min(per_group, len(rows))))
    return torch.tensor(keep)


def group_rates(mask: torch.Tensor, labels: torch.Tensor, groups: Sequence[str]) -> str:
    """``add 8% alc 14% ...``: the share of each group's rows set in ``mask``."""
    return " ".join(f"{g[:3]} {float(mask[labels == i].float().mean()):.0%}" for i, g in enumerate(groups))


def split_rows(suite: Any, groups: Sequence[str], split: str) -> tuple[list[str], torch.Tensor]:
    """A split's prompts of every group (pure neutral rows for ``neutral``) and their group index."""
    by_cat = suite.by_category(split)
    prompts, labels = [], []
    for label, group in enumerate(groups):
        examples = suite.neutral(split) if group == "neutral" else by_cat[group]
        prompts += [ex.prompt for ex in examples]
        labels += [label] * len(examples)
    return prompts, torch.tensor(labels)


def cached(path: Path | None, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, stored at ``path`` with ``key``; a file made for another key is an error."""
    if path is not None and path.exists():
        stored = torch.load(path)
        if stored.get("key") != key:
            raise SystemExit(f"{path} holds states of {stored.get('key')}, not {key}; use another --cache")
        return stored["value"]
    value = compute()
    if path is not None:
        torch.save({"key": key, "value": value}, path)
    return value


def print_multiclass(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    groups: Sequence[str],
    layers: Sequence[int],
    views: dict[str, slice],
    pair: Sequence[str],
) -> None:
    """A probe over all groups at once: accuracy, the pair's confusion and each group's recall."""
    a, b = (name[:3] for name in pair)
    ia, ib = groups.index(pair[0]), groups.index(pair[1])
    print("\nprobe over all groups, test split")
    print(f"{'layer':>5} {'view':>5} {'test acc':>8} {a + '->' + b:>8} {b + '->' + a:>8}  per group recall")
    for layer in layers:
        for view, cols in views.items():
            tr, te = x_train[:, layer, cols], x_test[:, layer, cols]
            pred = probe_logits(tr, y_train, te, len(groups)).argmax(-1)
            acc = float((pred == y_test).float().mean())
            recall = [float((pred[y_test == g] == g).float().mean()) for g in range(len(groups))]
            a2b = float((pred[y_test == ia] == ib).float().mean())
            b2a = float((pred[y_test == ib] == ia).float().mean())
            per = " ".join(f"{g[:3]} {r:.0%}" for g, r in zip(groups, recall, strict=True))
            print(f"{layer:>5} {view:>5} {acc:>8.1%} {a2b:>8.1%} {b2a:>8.1%}  {per}", flush=True)


def detector_table(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    groups: Sequence[str],
    layer: int,
    cols: slice,
    recall: float,
    refused: torch.Tensor | None = None,
    only: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Per category detector: the share of each group it fires on, alone and OR-ed with the base
    model's own refusals (``+base``: what refusing exactly where it fires would score)."""
    n_cat = len(groups) - 1
    tr, te = x_train[:, layer, cols], x_test[:, layer, cols]
    table: dict[str, list[dict[str, Any]]] = {"": [], "+base": []}
    for c in range(n_cat):
        if only is not None and groups[c] != only:
            continue
        fires = detector_fires(tr, y_train, te, y_test, c, recall)
        variants = {"": fires} if refused is None else {"": fires, "+base": fires | refused}
        for tag, mask in variants.items():
            rates = [float(mask[y_test == g].float().mean()) for g in range(len(groups))]
            other = sum(r for g, r in enumerate(rates[:n_cat]) if g != c) / (n_cat - 1)
            table[tag].append({"category": groups[c], "own": rates[c], "other": other, "rates": rates})
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--suite", default="minors")
    parser.add_argument(
        "--artifact", default=None, help="read the states under a trained policy of this artifact"
    )
    parser.add_argument("--policy", default=None, help="the one category whose policy --artifact applies")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="hidden-state indices (0: embeddings)"
    )
    parser.add_argument(
        "--train-limit", type=int, default=None, help="train prompts per group (seeded sample)"
    )
    parser.add_argument("--pair", nargs=2, default=["addiction", "alcohol"], help="two categories to compare")
    parser.add_argument(
        "--recall", type=float, default=0.9, help="own-category recall the detectors are set to"
    )
    parser.add_argument("--cache", type=Path, default=None, help="keep the hidden states in this .pt file")
    parser.add_argument(
        "--base-tokens", type=int, default=0, help="also judge the base model's answers of this many tokens"
    )
    parser.add_argument(
        "--refusal-token", default="Sorry", help="the trained refusal's first word (--policy)"
    )
    args = parser.parse_args(argv)
    if (args.artifact is None) != (args.policy is None):
        parser.error("--artifact and --policy go together")

    suite = load_suite(args.suite)
    groups = [*suite.registry.names, "neutral"]
    train_prompts, y_train = split_rows(suite, groups, "train")
    test_prompts, y_test = split_rows(suite, groups, "test")
    model: ControlledModel | None = None

    def controlled() -> ControlledModel:
        nonlocal model
        if model is None:
            backbone = load_backbone(args.model, device="cpu", dtype="float32")
            tokens = ControlTokens.load(args.artifact, backbone.describe()) if args.artifact else None
            model = ControlledModel(backbone, tokens)
        return model

    def states() -> tuple[torch.Tensor, torch.Tensor]:
        policy = controlled().policy(args.policy) if args.policy else None
        return prompt_states(controlled(), train_prompts, policy), prompt_states(
            controlled(), test_prompts, policy
        )

    key = {"model": args.model, "suite": args.suite, "artifact": args.artifact, "policy": args.policy}
    x_train, x_test = cached(args.cache, key, states)
    if args.train_limit is not None:
        keep = sample_rows(y_train, args.train_limit)
        x_train, y_train = x_train[keep], y_train[keep]
    print(f"{len(y_train)} train and {len(y_test)} test prompts over {', '.join(groups)}")
    layers = args.layers or list(range(0, x_train.shape[1], 3))
    hidden = x_train.shape[-1] // 2
    views = {"last": slice(0, hidden), "mean": slice(hidden, 2 * hidden), "both": slice(0, 2 * hidden)}
    print_multiclass(x_train, y_train, x_test, y_test, groups, layers, views, args.pair)

    refused = None
    if args.base_tokens:
        base_key = {"model": args.model, "suite": args.suite, "tokens": args.base_tokens}
        refused = cached(
            args.cache.with_suffix(f".base{args.base_tokens}.pt") if args.cache else None,
            base_key,
            lambda: refusals(controlled(), suite, test_prompts, args.base_tokens),
        )
        print(f"\nthe base model refuses (greedy, {args.base_tokens} tokens, template+phrase judge):")
        print("  " + group_rates(refused, y_test, groups))
        if args.policy:
            under = cached(
                args.cache.with_suffix(f".policy{args.base_tokens}.pt") if args.cache else None,
                {**base_key, "artifact": args.artifact, "policy": args.policy},
                lambda: refusals(
                    controlled(), suite, test_prompts, args.base_tokens, controlled().policy(args.policy)
                ),
            )
            print(f"under the trained {args.policy} policy itself:\n  " + group_rates(under, y_test, groups))
    if args.policy:
        # the policy's own readout as a score: the frozen head's margin for the refusal's first token
        token = controlled().tokenizer.encode(args.refusal_token, add_special_tokens=False)[0]
        margin = head_margin(controlled(), x_test[:, -1, : x_test.shape[-1] // 2], token)
        own = y_test == groups.index(args.policy)
        print(
            f"\nthe LM head's margin for {args.refusal_token!r} (the first refusal token) at the last position:"
        )
        print("  greedy opens with it: " + group_rates(margin > 0, y_test, groups))
        fires = fires_at_recall(margin, own, args.recall)
        print(f"  as a score, thresholded at {args.recall:.0%} own: " + group_rates(fires, y_test, groups))

    print(f"\none-vs-rest detectors set to fire on {args.recall:.0%} of their own test prompts;")
    print("'other' is the mean over the other categories, 'neutral' (mean row) the worst detector's")
    if refused is not None:
        print("'+base': fires OR the base model refuses, i.e. a model that refuses exactly where it fires")
    print(f"{'layer':>5} {'view':>5} {'category':>15} {'other':>6} {'neutral':>7}  per group")
    for layer in layers:
        for view, cols in views.items():
            table = detector_table(
                x_train, y_train, x_test, y_test, groups, layer, cols, args.recall, refused, args.policy
            )
            for tag, rows in table.items():
                for row in rows:
                    per = " ".join(f"{g[:3]} {r:.0%}" for g, r in zip(groups, row["rates"], strict=True))
                    name = row["category"] + tag
                    print(
                        f"{layer:>5} {view:>5} {name:>15} {row['other']:>6.1%} {row['rates'][-1]:>7.1%}  {per}"
                    )
            for tag, rows in table.items():
                if rows:
                    own = sum(r["own"] for r in rows) / len(rows)
                    other = sum(r["other"] for r in rows) / len(rows)
                    neutral = max(r["rates"][-1] for r in rows)
                    print(
                        f"{layer:>5} {view:>5} {'mean' + tag:>15} {other:>6.1%} {neutral:>7.1%}  (own {own:.0%})"
                    )


if __name__ == "__main__":
    main()
