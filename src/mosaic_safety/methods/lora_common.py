"""Shared machinery of the LoRA baselines ``lora_sft``, ``orpo`` and ``magic_token``.

All three adapt the frozen backbone with LoRA (peft) and learn to read the policy from the system
prompt; they differ only in the conditioning text and the loss. What they share lives here:

- strict ``method_options`` parsing: a typo in a recipe is an error, not a silently used default;
- an adapted *copy* of the backbone: fresh module objects whose frozen weight tensors are the
  backbone's own. LoRA layers therefore never appear in the shared ``backbone.model`` (the
  evaluation harness runs ``none`` on the same object), and the copy costs no weight memory;
- the MOSAIC data pipeline (order-sampled items, refusal templates on positives, the base model's
  cached greedy answers on negatives), so every method learns from the same examples;
- the training loop, emitting the MOSAIC trainer's progress events, and the artifact: LoRA tensors
  under the names of ``get_peft_model_state_dict``, the options and LoRA config in the manifest;
- ``AdapterMethod``: rows with the empty policy go to the untouched base model (by default: no
  active category means no restriction, exactly like MOSAIC's empty prefix), other rows to the
  adapted copy with the method's system prompt.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backbone import Backbone, cache_root
from ..config import ConfigError, TrainConfig
from ..controlled import ControlledModel, Prompt, check_rows
from ..policy import CategoryRegistry, Policy, PolicyError
from ..tokens import ArtifactError
from ..training.checkpoint import (
    TrainingClock,
    check_continuation,
    check_same_recipe,
    checkpoint_dir,
    latest_checkpoint,
    load_optimizer_state,
    open_log,
    save_optimizer_state,
    training_record,
)
from ..training.losses import response_cross_entropy
from ..training.sampler import TrainItem
from ..training.teacher import BaseResponseCache
from ..training.trainer import (
    budget_rows,
    data_hash,
    fill_teacher,
    load_inputs,
    log_window,
    optimizer_step,
    order_sampler,
    response_ids,
    training_pools,
)
from .artifact import WEIGHTS_FILE, load_method_artifact, save_method_artifact
from .base import Progress
from .controlled_method import ControlledMethod, Rewrite

Reporter = Callable[[str, dict[str, Any]], None]


# -- options ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One ``method_options`` key: its type, default and (optional) rule."""

    kind: type  # int | float | str | bool | list (of non-empty strings)
    default: Any
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    choices: tuple[str, ...] = ()


