"""The MOSAIC training loop: only the control tokens learn; the backbone stays bitwise frozen.

One run trains every composition order together (batches grouped by order, orders interleaved),
with refusal cross-entropy on positives and ``CE + lambda * KL(p_base || p_ctrl)`` on negatives.
It writes a JSONL log, a checkpoint per epoch (tokens + Adam state, resumable), and the final
artifact into the output directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from ..backbone import Backbone, cache_root, load_backbone
from ..config import ConfigError, DataConfig, TrainConfig
from ..controlled import ControlledModel, PromptHeads, decoder_layers
from ..data import load_suite
from ..data.suites import Suite
from ..tokens import ArtifactError, ControlTokens, read_manifest
from .base_states import BaseStates
from .checkpoint import (
    TrainingClock,
    check_continuation,
    check_same_recipe,
    checkpoint_dir,
    is_complete,
    latest_checkpoint,
    load_live_tensors,
    load_optimizer_state,
    open_log,
    save_optimizer_state,
    training_record,
)
from .hard_negatives import confusion_from_rates, confusion_probe
from .head_cache import HeadCache
from .losses import (
    block_overlap,
    response_cross_entropy,
    response_kl,
    response_margin,
    response_reverse_kl,
)
from .run_dir import claim_output
from .sampler import Confusion, OrderSampler, TrainItem
from .schedule import lr_at, set_lr
from .selection import ValidationProbe, best_epochs, stored_record, take_epochs
from .teacher import BaseResponseCache
from .weight_average import WeightAverage

Reporter = Callable[[str, dict[str, Any]], None]
"""Receives progress events: ('stage', {...}), ('step', {...}), ('epoch', {...})."""


@dataclass
class TrainResult:
    artifact: Path
    steps: int
    seconds: float
    final_loss: float
    budgets: list[dict[str, int]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)  # what the artifact's manifest records
    metrics: dict[str, Any] = field(default_factory=dict)


def training_pools(suite: Suite, categories: list[str], limit: int, seed: int) -> dict[str, Any]:
    """Train-split prompts per category, plus neutral and boundary prompts (seeded sample if limited)."""
    rng = random.Random(seed)

    def sample(rows: list[str]) -> list[str]:
        rows = sorted(rows)
        return rng.sample(rows, limit) if limit and len(rows) > limit else rows

    by_cat = suite.by_category("train")
    prompts = {c: sample([e.prompt for e in by_cat.get(c, [])]) for c in categories}
    neutral = sample([e.prompt for e in suite.neutral("train")])
    boundary = sample([e.prompt for e in suite.boundary("train")])
    return {"prompts": prompts, "neutral": neutral, "boundary": boundary}


def data_hash(pools: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(pools, sort_keys=True).encode()).hexdigest()[:16]


# -- pieces shared with the LoRA comparison methods (methods/lora_common.py) ----------------------
def load_inputs(
    config: TrainConfig, backbone: Backbone | None, report: Reporter
) -> tuple[Backbone, Suite, list[str]]:
    """Seed torch, then the backbone (unless given), the suite and the categories the config trains."""
    torch.manual_seed(config.optim.seed)
    report("stage", {"name": "loading model", "model": config.model.name})
    backbone = backbone or load_backbone(config.model.name, config.model.device, config.model.dtype)
    suite = load_training_suite(config.data)
    registry = suite.registry
    return backbone, suite, list(registry.policy(config.data.categories or list(registry.names)))


def load_training_suite(data: DataConfig) -> Suite:
    """The recipe's suite, with ``data.refusal`` (when set) as every category's refusal template.

    The template lives in the suite's registry, so the artifact records the wording it was trained
    on and serving, the judges and incremental training all read that one.
    """
    suite = load_suite(data.suite)
    if data.refusal:
        suite = dataclasses.replace(suite, registry=suite.registry.with_refusal(data.refusal))
    return suite


def order_sampler(
    config: TrainConfig,
    categories: list[str],
    pools: dict[str, Any],
    trainable: list[str] | None = None,
) -> OrderSampler:
    """The order sampler of a run, set up from the config's ``sampling`` section and seed.

    One place, so every method trained on the MOSAIC data draws exactly the same items.
    """
    s = config.sampling
    return OrderSampler(
        categories,
        pools["prompts"],
        pools["neutral"],
        pools["boundary"],
        max_order=s.max_order,
        per_subset=s.per_subset,
        cap=s.cap,
        neg_ratio=s.neg_ratio,
        inactive_share=s.inactive_share,
        boundary_share=s.boundary_share,
        trainable=trainable,
        seed=config.optim.seed,
        paired=s.paired,
        hard_negatives=s.hard_negatives,
    )


def response_ids(tokenizer: Any, text: str) -> list[int]:
    """A fixed response (refusal template) as target ids, ending with EOS so the model learns to stop."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def budget_rows(sampler: OrderSampler) -> list[dict[str, int]]:
    """The sampler's per-order budgets as plain dicts (progress events and the artifact)."""
    return [
        {
            "order": b.order,
            "subsets": b.subsets,
            "positives_per_subset": b.positives_per_subset,
            "negatives_per_subset": b.negatives_per_subset,
            "positives": b.positives,
            "negatives": b.negatives,
        }
        for b in sampler.budgets
    ]


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    grad_clip: float,
    allow_constant: bool = False,
) -> None:
    """Backward, optional gradient-norm clipping (``grad_clip > 0``), update, and clear the gradients.

    ``allow_constant``: a loss that reaches no trained tensor moves nothing instead of failing in
    ``backward``. Control-token training meets such batches by design (incremental training: a paired
    twin under frozen categories only, or with ``optim.positive_credit=own`` a positive of a frozen
    category); for an adapter it would be a bug, and fails loudly.
    """
    if loss.requires_grad or not allow_constant:
        loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_autocast(device: torch.device, mode: str) -> torch.autocast:
    """Mixed precision for the training passes (``optim.autocast``); ``off`` keeps the model's dtype.

    On a 2-core CPU with bf16 matrix units (AMX) a SmolLM2 step takes 0.76x the float32 time
    (``bench/autocast_step.py``). Only the forward passes are cast: the control tokens, Adam's
    state and the losses stay float32, and generation (base answers, evaluation) is not affected.
    """
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=mode == "bfloat16")


