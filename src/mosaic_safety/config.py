"""Training recipes: YAML files mapped onto typed dataclasses, with ``key.sub=value`` overrides.

Unknown keys and values of the wrong type are errors (with the key's dotted path), because a typo
in a recipe that silently falls back to a default wastes an hour of training.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.schema import SPLITS
from .policy import REFUSAL_TEMPLATE_RULE, comma_list, usable_refusal_template
from .tokens import INITS, PLACEMENTS


class ConfigError(ValueError):
    """A recipe that cannot be used."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # alias, local dir, .gguf file or hub id
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: str = "auto"  # float32 | bfloat16 | auto (bf16 on CUDA, fp32 on CPU)


@dataclass
class DataConfig:
    suite: str = "minors"  # built-in suite name or a directory with registry.yaml + *.jsonl
    categories: list[str] = field(default_factory=list)  # empty: every category of the suite
    limit_per_category: int = 0  # 0: all training prompts; >0: a seeded sample (quick runs)
    refusal: str = ""  # one refusal template for every category, with {display}; empty: the suite's own


@dataclass
class TokensConfig:
    m: int = 5  # control tokens per category
    init: str = "description"  # description | text | vocab
    placement: str = "prefix"  # prefix | system | user | user_end | assistant
    norm_cap: float = 0.0  # >0: after each step, cap every vector's norm at this × the largest vocab-row norm
    deep: bool = False  # also learn an offset per control token and decoder layer (P-tuning v2 style)


@dataclass
class SamplingConfig:
    max_order: int = 3  # train orders 1..max_order together
    per_subset: int = 100  # positives per subset, n(S) = min(per_subset, cap / C(K, r))
    # per-order positive cap, at least one positive per subset; 0: the order-1 total (K * per_subset),
    # as in the paper (incremental training: the new categories' count * per_subset)
    cap: int = 0
    neg_ratio: float = 1.0  # negatives per positive
    inactive_share: float = 0.5  # share of negatives drawn from categories outside the policy
    boundary_share: float = 0.25  # share of the remaining (neutral) negatives that are boundary items
    paired: bool = False  # each positive also as a negative under a same-order policy without its category
    # share of the inactive-category negatives drawn towards the categories the policy's tokens
    # over-refused after the last epoch (a probe on hard_negatives_per_group training prompts per
    # category, counting openings of select.prefix_tokens refusal tokens); 0: uniform, as in the paper
    hard_negatives: float = 0.0
    # the probe's sample size: part of the recipe (it steers training), unlike select.per_group
    hard_negatives_per_group: int = 20


@dataclass
class TeacherConfig:
    max_new_tokens: int = 32  # length of the base model's own answers used on negatives
    batch_size: int = 32


@dataclass
class OptimConfig:
    lr: float = 1e-2
    epochs: int = 8
    batch_size: int = 8
    kl_weight: float = 1.0  # lambda of CE + lambda * KL(p_base || p_ctrl) on negatives
    first_token_weight: float = 1.0  # weight of the first response token (the refusal decision); 1 = paper
    # >0: train on the first k tokens of every target only (refusal, base answer, refusal path), a
    # cheaper step centred on the refuse-or-answer decision; 0: whole targets (the paper)
    target_tokens: int = 0
    reverse_kl: float = 0.0  # weight of KL(p_ctrl || p_base) along the base answer on negatives
    refusal_path_kl: float = 0.0  # weight of KL(base || controlled) along the refusal template on negatives
    greedy_margin: float = 0.0  # weight of a hinge keeping the base answer greedy on negatives (0: off)
    greedy_margin_value: float = 1.0  # the logit margin that hinge asks for
    deep_lr_scale: float = 1.0  # the deep offsets' learning rate as a multiple of lr (tokens.deep)
    autocast: str = "off"  # off | bfloat16: run the training passes' matrix products in bf16
    grad_clip: float = 1.0  # 0 disables
    block_orthogonality: float = 0.0  # weight of the squared-cosine overlap between category blocks
    # all: a positive's gradient reaches every active category's tokens (the paper); own: only the
    # tokens of the prompt's own category, so a co-active block is never taught to refuse it
    positive_credit: str = "all"
    schedule: str = "constant"  # constant | cosine (decay to 10% of lr over the run) | linear
    warmup_steps: int = 0  # linear warm-up from 0 before the schedule
    # >0: decay of a moving average of the learned tensors, used for validation, checkpoints and
    # the artifact (training/weight_average.py); 0: off, the tensors as the last step left them
    ema: float = 0.0
    seed: int = 0
    cache_mb: int = (
        4096  # size of each step cache (prompt heads, base-model states) kept across steps; 0: off
    )


