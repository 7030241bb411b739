"""Training DSA: one frozen forward pass per example, then the side network trains on cached states.

The backbone never changes, so its hidden states are computed once: the pooled guard-layer state
of each prompt (guardrail features) and the final hidden states along each target response
(adapter inputs). Both heads then train on these tensors alone; only the adapter's read-out
through the frozen LM head costs anything per step. Data:

- guardrail: the suite's train prompts of each category are positive for that category and
  negative for the others; neutral and boundary prompts are negative for all (multi-label BCE);
- adapter: category prompts -> that category's refusal text (CE); neutral and boundary prompts ->
  the base model's own greedy answer (CE + ``kl_weight`` * KL to the base distribution), so that
  the adapter refuses only what it should even at alpha = 1;
- tau: tuned on the val split as the threshold maximising gate DSR - gate OR (Youden's J on the
  order-1 decisions "prompt x under policy {c}"), unless ``threshold`` is given.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..backbone import Backbone, cache_root, load_backbone
from ..controlled import ControlledModel, decoder_layers
from ..evaluation.table import held_out_groups
from ..logits import output_logits
from ..policy import CategoryRegistry, Policy
from ..tokens import ArtifactError, safetensors_bytes
from ..training.checkpoint import (
    check_continuation,
    check_same_recipe,
    checkpoint_dir,
    latest_checkpoint,
    load_optimizer_state,
    save_optimizer_state,
    training_record,
    unreadable_checkpoint,
)
from ..training.losses import response_cross_entropy, response_kl
from ..training.teacher import BaseResponseCache
from ..training.trainer import data_hash, load_training_suite, training_pools
from .artifact import atomic_write, load_method_artifact, save_method_artifact
from .base import digest
from .dsa import build_modules, load_state_tensors, pool, run_backbone, state_tensors
from .dsa_net import DSAOptions, resolve_guard_layer, roc_auc, youden_threshold

Reporter = Callable[[str, dict[str, Any]], None]


class _Ticker:
    """Progress as 'stage' lines at most every ``every`` seconds (TrainDisplay prints stages)."""

    def __init__(self, report: Reporter, label: str, total: int, every: float = 15.0):
        self.report, self.label, self.total, self.every = report, label, total, every
        self.done, self.last = 0, time.time()

    def __call__(self, n: int) -> None:
        self.done += n
        if time.time() - self.last >= self.every or self.done == self.total:
            self.last = time.time()
            self.report("stage", {"name": f"{self.label}: {self.done}/{self.total}"})


@torch.no_grad()
def extract(
    backbone: Backbone,
    prompts: Sequence[str],
    targets: Sequence[Sequence[int]] | None,
    guard_layer: int,
    how: str,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pooled guard features (N, d) and, with targets, the final hidden states predicting each target
    token (a list of (len(target), d)). Rows are batched by length; results come back in input order."""
    model = ControlledModel(backbone)
    lengths = [
        sum(map(len, model.split_prompt(p))) + (len(targets[i]) if targets else 0)
        for i, p in enumerate(prompts)
    ]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    pooled = torch.zeros(len(prompts), backbone.hidden_size)
    states: list[torch.Tensor] = [torch.zeros(0)] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        tgt = [list(targets[i]) for i in idx] if targets else None
        batch = model.encode([prompts[i] for i in idx], [Policy(())] * len(idx), tgt)
        length = batch.attention_mask.shape[1]
        prompt_mask = batch.attention_mask.bool().clone()
        for j, t in enumerate(tgt or []):
            if t:
                prompt_mask[j, length - len(t) :] = False
        hidden, out = run_backbone(
            backbone,
            guard_layer,
            full=targets is not None,
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        pooled[idx] = pool(hidden, prompt_mask, how).cpu()
        if tgt is not None:
            w = batch.window
            last = out.last_hidden_state[:, length - w :].float().cpu()
            for j, (i, t) in enumerate(zip(idx, tgt)):
                states[i] = last[j, w - 1 - len(t) : w - 1].clone()
        if progress is not None:
            progress(len(idx))
    return pooled, states


STATES_DIR = "dsa_states"  # under cache_root(): one safetensors file per extraction


def cached_extract(
    backbone: Backbone,
    prompts: Sequence[str],
    targets: Sequence[Sequence[int]] | None,
    guard_layer: int,
    how: str,
    batch_size: int,
    report: Reporter,
    label: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``extract``, kept on disk: a second run on the same data and model skips the backbone.

    Extraction is about half of DSA's training time on SmolLM2 (62 of 117 s on an idle 2-core
    machine, docs/methods/dsa.md), and it depends only on the frozen model, the examples, the guard
    layer and the pooling. So it is keyed by exactly those. A re-run that changes only the heads'
    options, or one that restarts after an interruption, reads the states back. An unreadable or
    mismatched entry is recomputed.
    """
    key = digest(
        "dsa-states/1",
        backbone.describe(),
        backbone.output_key,
        str(backbone.tokenizer.chat_template),
        guard_layer,
        how,
        list(prompts),
        [list(t) for t in targets] if targets is not None else None,
    )
    path = cache_root() / STATES_DIR / f"{key}.safetensors"
    if path.exists():
        cached = _read_states(path, len(prompts), targets, backbone.hidden_size)
        if cached is not None:
            report("stage", {"name": f"{label}: {len(prompts)} read from the cache"})
            return cached
        report("stage", {"name": f"{label}: cache entry {path.name} unreadable; recomputing"})
    pooled, states = extract(
        backbone, prompts, targets, guard_layer, how, batch_size, _Ticker(report, label, len(prompts))
    )
    tensors = {"pooled": pooled.contiguous()}
    if targets is not None:
        tensors["states"] = torch.cat(states).contiguous()
        tensors["lengths"] = torch.tensor([len(t) for t in targets], dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(safetensors_bytes(tensors)))
    return pooled, states


def _read_states(
    path: Path, n: int, targets: Sequence[Sequence[int]] | None, hidden: int
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """The cached tensors if they have the shapes this extraction would give, else None."""
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError):
        return None
    pooled = tensors.get("pooled")
    if pooled is None or tuple(pooled.shape) != (n, hidden) or not torch.isfinite(pooled).all():
        return None
    if targets is None:
        return pooled, [torch.zeros(0)] * n
    lengths = [len(t) for t in targets]
    flat, stored = tensors.get("states"), tensors.get("lengths")
    if flat is None or stored is None or stored.tolist() != lengths:
        return None
    if tuple(flat.shape) != (sum(lengths), hidden) or not torch.isfinite(flat).all():
        return None
    return pooled, [s.clone() for s in torch.split(flat, lengths)]


def train_guard(guard: Any, x: torch.Tensor, y: torch.Tensor, options: DSAOptions) -> float:
    """Full-batch AdamW on standardised features with multi-label BCE; returns the final loss."""
    guard.mean.copy_(x.mean(0))
    guard.std.copy_(x.std(0) + 1e-5)
    opt = torch.optim.AdamW(guard.parameters(), lr=options.guard_lr, weight_decay=options.guard_weight_decay)
    loss = torch.tensor(float("nan"))
    for _ in range(options.guard_epochs):
        loss = F.binary_cross_entropy_with_logits(guard(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


RNG_FILE = "rng_state.json"  # in an epoch checkpoint: the shuffling RNG, so a resumed run draws the same


def _rng_state(ckpt: Path) -> tuple[Any, ...]:
    """The shuffling RNG's state saved with an epoch checkpoint (JSON turns its tuples into lists)."""
    try:
        version, internal, gauss = json.loads((ckpt / RNG_FILE).read_text())
        return (version, tuple(internal), gauss)
    except (OSError, ValueError, TypeError) as exc:
        raise unreadable_checkpoint(ckpt, f"{RNG_FILE}: {exc}") from exc


def _pad(states: list[torch.Tensor], targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in targets)
    h = torch.zeros(len(states), width, states[0].shape[-1])
    y = torch.full((len(states), width), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(states, targets)):
        h[i, : len(t)] = s
        y[i, : len(t)] = torch.tensor(t)
    return h, y


def resume_point(
    out: Path, config: Any, backbone: Backbone
) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """The run's latest complete checkpoint, its manifest and tensors, or None to start fresh.

    The recipe must be the one the checkpoint was made with; only ``adapter_epochs`` may grow, to
    train longer (the guardrail and its threshold are kept as trained).
    """
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    manifest, tensors, _ = load_method_artifact(ckpt, "dsa", backbone.describe())
    saved = training_record(ckpt, manifest, required=False).get("config")
    if saved is None:
        raise ArtifactError(
            f"{ckpt}: this checkpoint predates resumable DSA runs; train afresh with --overwrite"
        )
    # what a resumed run reads of the record besides its recipe: the guardrail's loss, the times so far
    training_record(
        ckpt, manifest, numbers=("seconds", "adapter_seconds", "guard_seconds"), needed=("guard_loss",)
    )

    def without_epochs(cfg: dict[str, Any]) -> dict[str, Any]:
        options = {k: v for k, v in cfg.get("method_options", {}).items() if k != "adapter_epochs"}
        return {**cfg, "method_options": options}

    check_same_recipe(
        ckpt, without_epochs(saved), without_epochs(config.to_dict()), "method_options.adapter_epochs"
    )
    return ckpt, manifest, tensors


def train_dsa(
    config: Any,
    output: str | Path,
    reporter: Reporter | None = None,
    backbone: Backbone | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train DSA into ``output``; ``resume`` continues the adapter from its last epoch checkpoint."""
    report = reporter or (lambda kind, data: None)
    options = DSAOptions.parse(config.method_options)
    seed = config.optim.seed
    torch.manual_seed(seed)
    out = Path(output)
    t_start = time.time()
    report("stage", {"name": "loading model", "model": config.model.name})
    backbone = backbone or load_backbone(config.model.name, config.model.device, config.model.dtype)
    start = resume_point(out, config, backbone) if resume else None  # fail before the slow part
    suite = load_training_suite(config.data)
    categories = list(suite.registry.policy(config.data.categories or list(suite.registry.names)))
    # The artifact's registry holds the trained categories only (as MOSAIC artifacts do), so the
    # evaluation harness never asks for a category the guardrail cannot score.
    registry = CategoryRegistry(
        suite.registry.name, tuple(suite.registry[c] for c in categories), suite.registry.description
    )
    guard_layer = resolve_guard_layer(options.guard_layer, len(decoder_layers(backbone.model)))
    pools = training_pools(suite, categories, config.data.limit_per_category, seed)
    if start is not None:
        epochs = options.adapter_epochs
        check_continuation(
            start[0], start[1].get("training", {}), data_hash(pools), epochs, "method_options.adapter_epochs"
        )
    tok = backbone.tokenizer
    device = backbone.device

    # -- data: targets per example -------------------------------------------------------------
    teacher = BaseResponseCache(
        ControlledModel(backbone),
        cache_root() / "responses",
        config.teacher.max_new_tokens,
        config.teacher.batch_size,
    )
    negatives = sorted(set(pools["neutral"]) | set(pools["boundary"]))
    todo = teacher.missing(negatives)
    report("teacher", {"total": len(negatives), "missing": len(todo)})
    teacher.fill(todo, progress=lambda n: report("teacher_progress", {"n": n}))
    refusal = {
        c: tok(registry[c].refusal_text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for c in categories
    }
    prompts: list[str] = []
    targets: list[list[int]] = []
    owner: list[int] = []  # category index, -1 for neutral / boundary
    for k, c in enumerate(categories):
        for p in pools["prompts"][c]:
            prompts.append(p)
            targets.append(refusal[c])
            owner.append(k)
    for p in negatives:
        prompts.append(p)
        targets.append(teacher.get(p))
        owner.append(-1)

    # -- cached backbone states -----------------------------------------------------------------
    t0 = time.time()
    report(
        "stage", {"name": f"backbone states of {len(prompts)} training examples (guard layer {guard_layer})"}
    )
    feats, states = cached_extract(
        backbone,
        prompts,
        targets,
        guard_layer,
        options.guard_pool,
        config.teacher.batch_size,
        report,
        "training states",
    )
    val_groups = held_out_groups(suite, categories, "val", options.val_per_group, seed)
    val_prompts = [p for g in val_groups.values() for p in g]
    val_owner = [categories.index(g) if g in categories else -1 for g, ps in val_groups.items() for _ in ps]
    val_feats, _ = cached_extract(
        backbone,
        val_prompts,
        None,
        guard_layer,
        options.guard_pool,
        config.teacher.batch_size,
        report,
        "val guard features",
    )
    feature_seconds = time.time() - t0

    # -- guardrail and its threshold ------------------------------------------------------------
    k_cats = len(categories)
    guard, adapter = build_modules(backbone.hidden_size, k_cats, options)
    t1 = time.time()
    if start is not None:
        ckpt, manifest, tensors = start
        load_state_tensors(guard, adapter, tensors)
        guard_loss = float(manifest["training"]["guard_loss"])
    else:
        if resume:
            report("stage", {"name": "no checkpoint to resume from; starting fresh"})
        owners = torch.tensor(owner)
        y = torch.zeros(len(prompts), k_cats)
        y[owners >= 0, owners[owners >= 0]] = 1.0
        report("stage", {"name": f"guardrail head ({options.guard_epochs} full-batch steps)"})
        guard_loss = train_guard(guard, feats, y, options)
    with torch.no_grad():
        val_probs = torch.sigmoid(guard(val_feats))
    vo = torch.tensor(val_owner)
    val_y = torch.zeros(len(val_prompts), k_cats, dtype=torch.bool)
    val_y[vo >= 0, vo[vo >= 0]] = True
    val_auc = {c: roc_auc(val_probs[:, k], val_y[:, k]) for k, c in enumerate(categories)}
    if options.threshold == -1.0:
        tau, gate_dsr, gate_or = youden_threshold(val_probs, val_y)
    else:
        tau = options.threshold
        fired = val_probs > tau
        gate_dsr = float(fired[val_y].float().mean())
        gate_or = float(fired[~val_y].float().mean())
    guard_seconds = time.time() - t1
    # a resumed run records its whole time beside its whole steps: the sessions before this one count
    prior_seconds, prior_adapter = 0.0, 0.0
    if start is not None:
        done = start[1]["training"]
        prior_seconds = float(done.get("seconds", 0.0))  # older checkpoints lack these: 0
        prior_adapter = float(done.get("adapter_seconds", 0.0))
        guard_seconds = float(done.get("guard_seconds", guard_seconds))  # trained by the first session
    report(
        "stage",
        {
            "name": f"guardrail val AUC {sum(val_auc.values()) / k_cats:.3f}; tau {tau:.3f} "
            f"(gate DSR {gate_dsr:.2f}, gate OR {gate_or:.2f})"
        },
    )

    # -- alignment adapter ----------------------------------------------------------------------
    lm = backbone.model
    adapter.to(device).train()
    opt = torch.optim.Adam(adapter.parameters(), lr=options.adapter_lr)
    named = list(adapter.named_parameters())
    rng = random.Random(seed)
    first_epoch, step = 0, 0
    if start is not None:
        first_epoch, step = load_optimizer_state(start[0], opt, named)
        rng.setstate(_rng_state(start[0]))
        report("stage", {"name": f"resumed from {start[0].name} (step {step})"})
    bs = options.adapter_batch_size
    steps_per_epoch = -(-len(prompts) // bs)
    total = steps_per_epoch * options.adapter_epochs
    report("start", {"total_steps": total, "done_steps": step, "steps_per_epoch": steps_per_epoch})
    last = float("nan")
    t2 = time.time()
    meta = {
        "backbone": backbone.describe(),
        "options": options.to_dict() | {"categories": categories, "guard_layer_resolved": guard_layer},
    }
    for epoch in range(first_epoch, options.adapter_epochs):
        order = list(range(len(prompts)))
        rng.shuffle(order)
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            h, labels = _pad([states[i] for i in idx], [targets[i] for i in idx])
            h, labels = h.to(device), labels.to(device)
            # negatives are conditioned on a random category: the adapter must answer them whatever it is told
            cat = torch.tensor(
                [owner[i] if owner[i] >= 0 else rng.randrange(k_cats) for i in idx], device=device
            )
            adapted = output_logits(
                lm, adapter(h.to(backbone.dtype), cat[:, None].expand(labels.shape)).to(backbone.dtype)
            )
            ce = response_cross_entropy(adapted, labels)
            per_row = ce.clone()
            neg = torch.tensor([owner[i] < 0 for i in idx], device=device)
            kl_mean = 0.0
            if bool(neg.any()) and options.kl_weight > 0:
                with torch.no_grad():
                    base = output_logits(lm, h[neg].to(backbone.dtype))
                kl = response_kl(adapted[neg], base, labels[neg])
                per_row[neg] = per_row[neg] + options.kl_weight * kl
                kl_mean = float(kl.detach().mean())
            loss = per_row.mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(adapter.parameters()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            last = float(loss.detach())
            pos = ~neg
            report(
                "step",
                {
                    "step": step,
                    "epoch": epoch + 1,
                    "loss": last,
                    "kl": kl_mean,
                    "ce_pos": float(ce[pos].detach().mean()) if bool(pos.any()) else 0.0,
                    "ce_neg": float(ce[neg].detach().mean()) if bool(neg.any()) else 0.0,
                },
            )
        ckpt = checkpoint_dir(out, epoch + 1)
        save_method_artifact(
            ckpt,
            "dsa",
            meta["backbone"],
            registry,
            state_tensors(guard, adapter.eval()),
            meta["options"],
            extra={
                "threshold": tau,
                "training": {
                    "epoch": epoch + 1,
                    "steps": step,
                    "config": config.to_dict(),
                    "data_hash": data_hash(pools),
                    "guard_loss": guard_loss,
                    "seconds": round(prior_seconds + time.time() - t_start, 1),
                    "adapter_seconds": round(prior_adapter + time.time() - t2, 1),
                    "guard_seconds": round(guard_seconds, 1),
                },
            },
        )
        atomic_write(ckpt / RNG_FILE, lambda tmp: tmp.write_text(json.dumps(rng.getstate())))
        save_optimizer_state(ckpt, opt, named, epoch + 1, step)  # last: marks the checkpoint complete
        adapter.train()
        report("epoch", {"epoch": epoch + 1, "step": step})
    adapter.eval()
    adapter_seconds = prior_adapter + time.time() - t2
    seconds = prior_seconds + time.time() - t_start
    training = {
        "config": config.to_dict(),
        "suite": suite.name,
        "data_hash": data_hash(pools),
        "examples": {"positives": sum(o >= 0 for o in owner), "negatives": sum(o < 0 for o in owner)},
        "val_prompts": len(val_prompts),
        "steps": step,
        "final_loss": last,
        "guard_loss": guard_loss,
        "seconds": round(seconds, 1),
        "feature_seconds": round(feature_seconds, 1),
        "guard_seconds": round(guard_seconds, 1),
        "adapter_seconds": round(adapter_seconds, 1),
    }
    metrics = {"val_auc": val_auc, "threshold": {"tau": tau, "gate_dsr": gate_dsr, "gate_or": gate_or}}
    save_method_artifact(
        out,
        "dsa",
        meta["backbone"],
        registry,
        state_tensors(guard, adapter),
        meta["options"],
        extra={"threshold": tau, "training": training, "metrics": metrics},
    )
    return {
        "steps": step,
        "seconds": seconds,
        "final_loss": last,
        "threshold": tau,
        "val_auc": val_auc,
        "feature_seconds": feature_seconds,
    }