LORA_OPTIONS: dict[str, Option] = {
    "lora_r": Option(int, 8, lambda v: v >= 1, "must be at least 1"),
    "lora_alpha": Option(float, 16.0, lambda v: v > 0, "must be positive"),
    "lora_dropout": Option(float, 0.0, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "lora_targets": Option(list, ["q_proj", "v_proj"], lambda v: len(v) > 0, "must name at least one module"),
    "empty_policy": Option(str, "base", choices=("base", "adapter")),
}
"""LoRA r=8 on q/v is the common small default (the papers give no LoRA config)."""


def parse_options(method: str, raw: Any, schema: dict[str, Option]) -> dict[str, Any]:
    """Validated options with defaults filled in; unknown keys and wrong types are ``ConfigError``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"method_options for {method}: expected a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(
            f"method_options for {method}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(schema))}"
        )
    return {key: _check(method, key, raw.get(key, opt.default), opt) for key, opt in schema.items()}


def _check(method: str, key: str, value: Any, opt: Option) -> Any:
    where = f"method_options.{key} ({method})"
    if opt.kind is bool:
        ok = isinstance(value, bool)
    elif opt.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif opt.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif opt.kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        value = list(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: expected {_kind_name(opt.kind)}, got {value!r}")
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(opt.choices)}")
    if opt.check is not None and not opt.check(value):
        raise ConfigError(f"{where}: {opt.rule} (got {value!r})")
    return value


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        kind, "a list of strings"
    )


# -- the adapted model --------------------------------------------------------------------------
def _check_targets(model: Any, name: str, targets: list[str]) -> None:
    """Each LoRA target names a module of this architecture (matched as peft does: the whole name or
    its last dotted parts). GPT-2 has no ``q_proj``/``v_proj``; the error lists the layers it has."""
    modules = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in modules)]
    if missing:
        layers = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if type(m).__name__ in ("Linear", "Conv1D")
            }
        )
        raise ConfigError(
            f"LoRA on {name}: no modules named {', '.join(missing)}; set method_options.lora_targets to "
            f"some of this model's layers: {', '.join(layers)}"
        )


def adapted_copy(backbone: Backbone, options: dict[str, Any]) -> tuple[Any, Backbone]:
    """A peft LoRA model over a structural copy of ``backbone.model`` that shares its weight tensors.

    ``copy.deepcopy`` with every parameter and buffer pre-seeded in the memo duplicates the module
    tree only: the base ``Linear`` layers of the copy hold the very same (frozen) tensors, and
    peft wraps the copy's layers, so the shared backbone keeps computing the base model.
    """
    from peft import LoraConfig, get_peft_model

    source = backbone.model
    _check_targets(source, backbone.name, list(options["lora_targets"]))
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(source.parameters(), source.buffers())}
    clone = copy.deepcopy(source, memo)
    config = LoraConfig(
        r=options["lora_r"],
        lora_alpha=options["lora_alpha"],
        lora_dropout=options["lora_dropout"],
        target_modules=list(options["lora_targets"]),
        bias="none",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing rename
        try:
            peft_model = get_peft_model(clone, config)
        except ValueError as exc:  # a module peft cannot adapt
            raise ConfigError(f"LoRA on {backbone.name}: {exc}") from None
    peft_model.eval()
    adapted = Backbone(peft_model.get_base_model(), backbone.tokenizer, backbone.name, backbone.fingerprint)
    return peft_model, adapted


def named_lora_parameters(peft_model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]


def lora_parameters(peft_model: Any) -> list[torch.nn.Parameter]:
    return [p for _, p in named_lora_parameters(peft_model)]


def lora_tensors(peft_model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


# -- conditioning -------------------------------------------------------------------------------
def check_policy(registry: CategoryRegistry, policy: Policy) -> None:
    """A policy naming a category the method was not trained for is a ``PolicyError``."""
    for name in policy:
        if name not in registry:
            raise PolicyError(registry.unknown_message(name))


def with_system(prompt: Prompt, system: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    return [{"role": "system", "content": system}, *[m for m in prompt if m["role"] != "system"]]


def topics_rewrite(registry: CategoryRegistry, template: str) -> Rewrite:
    """Name the active categories (display names, canonical order) in the system prompt."""

    def rewrite(prompt: str, policy: Policy) -> tuple[Prompt, Policy]:
        if not policy:
            return prompt, Policy(())
        topics = "; ".join(registry[c].display for c in policy)
        return with_system(prompt, template.replace("{topics}", topics)), Policy(())

    return rewrite


# -- the method ---------------------------------------------------------------------------------
class AdapterMethod(ControlledMethod):
    """A LoRA-adapted copy of the backbone, conditioned by a system-prompt rewrite.

    ``model`` is the adapted ``ControlledModel``; ``base`` the untouched one, which serves rows
    with the empty policy when ``empty_to_base`` (the default).
    """

    def __init__(
        self,
        name: str,
        model: ControlledModel,
        base: ControlledModel,
        registry: CategoryRegistry,
        rewrite: Rewrite,
        identity: dict[str, Any],
        trainable: int,
        empty_to_base: bool = True,
    ):
        super().__init__(name, model, registry, rewrite, identity, trainable=trainable)
        self.base = base
        self.empty_to_base = empty_to_base

    def _routes(self, prompts: Sequence[str], policies: Sequence[Policy]) -> tuple[list[int], list[int]]:
        check_rows(prompts, policies)  # the routed rows are picked out into lists: "hi" would be 2 rows
        if len(prompts) != len(policies):
            raise ValueError("prompts and policies must have the same length")
        for policy in policies:
            check_policy(self.registry, policy)
        base = [i for i, p in enumerate(policies) if self.empty_to_base and not p]
        taken = set(base)
        return base, [i for i in range(len(prompts)) if i not in taken]

    def generate(
        self,
        prompts: Sequence[str],
        policies: Sequence[Policy],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        progress: Progress = None,
    ) -> list[str]:
        base, adapted = self._routes(prompts, policies)
        out = [""] * len(prompts)
        kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": progress}
        if base:
            got = self.base.generate([prompts[i] for i in base], [Policy(())] * len(base), **kw)
            for i, text in zip(base, got):
                out[i] = text
        if adapted:
            inputs, ctrl = self._inputs([prompts[i] for i in adapted], [policies[i] for i in adapted])
            for i, text in zip(adapted, self.model.generate(inputs, ctrl, **kw)):
                out[i] = text
        return out

    @torch.no_grad()
    def target_logits(
        self, prompts: Sequence[str], policies: Sequence[Policy], targets: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        base, adapted = self._routes(prompts, policies)
        out: list[torch.Tensor | None] = [None] * len(prompts)
        for rows, model, rewrite in ((base, self.base, False), (adapted, self.model, True)):
            if not rows:
                continue
            if rewrite:
                inputs, ctrl = self._inputs([prompts[i] for i in rows], [policies[i] for i in rows])
            else:
                inputs, ctrl = [prompts[i] for i in rows], [Policy(())] * len(rows)
            batch = model.encode(inputs, ctrl, [targets[i] for i in rows])
            logits = model.logits(batch).float()
            w = batch.window
            for j, i in enumerate(rows):
                out[i] = logits[j, w - 1 - len(targets[i]) : w]
        return [t for t in out if t is not None]

    def prompt_overhead(self, policy: Policy) -> int:
        """Tokens of the conditioning text this method puts in the system turn under ``policy``.

        The system turn replaces the chat template's default one, so this counts the method's own
        text rather than a difference of whole prompts (which can be negative).
        """
        check_policy(self.registry, policy)
        if not policy and self.empty_to_base:
            return 0
        (used,), _ = self._inputs(["Hello"], [policy])
        if isinstance(used, str) or used[0]["role"] != "system":
            return 0
        return len(self.tokenizer(used[0]["content"], add_special_tokens=False)["input_ids"])


# -- training -----------------------------------------------------------------------------------
@dataclass
class Example:
    """One training row: what the adapted model sees, the wanted answer, and (ORPO) the unwanted one."""

    prompt: Prompt
    target: list[int]
    positive: bool
    order: int
    rejected: list[int] | None = None


class AdapterTrainer:
    """Trains a LoRA adapter on the MOSAIC data; subclasses set the conditioning and the loss."""

    name = "adapter"
    schema: dict[str, Option] = LORA_OPTIONS

    def __init__(
        self, config: TrainConfig, backbone: Backbone | None = None, reporter: Reporter | None = None
    ):
        self.config = config
        self.clock = TrainingClock()
        self.report = reporter or (lambda kind, data: None)
        self.options = parse_options(self.name, config.method_options, self.schema)
        if config.init_artifact:
            raise ConfigError(
                f"init_artifact (incremental training) is only supported by mosaic, not {self.name}"
            )
        self.backbone, self.suite, self.categories = load_inputs(config, backbone, self.report)
        full = self.suite.registry
        self.registry = CategoryRegistry(full.name, tuple(full[c] for c in self.categories), full.description)
        self.pools = training_pools(
            self.suite, self.categories, config.data.limit_per_category, config.optim.seed
        )
        self.sampler = order_sampler(config, self.categories, self.pools)
        self.base = ControlledModel(self.backbone)
        self.teacher = BaseResponseCache(
            self.base, cache_root() / "responses", config.teacher.max_new_tokens, config.teacher.batch_size
        )
        self.refusals = {c: self.encode_text(full[c].refusal_text) for c in self.categories}
        self.report(
            "stage",
            {
                "name": f"{self.name}: LoRA r={self.options['lora_r']} on "
                f"{', '.join(self.options['lora_targets'])}"
            },
        )
        self.peft_model, adapted = adapted_copy(self.backbone, self.options)
        self.model = ControlledModel(adapted)
        self.params = lora_parameters(self.peft_model)
        self.optimizer = torch.optim.Adam(self.params, lr=config.optim.lr)

    def encode_text(self, text: str) -> list[int]:
        """A fixed response (refusal template) as target ids, ending with EOS like the trainer's."""
        return response_ids(self.backbone.tokenizer, text)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    # -- hooks for the methods ----------------------------------------------------------------
    def rewrite(self, prompt: str, policy: Policy) -> Prompt:
        raise NotImplementedError

    def secrets(self) -> dict[str, Any] | None:
        return None

    def teacher_prompts(self) -> list[str]:
        """Prompts whose base answer is a target somewhere (negatives; ORPO also rejects them)."""
        return self.sampler.negative_prompts()

    def examples(self, items: list[TrainItem]) -> list[Example]:
        rows = []
        for item in items:
            target = self.refusals[item.category] if item.positive else self.teacher.get(item.prompt)
            rows.append(
                Example(self.rewrite(item.prompt, item.policy), target, item.positive, item.policy.order)
            )
        return rows

    def epoch_batches(self, epoch: int) -> list[list[Example]]:
        return [self.examples(b) for b in self.sampler.epoch_batches(epoch, self.config.optim.batch_size)]

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch(self.config.optim.batch_size)

    def loss(self, batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over rows of the response-token cross-entropy (plain SFT)."""
        enc = self.model.encode(
            [e.prompt for e in batch], [Policy(())] * len(batch), [e.target for e in batch]
        )
        ce = response_cross_entropy(self.model.logits(enc), enc.labels, self.config.optim.first_token_weight)
        pos = [j for j, e in enumerate(batch) if e.positive]
        neg = [j for j, e in enumerate(batch) if not e.positive]
        stats = {
            "loss": float(ce.detach().mean()),
            "ce_pos": float(ce[pos].detach().mean()) if pos else 0.0,
            "ce_neg": float(ce[neg].detach().mean()) if neg else 0.0,
            "kl": 0.0,
        }
        return ce.mean(), stats

    # -- the run ------------------------------------------------------------------------------
    def prepare(self) -> None:
        fill_teacher(self.teacher, self.teacher_prompts(), self.report)

    def budgets(self) -> list[dict[str, int]]:
        return budget_rows(self.sampler)

    def train(self, output: str | Path, resume: bool = False) -> dict[str, Any]:
        """Train into ``output``; ``resume`` continues from its last epoch checkpoint."""
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        budgets = self.budgets()
        self.report("budgets", {"budgets": budgets})
        self.prepare()
        self.clock = TrainingClock()  # ``_resume`` adds the earlier sessions' seconds
        start_epoch, step = self._resume(out) if resume else (0, 0)
        per_epoch = self.steps_per_epoch()
        total = per_epoch * cfg.optim.epochs
        self.report("start", {"total_steps": total, "done_steps": step, "steps_per_epoch": per_epoch})
        first, last = float("nan"), float("nan")  # first: this session's first step
        t0 = time.time()
        self.clock.start()
        self.peft_model.train()  # LoRA dropout, if any; the shared backbone's modules are untouched
        try:
            with open_log(out, step if resume else None, fresh=not resume) as log:
                for epoch in range(start_epoch, cfg.optim.epochs):
                    window: list[dict[str, float]] = []
                    for batch in self.epoch_batches(epoch):
                        loss, stats = self.loss(batch)
                        optimizer_step(loss, self.optimizer, self.params, cfg.optim.grad_clip)
                        step += 1
                        last = stats["loss"]
                        first = last if math.isnan(first) else first
                        window.append(stats)
                        self.report(
                            "step", {"step": step, "epoch": epoch + 1, "order": batch[0].order, **stats}
                        )
                        if step % cfg.log.every == 0 or step == total:
                            log_window(log, step, epoch + 1, window, t0)
                            window = []
                    done = {"epoch": epoch + 1, "steps": step, "seconds": round(self.clock.seconds(), 1)}
                    self.save(out, done)  # usable after every epoch
                    self._checkpoint(out, epoch + 1, step)
                    self.report("epoch", {"epoch": epoch + 1, "step": step})
        finally:
            self.peft_model.eval()
        seconds = self.clock.seconds()
        summary = {
            "steps": step,
            "seconds": round(seconds, 1),
            "first_loss": first,
            "final_loss": last,
            "trainable_parameters": self.trainable,
            "budgets": budgets,
        }
        self.save(out, summary)
        return summary

    # -- checkpoints --------------------------------------------------------------------------
    def _checkpoint(self, out: Path, epoch: int, step: int) -> None:
        ckpt = checkpoint_dir(out, epoch)
        self.save(ckpt, {"epoch": epoch, "steps": step, "seconds": round(self.clock.seconds(), 1)})
        save_optimizer_state(ckpt, self.optimizer, named_lora_parameters(self.peft_model), epoch, step)

    def _resume(self, out: Path) -> tuple[int, int]:
        from peft import set_peft_model_state_dict

        ckpt = latest_checkpoint(out)
        if ckpt is None:
            self.report("stage", {"name": "no checkpoint to resume from; starting fresh"})
            return 0, 0
        manifest, tensors, _ = load_method_artifact(ckpt, self.name, self.backbone.describe())
        training = training_record(ckpt, manifest, required=False)
        check_same_recipe(ckpt, training.get("config", {}), self.config.to_dict())
        check_continuation(ckpt, training, data_hash(self.pools), self.config.optim.epochs)
        self.clock.prior = float(training.get("seconds", 0.0))  # older checkpoints lack it: 0
        set_peft_model_state_dict(self.peft_model, tensors)
        self.restore_secrets(ckpt)
        epoch, step = load_optimizer_state(ckpt, self.optimizer, named_lora_parameters(self.peft_model))
        self.report("stage", {"name": f"resumed from {ckpt.name} (step {step})"})
        return epoch, step

    def restore_secrets(self, ckpt: Path) -> None:
        """Take back what a method drew at random when the checkpoint's run began (magic tokens)."""

    def save(self, out: Path, training: dict[str, Any]) -> Path:
        extra = {
            "training": {
                "config": self.config.to_dict(),
                "data_hash": data_hash(self.pools),
                "suite": self.suite.name,
                **training,
            }
        }
        return save_method_artifact(
            out,
            self.name,
            self.backbone.describe(),
            self.registry,
            lora_tensors(self.peft_model),
            options=self.options,
            extra=extra,
            secrets=self.secrets(),
        )


# -- loading ------------------------------------------------------------------------------------
@dataclass
class LoadedAdapter:
    options: dict[str, Any]
    registry: CategoryRegistry
    model: ControlledModel  # adapted
    base: ControlledModel
    trainable: int
    identity: dict[str, Any]


def load_adapter(artifact: Path, backbone: Backbone, method: str, schema: dict[str, Option]) -> LoadedAdapter:
    """Validate an adapter artifact against ``backbone`` and rebuild the adapted copy."""
    from peft import set_peft_model_state_dict

    manifest, tensors, registry = load_method_artifact(artifact, method, backbone.describe())
    try:
        options = parse_options(method, manifest["options"], schema)
    except ConfigError as exc:
        raise ArtifactError(f"{artifact}: manifest options are not valid: {exc}") from None
    try:
        peft_model, adapted = adapted_copy(backbone, options)
    except ConfigError as exc:
        raise ArtifactError(f"{artifact}: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in lora_tensors(peft_model).items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))[:3]
        odd = sorted(k for k in found if expected.get(k) != found[k])[:3]
        raise ArtifactError(
            f"{artifact}: LoRA tensors do not fit this model and LoRA config (missing {missing}, "
            f"unexpected or misshapen {odd})"
        )
    result = set_peft_model_state_dict(peft_model, tensors)
    if result.unexpected_keys:
        raise ArtifactError(f"{artifact}: LoRA tensors not used by the model: {result.unexpected_keys[:3]}")
    peft_model.eval()
    weights = hashlib.sha256((Path(artifact) / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
    identity = {"method": method, "weights": weights, "options": options}
    return LoadedAdapter(
        options,
        registry,
        ControlledModel(adapted),
        ControlledModel(backbone),
        sum(p.numel() for p in lora_parameters(peft_model)),
        identity,
    )


def shuffled_batches(rows: list[Example], batch_size: int, seed: str) -> list[list[Example]]:
    """Seeded shuffle and chunking of examples that do not come from the order sampler's batches."""
    rng = random.Random(seed)
    rows = list(rows)
    rng.shuffle(rows)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