def fill_teacher(teacher: BaseResponseCache, prompts: list[str], report: Reporter) -> None:
    """Generate (or load from cache) the base model's answers to ``prompts``, reporting progress."""
    todo = teacher.missing(prompts)
    report("teacher", {"total": len(prompts), "missing": len(todo)})
    teacher.fill(todo, progress=lambda n: report("teacher_progress", {"n": n}))


def log_window(
    log: IO[str], step: int, epoch: int, window: list[dict[str, float]], t0: float
) -> dict[str, float]:
    """Write one JSONL line with the stats averaged over ``window`` (the steps since the last line)."""
    avg = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
    log.write(
        json.dumps({"step": step, "epoch": epoch, **avg, "elapsed_s": round(time.time() - t0, 1)}) + "\n"
    )
    log.flush()
    return avg


def vocab_max_norm(embedding: torch.nn.Embedding) -> float:
    """The largest row norm of the backbone's input embedding: the scale real tokens live at."""
    with torch.no_grad():
        return float(embedding.weight.float().norm(dim=-1).max())


@torch.no_grad()
def cap_norms(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Project every control vector (row) with a norm above ``max_norm`` back onto that sphere.

    Unconstrained Adam steps inflate the vectors far past any real token's norm (3x on SmolLM2 after
    three epochs), and an outsized embedding dominates its own residual stream. The cap keeps them
    at the scale the frozen model was trained on. Measured on SmolLM2 it lowers refusal without
    making it more selective (docs/experiments.md), so it is off by default.
    """
    for p in params:
        p.copy_(torch.renorm(p, 2, 0, max_norm))


class Trainer:
    def __init__(
        self, config: TrainConfig, backbone: Backbone | None = None, reporter: Reporter | None = None
    ):
        # a config built in Python has not been through ``load_config``: unchecked, a typo in a
        # choice (``select.mode``, ``optim.positive_credit``) silently trained with the default
        config.validate()
        if config.method != "mosaic":  # the other methods train through their own module
            raise ConfigError(
                f"Trainer trains control tokens (method 'mosaic'); train {config.method!r} with "
                f"mosaic_safety.methods.method_module({config.method!r}).train(config, output)"
            )
        self.config = config
        self._ran = False
        self.clock = TrainingClock()
        self.report = reporter or (lambda kind, data: None)
        self.backbone, self.suite, self.categories = load_inputs(config, backbone, self.report)
        registry = self.suite.registry
        self.base_record: dict[str, Any] | None = None
        self.tokens, self.frozen = self._init_tokens()
        self.model = ControlledModel(self.backbone, self.tokens)
        self.pools = training_pools(
            self.suite, self.categories, config.data.limit_per_category, config.optim.seed
        )
        self.sampler = order_sampler(
            config,
            self.categories,
            self.pools,
            trainable=[c for c in self.categories if c not in self.frozen],
        )
        trainable = [n for n in self.tokens.categories if n not in self.frozen]
        self.trainable_blocks = [self.tokens.blocks[n] for n in trainable]  # the norm cap's rows
        self.trainable = [p for n in trainable for p in self.tokens.category_parameters(n)]
        self.optimizer = torch.optim.Adam(self._param_groups(trainable), lr=config.optim.lr)
        trained = set(trainable)
        self.average = (
            WeightAverage(
                [(n, p) for n, p in self._checkpointed() if _category_of(n) in trained], config.optim.ema
            )
            if config.optim.ema > 0
            else None
        )
        self.max_norm = config.tokens.norm_cap * vocab_max_norm(self.backbone.model.get_input_embeddings())
        self.head_cache = HeadCache(self.model, config.optim.cache_mb * 2**20)
        self.base_states = BaseStates(self.model, config.optim.cache_mb * 2**20)
        self.teacher = BaseResponseCache(
            self.model,
            cache_root() / "responses",
            config.teacher.max_new_tokens,
            config.teacher.batch_size,
            self.head_cache,
        )
        self._refusals = {
            c: response_ids(self.backbone.tokenizer, registry[c].refusal_text) for c in self.categories
        }
        select = config.select
        self.probe = (
            None
            if select.mode == "last"
            else ValidationProbe.build(
                self.suite,
                self.categories,
                trainable,
                self._refusals,
                select.per_group,
                select.prefix_tokens,
                config.optim.seed,
                config.eval.batch_size,
            )
        )
        self.confusion_probe = (
            None
            if config.sampling.hard_negatives == 0
            else confusion_probe(
                self.pools["prompts"],
                trainable,
                self._refusals,
                config.sampling.hard_negatives_per_group,
                select.prefix_tokens,
                config.optim.seed,
                config.eval.batch_size,
            )
        )
        self.confusion: Confusion | None = None  # steers the next epoch's negatives (hard_negatives)

    def _param_groups(self, trainable: list[str]) -> list[dict[str, Any]]:
        """Input-level blocks at ``lr``; deep offsets at ``lr * optim.deep_lr_scale``.

        Adam moves every element by about the rate per step, whatever its gradient's scale, while the
        residual stream the offsets are added to is 15-50x larger than the embeddings (SmolLM2: rms 0.14
        at the input, 2-7 in the early layers), so the offsets might want a larger rate. Measured on
        SmolLM2 (one run each) they do not: x3 is less selective, x0.5 the same (docs/experiments.md).
        """
        deep = [self.tokens.deep[n] for n in trainable if n in self.tokens.deep]
        groups: list[dict[str, Any]] = [{"params": self.trainable_blocks, "lr_scale": 1.0}]
        if deep:
            scale = self.config.optim.deep_lr_scale
            groups.append({"params": deep, "lr": self.config.optim.lr * scale, "lr_scale": scale})
        return groups

    def _init_tokens(self) -> tuple[ControlTokens, set[str]]:
        cfg = self.config
        registry = self.suite.registry
        if not cfg.init_artifact:
            return self._fresh_tokens(self.categories), set()
        old = ControlTokens.load(cfg.init_artifact, self.backbone.describe())
        if old.placement != cfg.tokens.placement:
            raise ArtifactError(
                f"{cfg.init_artifact}: placement {old.placement!r} differs from the config's "
                f"{cfg.tokens.placement!r}; incremental training must keep it"
            )
        for name in old.categories:
            if name not in registry:
                raise ArtifactError(
                    f"{cfg.init_artifact}: category {name!r} is not in suite {self.suite.name!r}"
                )
            ours, theirs = registry[name].to_dict(), old.registry[name].to_dict()
            differ = [k for k in theirs if ours.get(k) != theirs[k]]
            if differ:
                hint = " (data.refusal must be the base run's)" if "refusal" in differ else ""
                raise ArtifactError(
                    f"{cfg.init_artifact}: category {name!r} is not defined identically in suite "
                    f"{self.suite.name!r}: its {', '.join(differ)} differ{'s' if len(differ) == 1 else ''}"
                    f"{hint}; the frozen tokens were trained on the artifact's"
                )
        manifest = read_manifest(cfg.init_artifact)
        self.base_record = {  # the lineage: how the frozen tokens were trained, kept in the artifact
            "path": str(Path(cfg.init_artifact).resolve()),
            "tokens_sha256": manifest.get("tokens_sha256"),
            "training": manifest.get("training", {}),
        }
        new = [c for c in self.categories if c not in old.categories]
        if not new:
            raise ArtifactError(f"{cfg.init_artifact} already has every requested category; nothing to train")
        fresh = self._fresh_tokens(new)
        if old.deep_layers != fresh.deep_layers:
            raise ArtifactError(
                f"{cfg.init_artifact}: {'deep' if old.deep_layers else 'input-level'} tokens, but the config "
                f"asks for tokens.deep={cfg.tokens.deep}; incremental training must keep it"
            )
        tokens = ControlTokens(
            registry,
            {n: b.detach() for n, b in old.blocks.items()},
            old.placement,
            {n: o.detach() for n, o in old.deep.items()} or None,
        )
        tokens.add_categories(fresh)
        tokens.freeze(old.categories)
        self.categories = [c for c in registry.names if c in set(self.categories) | set(old.categories)]
        return tokens, set(old.categories)

    def _fresh_tokens(self, categories: list[str]) -> ControlTokens:
        """Newly initialised tokens for ``categories``, as the config's ``tokens`` section asks."""
        cfg = self.config
        # deep offsets go to every decoder layer after the first (the first gets the input vectors)
        deep_layers = len(decoder_layers(self.backbone.model)) - 1 if cfg.tokens.deep else 0
        return ControlTokens.initialise(
            self.suite.registry,
            self.backbone.model.get_input_embeddings(),
            self.backbone.tokenizer,
            cfg.tokens.m,
            cfg.tokens.init,
            cfg.tokens.placement,
            cfg.optim.seed,
            categories,
            deep_layers,
        )

    # -- one step -----------------------------------------------------------------------------
    def _targets(self, items: list[TrainItem]) -> list[list[int]]:
        out = []
        for item in items:
            out.append(
                self._cut(self._refusals[item.category] if item.positive else self.teacher.get(item.prompt))
            )
        return out

    def _cut(self, target: list[int]) -> list[int]:
        """The part of a target the loss sees: all of it, or its first ``optim.target_tokens``
        (a cut target has no EOS: the step trains the opening, not where the answer stops)."""
        k = self.config.optim.target_tokens
        return target[:k] if k > 0 else target

    def loss(self, items: list[TrainItem], share_heads: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over rows of CE (positives) and CE + lambda * KL (negatives).

        With ``share_heads`` the prompt up to the control tokens is run once without gradients and
        shared by the controlled pass and the teacher pass (``ControlledModel.prefill_heads``), and
        kept for the prompt's next draw (``HeadCache``); the teacher's states along fixed targets are
        kept too (``BaseStates``). The values are the same either way up to float rounding
        (``bench/shared_heads.py`` and ``bench/step_caches.py`` measure the time).
        """
        targets = self._targets(items)
        prompts = [i.prompt for i in items]
        heads = self.head_cache.heads(prompts) if share_heads else None
        optim = self.config.optim
        credit = (
            [i.category if i.positive else None for i in items] if optim.positive_credit == "own" else None
        )
        logits, labels = self.model.response_logits(
            prompts, [i.policy for i in items], targets, heads, credit
        )
        fw = optim.first_token_weight
        ce = response_cross_entropy(logits, labels, fw)
        per_row = ce.clone()
        neg = [j for j, item in enumerate(items) if not item.positive]
        kl_mean = reverse_mean = 0.0
        if neg and (optim.kl_weight > 0 or optim.reverse_kl > 0):
            teacher_logits = self.base_states.logits(
                [prompts[j] for j in neg],
                [targets[j] for j in neg],
                heads.rows(neg) if heads is not None else None,
            )
            width = teacher_logits.shape[1]  # the negatives' longest target; past it only -100
            student, neg_labels = logits[neg, :width], labels[neg, :width]
            if optim.kl_weight > 0:
                kl = response_kl(student, teacher_logits, neg_labels, fw)
                per_row[neg] = per_row[neg] + optim.kl_weight * kl
                kl_mean = float(kl.detach().mean())
            if optim.reverse_kl > 0:
                reverse = response_reverse_kl(student, teacher_logits, neg_labels, fw)
                per_row[neg] = per_row[neg] + optim.reverse_kl * reverse
                reverse_mean = float(reverse.detach().mean())
        margin_mean = 0.0
        if neg and optim.greedy_margin > 0:
            hinge = response_margin(logits[neg], labels[neg], optim.greedy_margin_value, fw)
            per_row[neg] = per_row[neg] + optim.greedy_margin * hinge
            margin_mean = float(hinge.detach().mean())
        path_kl = None
        if neg and optim.refusal_path_kl > 0:
            path_kl = self._refusal_path_kl([items[j] for j in neg], heads.rows(neg) if heads else None)
            per_row[neg] = per_row[neg] + optim.refusal_path_kl * path_kl
        pos = [j for j, item in enumerate(items) if item.positive]
        loss = per_row.mean()
        stats = {  # "loss" is the data loss; a block-overlap penalty is logged on its own
            "loss": float(per_row.detach().mean()),
            "ce_pos": float(ce[pos].detach().mean()) if pos else 0.0,
            "ce_neg": float(ce[neg].detach().mean()) if neg else 0.0,
            "kl": kl_mean,
        }
        if optim.reverse_kl > 0:
            stats["reverse_kl"] = reverse_mean
        if optim.greedy_margin > 0:
            stats["margin"] = margin_mean
        if optim.refusal_path_kl > 0:
            stats["path_kl"] = float(path_kl.detach().mean()) if path_kl is not None else 0.0
        if optim.block_orthogonality > 0:
            overlap = block_overlap([self.tokens.blocks[c] for c in self.categories])
            loss = loss + optim.block_orthogonality * overlap
            stats["overlap"] = float(overlap.detach())
        return loss, stats

    def _refusal_path_kl(self, negatives: list[TrainItem], heads: PromptHeads | None) -> torch.Tensor:
        """KL(base || controlled) along a refusal template, per negative row.

        The paper's KL on negatives follows the base model's own answer. Greedy decoding leaves
        that path as soon as the first token flips to the refusal's opening ("I"), and from there
        on nothing was trained: measured on SmolLM2, a policy refused 4-10 of 20 neutral training
        prompts at a mean first-token KL of 0.17-0.79 nats (docs/experiments.md). This term also
        pulls the controlled model to the base model's distribution along the refusal text itself,
        so a policy that does not cover the prompt gains no pull towards refusing it. Each row uses
        one of its policy's templates, in turn.
        """
        prompts = [item.prompt for item in negatives]
        policies = [item.policy for item in negatives]
        targets = [
            self._cut(self._refusals[q.categories[j % len(q.categories)]]) for j, q in enumerate(policies)
        ]
        logits, labels = self.model.response_logits(prompts, policies, targets, heads)
        return response_kl(logits, self.base_states.logits(prompts, targets, heads), labels)

    # -- the run ------------------------------------------------------------------------------
    def prepare(self, start_epoch: int = 0) -> None:
        """Generate (or load from cache) the base model's answers to the negatives the run will draw,
        from ``start_epoch`` (a resumed run) to the last epoch."""
        epochs = range(start_epoch, self.config.optim.epochs)
        self._warm_heads(self.sampler.drawn_prompts(epochs))
        fill_teacher(self.teacher, self.sampler.drawn_negatives(epochs), self.report)

    def _warm_heads(self, prompts: list[str]) -> None:
        """Run the heads of every prompt the run draws in length-sorted batches, before training."""
        cache = self.head_cache
        if cache.max_bytes == 0 or self.model.placement == "prefix":
            return
        self.report("heads", {"total": len(prompts)})
        cache.warm(prompts, self.config.teacher.batch_size, lambda n: self.report("heads_progress", {"n": n}))

    def train(self, output: str | Path, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train into ``output``; ``resume`` continues its last checkpoint, ``overwrite`` replaces a run there.

        A Trainer runs once: a second run would start from the first run's tokens and optimizer
        state while its record told of its own steps only.
        """
        if self._ran:
            raise RuntimeError("this Trainer has already run; build a new Trainer for another run")
        out = Path(output)
        if not resume:
            claim_output(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        budgets = budget_rows(self.sampler)
        if cfg.sampling.max_order > self.sampler.max_order:  # said, not silently clamped
            orders = f"{len(self.categories)} categories: orders 1 to {self.sampler.max_order} are trained"
            self.report(
                "stage", {"name": f"sampling.max_order={cfg.sampling.max_order} is above the {orders}"}
            )
        self.report("budgets", {"budgets": budgets})
        self.clock = TrainingClock()  # ``_resume`` adds the earlier sessions' seconds
        start_epoch, step = self._resume(out) if resume else (0, 0)
        # from here on the tokens and Adam's state are this run's (a failed check above is not)
        self._ran = True
        self.prepare(start_epoch)
        steps_per_epoch = self.sampler.steps_per_epoch(cfg.optim.batch_size)
        total = steps_per_epoch * cfg.optim.epochs
        self.report("start", {"total_steps": total, "done_steps": step, "steps_per_epoch": steps_per_epoch})
        writer = _tensorboard(out) if cfg.log.tensorboard else None
        log = open_log(out, step if resume else None)
        t0, last = time.time(), float("nan")
        self.clock.start()
        try:
            for epoch in range(start_epoch, cfg.optim.epochs):
                window: list[dict[str, float]] = []
                for items in self.sampler.epoch_batches(epoch, cfg.optim.batch_size, self.confusion):
                    lr = lr_at(step, total, cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps)
                    set_lr(self.optimizer, lr)
                    with training_autocast(self.model.device, cfg.optim.autocast):
                        loss, stats = self.loss(items)
                    stats["lr"] = lr
                    if not math.isfinite(stats["loss"]):  # one such step turns every token into NaN
                        raise ArtifactError(
                            f"training diverged at step {step + 1} (loss {stats['loss']}): lower optim.lr or "
                            "the loss weights; the checkpoints of earlier epochs are kept"
                        )
                    optimizer_step(
                        loss, self.optimizer, self.trainable, cfg.optim.grad_clip, allow_constant=True
                    )
                    if self.max_norm > 0:
                        cap_norms(self.trainable_blocks, self.max_norm)
                    if self.average is not None:
                        self.average.update()
                    step += 1
                    last = stats["loss"]
                    window.append(stats)
                    record = {"step": step, "epoch": epoch + 1, "order": items[0].policy.order, **stats}
                    self.report("step", record)
                    if step % cfg.log.every == 0 or step == total:
                        avg = log_window(log, step, epoch + 1, window, t0)
                        if writer is not None:
                            for k, v in avg.items():
                                writer.add_scalar(f"train/{k}", v, step)
                        window = []
                # what the epoch ships: the average, if kept (``live``: the tensors Adam trains)
                averaged = self.average.applied() if self.average is not None else nullcontext()
                with averaged as live:
                    validation = self._validate(epoch + 1) if self.probe is not None else None
                    if validation is not None:
                        log.write(
                            json.dumps({"epoch": epoch + 1, "step": step, "validation": validation}) + "\n"
                        )
                        log.flush()
                    if self.confusion_probe is not None:
                        self.confusion = self._measure_confusion(epoch + 1)
                        log.write(
                            json.dumps({"epoch": epoch + 1, "step": step, "confusion": self.confusion}) + "\n"
                        )
                        log.flush()
                    self._checkpoint(out, epoch + 1, step, validation, live)
                self.report("epoch", {"epoch": epoch + 1, "step": step})
        finally:
            log.close()
            if writer is not None:
                writer.close()
        seconds = self.clock.seconds()
        training: dict[str, Any] = {
            "steps": step,
            "seconds": round(seconds, 1),
            "final_loss": last,
            "budgets": budgets,
        }
        metrics: dict[str, Any] = {}
        if self.probe is not None:
            chosen, history = self._select(out)
            training["selected_epochs"] = chosen
            metrics["validation"] = {"settings": self.probe.settings, "scores": history}
        elif self.average is not None:  # the last step's average; selection already took averages
            self.average.apply()
        artifact = self.save(out, training, metrics)
        return TrainResult(artifact, step, seconds, last, budgets, training, metrics)

    def save(self, out: Path, training: dict[str, Any], metrics: dict[str, Any] | None = None) -> Path:
        extra = {
            "training": {
                "config": self.config.to_dict(),
                "data_hash": data_hash(self.pools),
                "suite": self.suite.name,
                "frozen_categories": sorted(self.frozen),
                "dtype": self.backbone.dtype_name,  # as resolved: `auto` differs by machine
                **({"base": self.base_record} if self.base_record else {}),
                **training,
            },
            "metrics": metrics or {},
        }
        return self.tokens.save(out, self.backbone.describe(), extra)

    # -- checkpoints --------------------------------------------------------------------------
    def _checkpoint(
        self,
        out: Path,
        epoch: int,
        step: int,
        validation: dict[str, Any] | None = None,
        live: dict[str, torch.Tensor] | None = None,
    ) -> None:
        ckpt = checkpoint_dir(out, epoch)
        metrics: dict[str, Any] = {"validation": validation} if validation else {}
        if self.confusion is not None and self.confusion_probe is not None:
            # what the next epoch draws by, read back on --resume if the probe is the same
            metrics["confusion"] = {"settings": self.confusion_probe.settings, "off_target": self.confusion}
        self.save(ckpt, {"epoch": epoch, "steps": step, "seconds": round(self.clock.seconds(), 1)}, metrics)
        save_optimizer_state(ckpt, self.optimizer, self._checkpointed(), epoch, step, live)

    def _measure_confusion(self, epoch: int) -> Confusion:
        """Each trained category's refusal rate on the other categories' training prompts."""
        probe = self.confusion_probe
        assert probe is not None
        self.report("confusion_start", {"epoch": epoch, "total": probe.size})
        rates = probe.rates(self.model, lambda n: self.report("confusion_progress", {"n": n}))
        confusion = confusion_from_rates(rates)
        self.report("confusion", {"epoch": epoch, "confusion": confusion})
        return confusion

    # -- checkpoint selection -----------------------------------------------------------------
    def _validate(self, epoch: int, model: ControlledModel | None = None) -> dict[str, Any]:
        """Score the current tokens (or ``model``'s) on the validation prompts (``training/selection.py``)."""
        assert self.probe is not None
        self.report("validation_start", {"epoch": epoch, "total": self.probe.size})
        record = self.probe.evaluate(
            model or self.model, lambda n: self.report("validation_progress", {"n": n})
        )
        self.report("validation", {"epoch": epoch, **record})
        return record

    def _select(self, out: Path) -> tuple[dict[str, int], dict[int, dict[str, float]]]:
        """Put each trained category's tokens from its best validated epoch into ``self.tokens``.

        Scores come from the checkpoints' manifests; a checkpoint without them (a run trained with
        ``select.mode=last``, then resumed with selection) is scored now.
        """
        assert self.probe is not None
        history: dict[int, dict[str, float]] = {}
        for epoch in range(1, self.config.optim.epochs + 1):
            ckpt = checkpoint_dir(out, epoch)
            if not is_complete(ckpt):  # missing or incomplete (its marker is written last)
                continue
            record = stored_record(ckpt, self.probe.settings)
            if record is None:
                tokens = ControlTokens.load(ckpt, self.backbone.describe())
                record = self._validate(epoch, ControlledModel(self.backbone, tokens))
            history[epoch] = record["scores"]
        if not history:
            raise ArtifactError(f"{out}: no epoch checkpoints to select from")
        chosen = best_epochs(history, self.probe.policies)
        take_epochs(self.tokens, chosen, lambda e: checkpoint_dir(out, e), self.backbone.describe())
        self.report("selected", {"epochs": chosen, "scores": {c: history[e][c] for c, e in chosen.items()}})
        return chosen, history

    def _checkpointed(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every learned tensor under its optimizer-state name: the category (blocks), ``deep.<name>``."""
        return [(k.removeprefix("category."), p) for k, p in self.tokens.named_tensors().items()]

    def _resume(self, out: Path) -> tuple[int, int]:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            self.report("stage", {"name": "no checkpoint to resume from; starting fresh"})
            return 0, 0
        training = training_record(ckpt, read_manifest(ckpt))
        check_same_recipe(ckpt, training["config"], self.config.to_dict())
        dtype_then, dtype_now = training.get("dtype"), self.backbone.dtype_name
        if isinstance(dtype_then, str) and dtype_then != dtype_now:  # e.g. `auto` on a GPU, then on a CPU
            raise ArtifactError(
                f"{ckpt}: the run trained in {dtype_then}; this one would go on in {dtype_now} (model.dtype "
                f"{self.config.model.dtype!r} on {self.backbone.device.type}): set model.dtype={dtype_then}"
            )
        # the base the run froze its categories from, by the lineage record's hash (checked before the
        # data hash, which another base also moves, and less clearly)
        base_then = (training.get("base") or {}).get("tokens_sha256")
        base_now = (self.base_record or {}).get("tokens_sha256")
        if "base" in training and base_then != base_now:
            raise ArtifactError(
                f"{ckpt}: {self.config.init_artifact} changed since this run started (its tokens hash "
                f"{str(base_then)[:12]}, now {str(base_now)[:12]}); restore that artifact or train afresh"
            )
        check_continuation(ckpt, training, data_hash(self.pools), self.config.optim.epochs)
        self._ran = True  # the checks passed; what follows loads the checkpoint's state into this Trainer
        self.clock.prior = float(training.get("seconds", 0.0))  # older checkpoints lack it: 0
        saved = ControlTokens.load(ckpt, self.backbone.describe()).named_tensors()
        with torch.no_grad():
            for name, param in self._checkpointed():
                param.copy_(saved[_artifact_key(name)].to(param.device))
        epoch, step = load_optimizer_state(ckpt, self.optimizer, self._checkpointed())
        if self.average is not None:  # the checkpoint's tokens are the average; Adam trains the live ones
            names = [name for name, _ in self.average.named]
            live = load_live_tensors(ckpt, names)
            self.average.restore({n: saved[_artifact_key(n)] for n in names}, step)
            with torch.no_grad():
                for name, param in self.average.named:
                    param.copy_(live[name].to(param.device))
        if self.confusion_probe is not None:
            record = stored_record(ckpt, self.confusion_probe.settings, "confusion")
            # a checkpoint without a measure from this probe (none stored: an older run; or
            # select.prefix_tokens changed since) is measured now, on the epoch's tokens as the run
            # measured them: with optim.ema the average, not the live tensors Adam goes on from
            averaged = self.average.applied() if self.average is not None else nullcontext()
            with averaged:
                self.confusion = record["off_target"] if record else self._measure_confusion(epoch)
        self.report("stage", {"name": f"resumed from {ckpt.name} (step {step})"})
        return epoch, step


def _category_of(name: str) -> str:
    """The category a checkpointed tensor name belongs to (``addiction``, ``deep.addiction``)."""
    return name.removeprefix("deep.")


def _artifact_key(name: str) -> str:
    """The artifact key of a checkpointed tensor name (see ``Trainer._checkpointed``)."""
    return name if name.startswith("deep.") else f"category.{name}"


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RuntimeError(
            "log.tensorboard needs the tensorboard package: pip install 'mosaic-safety[tensorboard]'"
        ) from exc
    return SummaryWriter(str(out / "tensorboard"))