@dataclass
class SelectConfig:
    mode: str = "last"  # last | per_category: each category's tokens from its best epoch on validation
    per_group: int = 20  # validation prompts per category and neutral, scored after every epoch
    prefix_tokens: int = 4  # refused: greedy decoding opens with this many tokens of the refusal


@dataclass
class LogConfig:
    tensorboard: bool = False
    every: int = 10  # steps between JSONL log lines


@dataclass
class EvalConfig:
    split: str = "test"
    per_category: int = 40  # held-out prompts per category for the closing table; 0: all
    max_new_tokens: int = 16
    batch_size: int = 32


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: str = "runs/mosaic"
    init_artifact: str = ""  # incremental training: start from this artifact, its tokens frozen
    method: str = "mosaic"  # mosaic | lora_sft | orpo | magic_token | dsa (see docs/methods.md)
    method_options: dict[str, Any] = field(default_factory=dict)  # validated by the method itself

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Check every setting; a config built in Python gets the checks a YAML recipe gets."""
        check_types(self)  # first: a value set by hand can be of any type, and the bounds compare it
        for path, value in _numbers(self):  # first: nan fails every bound below with a wrong message
            if not math.isfinite(value):
                raise ConfigError(f"{path} must be a finite number, got {value}")
        checks = [
            (bool(self.model.name.strip()), "model.name must name a model"),
            (self.tokens.m >= 1, "tokens.m must be at least 1"),
            (
                not self.data.refusal or usable_refusal_template(self.data.refusal),
                f"data.refusal {REFUSAL_TEMPLATE_RULE}",
            ),
            (
                self.tokens.placement in PLACEMENTS,
                f"tokens.placement: {' | '.join(PLACEMENTS)}",
            ),
            (
                self.tokens.init in INITS,
                f"tokens.init {self.tokens.init!r}: choose {' | '.join(INITS)}",
            ),
            (self.tokens.norm_cap >= 0, "tokens.norm_cap must be >= 0 (0: off)"),
            (self.data.limit_per_category >= 0, "data.limit_per_category must be >= 0 (0: all)"),
            (self.sampling.cap >= 0, "sampling.cap must be >= 0 (0: the order-1 total)"),
            (self.sampling.max_order >= 1, "sampling.max_order must be at least 1"),
            (self.sampling.per_subset >= 1, "sampling.per_subset must be at least 1"),
            (self.sampling.neg_ratio >= 0, "sampling.neg_ratio must be >= 0"),
            (0 <= self.sampling.inactive_share <= 1, "sampling.inactive_share must be in [0, 1]"),
            (0 <= self.sampling.boundary_share <= 1, "sampling.boundary_share must be in [0, 1]"),
            (0 <= self.sampling.hard_negatives <= 1, "sampling.hard_negatives must be in [0, 1] (0: off)"),
            (
                self.sampling.hard_negatives_per_group >= 1,
                "sampling.hard_negatives_per_group must be at least 1",
            ),
            (
                self.sampling.hard_negatives == 0 or self.method == "mosaic",
                f"sampling.hard_negatives steers negatives by the control tokens' own over-refusal; method "
                f"{self.method!r} has no control tokens (set it to 0)",
            ),
            (
                self.sampling.hard_negatives == 0 or self.sampling.inactive_share > 0,
                "sampling.hard_negatives steers the inactive-category negatives; with "
                "sampling.inactive_share=0 there are none",
            ),
            (self.optim.lr > 0, "optim.lr must be positive"),
            (self.optim.target_tokens >= 0, "optim.target_tokens must be >= 0 (0: whole targets)"),
            (self.optim.epochs >= 1, "optim.epochs must be at least 1"),
            (self.optim.batch_size >= 1, "optim.batch_size must be at least 1"),
            (self.optim.kl_weight >= 0, "optim.kl_weight must be >= 0"),
            (self.optim.first_token_weight > 0, "optim.first_token_weight must be positive"),
            (self.optim.refusal_path_kl >= 0, "optim.refusal_path_kl must be >= 0 (0: off)"),
            (self.optim.reverse_kl >= 0, "optim.reverse_kl must be >= 0 (0: off)"),
            (self.optim.greedy_margin >= 0, "optim.greedy_margin must be >= 0 (0: off)"),
            (self.optim.greedy_margin_value > 0, "optim.greedy_margin_value must be positive"),
            (self.optim.deep_lr_scale > 0, "optim.deep_lr_scale must be positive"),
            (
                self.tokens.deep or self.optim.deep_lr_scale == 1.0,
                "optim.deep_lr_scale scales the deep offsets: it needs tokens.deep=true",
            ),
            (self.optim.autocast in ("off", "bfloat16"), "optim.autocast: off | bfloat16"),
            (  # the comparison methods' loops run in the backbone's dtype: accepting it would be a no-op
                self.optim.autocast == "off" or self.method == "mosaic",
                f"optim.autocast casts the control-token training passes; method {self.method!r} trains in "
                "the backbone's dtype (set model.dtype instead)",
            ),
            (
                self.optim.positive_credit in ("all", "own"),
                f"optim.positive_credit {self.optim.positive_credit!r}: choose all | own",
            ),
            (self.optim.block_orthogonality >= 0, "optim.block_orthogonality must be >= 0"),
            (
                self.optim.schedule in ("constant", "cosine", "linear"),
                f"optim.schedule {self.optim.schedule!r}: choose constant | cosine | linear",
            ),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (0 <= self.optim.ema < 1, "optim.ema must be in [0, 1) (0: off)"),
            (
                self.optim.ema == 0 or self.method == "mosaic",
                f"optim.ema averages the control tokens; method {self.method!r} does not support it",
            ),
            (self.optim.cache_mb >= 0, "optim.cache_mb must be >= 0 (0: off)"),
            (  # torch.manual_seed's range: past it the run died on a traceback after loading the model
                -(2**63) <= self.optim.seed < 2**64,
                f"optim.seed must be from {-(2**63)} to {2**64 - 1}, got {self.optim.seed}",
            ),
            (
                self.select.mode in ("last", "per_category"),
                f"select.mode {self.select.mode!r}: choose last | per_category",
            ),
            (
                self.select.mode == "last" or self.method == "mosaic",
                f"select.mode={self.select.mode} chooses control tokens per category; method "
                f"{self.method!r} ships its last epoch (select.mode=last)",
            ),
            (self.select.per_group >= 1, "select.per_group must be at least 1"),
            (self.select.prefix_tokens >= 1, "select.prefix_tokens must be at least 1"),
            (self.teacher.max_new_tokens >= 1, "teacher.max_new_tokens must be at least 1"),
            (self.teacher.batch_size >= 1, "teacher.batch_size must be at least 1"),
            (self.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0: off)"),
            (self.log.every >= 1, "log.every must be at least 1"),
            (self.eval.split in SPLITS, f"eval.split {self.eval.split!r}: choose {' | '.join(SPLITS)}"),
            (self.eval.per_category >= 0, "eval.per_category must be >= 0 (0: all)"),
            (self.eval.max_new_tokens >= 0, "eval.max_new_tokens must be >= 0 (0: no closing table)"),
            (self.eval.batch_size >= 1, "eval.batch_size must be at least 1"),
            (
                self.method in ("mosaic", "lora_sft", "orpo", "magic_token", "dsa"),
                f"method {self.method!r}: choose mosaic | lora_sft | orpo | magic_token | dsa",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _numbers(config: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float setting under its dotted path (for the finiteness check: YAML reads .inf and .nan)."""
    out: list[tuple[str, float]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _numbers(value, f"{path}.")
        elif isinstance(value, float):
            out.append((path, value))
    return out


def check_types(config: Any, prefix: str = "") -> None:
    """Each setting of the type it is declared with. ``load_config`` converts what YAML reads;
    a ``TrainConfig`` built or changed in Python skips that, and ``epochs = "2"`` failed as a
    ``TypeError`` inside a check, a section given as a dict as an ``AttributeError``."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kind, path = getattr(config, f.name), hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, kind):
                raise ConfigError(f"{path}: expected a {kind.__name__}, got {value!r}")
            check_types(value, f"{path}.")
            continue
        origin = typing.get_origin(kind)
        if origin is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif origin is dict:
            ok = isinstance(value, dict)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            name = "a list of texts" if origin is list else getattr(kind, "__name__", str(kind))
            raise ConfigError(f"{path}: expected {name}, got {value!r}")


def _coerce(value: Any, kind: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(kind, value, path)
    if origin is list:
        if isinstance(value, str):
            items = comma_list(value)
            if items is None:  # an empty list of categories means all of them: a typo must not widen a run
                raise ConfigError(f"{path}: empty item in {value!r}; separate items with single commas")
            value = items
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (inner,) = typing.get_args(kind)
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if kind is str:
        if value is None:  # an empty YAML value (``init_artifact:``): the empty text, not "None"
            return ""
        if not isinstance(value, str):
            # YAML reads 0755 as 493 and off as False: quoted, it stays the text that was meant
            raise ConfigError(f"{path}: expected text, got {value!r}; quote it if it is meant as text")
        try:  # bytes typed in another encoding arrive from the shell as lone surrogates
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{path}: not valid UTF-8 text: {value!r}") from None
        return value
    return value


def _build(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + u for u in unknown)}; known: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _field_kind(parts: list[str]) -> Any:
    """The declared type of the setting at a dotted path (``None`` if there is none)."""
    kind: Any = TrainConfig
    for part in parts:
        if not dataclasses.is_dataclass(kind):
            return None
        kind = typing.get_type_hints(kind).get(part)
    return kind


def _override_value(raw: str, kind: Any) -> Any:
    """A value given on the command line: text settings take it as typed (``#`` and ``: `` are
    part of a refusal, not YAML syntax) unless it is quoted; everything else is read as YAML."""
    text = raw.strip()
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    if kind is str and not quoted:
        return raw
    try:
        return yaml.safe_load(raw) if text else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (values read as YAML, except for text settings)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _override_value(raw, _field_kind(parts))
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's loader keeps the last of two equal keys; in a recipe the first is then silently lost."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, merged by the base class
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a name, got {key!r}")
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"line {line}: {key!r} appears twice in the same section")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: where and what, without PyYAML's quoted excerpt and caret."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return where + " ".join(str(problem).split())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    if isinstance(overrides, str):  # a text iterates by character: "a=b" was read as overrides 'a', '=', 'b'
        raise ConfigError(f"overrides are a list of 'key=value' texts: pass [{overrides!r}]")
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {yaml_problem(exc)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a YAML text file (not UTF-8)") from None
        except OSError as exc:  # a directory, a name too long, no permission
            raise ConfigError(f"{p}: cannot read the config: {exc.strerror or exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a config is a mapping of sections")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    return _build(TrainConfig, data).validate()
