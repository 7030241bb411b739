"""``dsa``: Disentangled Safety Adapters (arXiv 2506.00166) over the frozen backbone.

A small side network reads the frozen model's hidden states and never changes them:

- the **guardrail head** scores, per category, whether a prompt belongs to it (a probe on the
  pooled hidden state after ``guard_layer`` decoder layers), computed once per request from the
  prompt's own forward pass;
- the **alignment adapter** turns the final hidden state into refusal-leaning logits through the
  frozen LM head; each step emits ``(1 - alpha) * z_base + alpha * z_adapter``;
- **targeted alignment** sets alpha per request from the guardrail scores of the *active*
  categories only: ``1[s > tau]`` (step) or ``sigmoid((s - tau) / T)`` (smooth), ``s`` the highest
  active score; an empty policy gives alpha = 0, i.e. exactly the base model.

Rows with alpha = 0 never touch the adapter, so their logits are the base model's bit for bit.
Training lives in ``dsa_train``; choices the paper leaves open are documented in docs/methods/dsa.md.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..backbone import Backbone
from ..controlled import (
    ControlledModel,
    EncodedBatch,
    check_rows,
    decoder_layers,
    extend_cache,
    length_batches,
    prefill_cache,
    until_eos,
)
from ..logits import output_logits
from ..policy import CategoryRegistry, Policy
from ..tokens import ArtifactError
from .artifact import WEIGHTS_FILE, load_method_artifact
from .base import Method, MethodError, Progress, digest
from .dsa_net import AlignmentAdapter, DSAOptions, GuardHead, roc_auc

__all__ = ["DSAMethod", "alpha_tradeoff", "compute_overhead", "guardrail_auc", "load", "train"]


class _Stop(Exception):
    """Raised by the guard-layer hook to skip the rest of the network when only the guard is needed."""


def run_backbone(
    backbone: Backbone,
    guard_layer: int,
    *,
    full: bool = True,
    **inputs: Any,
) -> tuple[torch.Tensor, Any]:
    """Run the frozen decoder once; return (hidden state after ``guard_layer`` layers, decoder output).

    With ``full=False`` the forward stops right after the guard layer (the output is ``None``):
    scoring a prompt then costs only the layers the guardrail reads.
    """
    decoder = backbone.model.get_decoder()
    captured: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: Any, output: Any) -> None:
        captured["h"] = output[0] if isinstance(output, tuple) else output
        if not full:
            raise _Stop

    handle = decoder_layers(decoder)[guard_layer - 1].register_forward_hook(hook)
    out = None
    try:
        out = decoder(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"], out


def pool(hidden: torch.Tensor, prompt_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, d) states over the prompt positions -> (B, d): their mean or the last one."""
    mask = prompt_mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * mask).sum(1).float() / mask.sum(1).clamp(min=1).float()
    positions = torch.arange(prompt_mask.shape[1], device=prompt_mask.device)
    last = (positions * prompt_mask.long()).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


class DSAMethod(Method):
    """The frozen backbone plus guardrail head and alignment adapter; alpha per row."""

    name = "dsa"

    def __init__(
        self,
        backbone: Backbone,
        registry: CategoryRegistry,
        categories: Sequence[str],
        options: DSAOptions,
        guard_layer: int,
        threshold: float,
        guard: GuardHead,
        adapter: AlignmentAdapter,
        weights_id: str = "",
    ):
        self.model = ControlledModel(backbone)
        self.registry = registry
        self.categories = tuple(categories)
        self.index = {c: i for i, c in enumerate(self.categories)}
        self.options = options
        self.guard_layer = guard_layer
        self.threshold = float(threshold)
        self.guard = guard.to(backbone.device).eval()
        self.adapter = adapter.to(backbone.device).eval()
        self.weights_id = weights_id
        self.fixed_alpha: float | None = None  # set by with_alpha: one alpha for every row
        self.mode = options.alpha_mode

    # -- views ----------------------------------------------------------------------------------
    def with_alpha(self, alpha: float | None) -> DSAMethod:
        """A view with one fixed alpha for every row (``None``: back to targeted alpha)."""
        if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
            raise MethodError(f"alpha must be in [0, 1], got {alpha!r}")
        view = copy.copy(self)
        view.fixed_alpha = None if alpha is None else float(alpha)
        return view

    def with_mode(self, mode: str) -> DSAMethod:
        """A targeted view using the ``step`` or ``smooth`` alpha rule."""
        if mode not in ("step", "smooth"):
            raise MethodError(f"alpha mode must be 'step' or 'smooth', got {mode!r}")
        view = copy.copy(self)
        view.fixed_alpha, view.mode = None, mode
        return view

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def backbone(self) -> Backbone:
        return self.model.backbone

    def fingerprint(self) -> str:
        return digest(
            self.name,
            self.backbone.output_key,
            self.options.to_dict(),
            self.categories,
            self.threshold,
            self.weights_id,
            self.fixed_alpha,
            self.mode,
        )

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in (*self.guard.parameters(), *self.adapter.parameters()))

    def prompt_overhead(self, policy: Policy) -> int:
        return 0

    # -- guardrail ------------------------------------------------------------------------------
    def _guard_probs(self, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.guard(pool(hidden, prompt_mask, self.options.guard_pool)))

    @torch.no_grad()
    def guard_scores(self, prompts: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """``(N, K)`` probabilities that each prompt belongs to each trained category."""
        rows = []
        for s in range(0, len(prompts), batch_size):
            chunk = list(prompts[s : s + batch_size])
            batch = self.model.encode(chunk, [Policy(())] * len(chunk))
            hidden, _ = run_backbone(
                self.backbone,
                self.guard_layer,
                full=False,
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
            rows.append(self._guard_probs(hidden, batch.attention_mask.bool()).cpu())
        return torch.cat(rows) if rows else torch.zeros(0, len(self.categories))

    def _active(self, policies: Sequence[Policy]) -> torch.Tensor:
        mask = torch.zeros(len(policies), len(self.categories), dtype=torch.bool)
        for i, policy in enumerate(policies):
            for name in policy:
                if name not in self.index:
                    raise MethodError(
                        f"this dsa artifact has no guardrail for category {name!r} "
                        f"(trained: {', '.join(self.categories)})"
                    )
                mask[i, self.index[name]] = True
        return mask

    def alphas(self, probs: torch.Tensor, policies: Sequence[Policy]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: alpha (B,) and the category (B,) the adapter is conditioned on.

        Targeted: ``s`` = the highest guardrail score among the row's active categories; no active
        category means alpha = 0. The adapter is conditioned on the top active category (the top
        category overall when the policy is empty and alpha is fixed).
        """
        active = self._active(policies).to(probs.device)
        masked = probs.masked_fill(~active, -1.0)
        top_active, arg_active = masked.max(-1)
        has = active.any(-1)
        category = torch.where(has, arg_active, probs.argmax(-1))
        if self.fixed_alpha is not None:
            return torch.full_like(top_active, self.fixed_alpha), category
        if self.mode == "step":
            alpha = (top_active > self.threshold).to(probs.dtype)
        else:
            alpha = torch.sigmoid((top_active - self.threshold) / self.options.smooth_temperature)
        return torch.where(has, alpha, torch.zeros_like(alpha)), category

    # -- logits ---------------------------------------------------------------------------------
    def mix(self, hidden: torch.Tensor, alpha: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) * z_base + alpha * z_adapter`` for final hidden states ``(B, ..., d)``.

        Rows with alpha = 0 skip the adapter: their logits are computed exactly as the base model's.
        """
        lm = self.backbone.model
        logits = output_logits(lm, hidden).float()
        rows = torch.nonzero(alpha > 0).flatten()
        if len(rows):
            h = hidden[rows]
            cat = category[rows].view(-1, *([1] * (h.dim() - 2))).expand(h.shape[:-1])
            adapted = output_logits(lm, self.adapter(h, cat).to(hidden.dtype)).float()
            a = alpha[rows].float().view(-1, *([1] * (adapted.dim() - 1)))
            logits[rows] = (1 - a) * logits[rows] + a * adapted
        return logits

    def _prefill(
        self, batch: EncodedBatch, prompt_mask: torch.Tensor, policies: Sequence[Policy], cache: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """One forward over the prompts: (final hidden states, alpha, category, decoder output)."""
        hidden, out = run_backbone(
            self.backbone,
            self.guard_layer,
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        alpha, category = self.alphas(self._guard_probs(hidden, prompt_mask), policies)
        return out.last_hidden_state, alpha.to(hidden.device), category.to(hidden.device), out

    @torch.no_grad()
    def target_logits(
        self, prompts: Sequence[str], policies: Sequence[Policy], targets: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        check_rows(prompts, policies)  # a bare text is no batch: ``list`` below would split it by character
        if not len(prompts) == len(policies) == len(targets):
            raise ValueError("prompts, policies and targets must have the same length")
        batch = self.model.encode(list(prompts), [Policy(())] * len(prompts), targets)
        length = batch.attention_mask.shape[1]
        prompt_mask = batch.attention_mask.bool().clone()
        for i, t in enumerate(targets):
            if len(t):
                prompt_mask[i, length - len(t) :] = False  # the guardrail reads the prompt only
        last, alpha, category, _ = self._prefill(batch, prompt_mask, policies)
        w = batch.window
        logits = self.mix(last[:, length - w :], alpha, category)
        return [logits[i, w - 1 - len(t) : w] for i, t in enumerate(targets)]

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        batch: EncodedBatch,
        policies: Sequence[Policy],
        max_new_tokens: int,
        stop_at_eos: bool = True,
        plain: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with the KV cache: (tokens (B, T), alpha (B,)).

        ``plain=True`` runs the bare base model through the same loop (no guardrail, no adapter):
        the reference of the overhead benchmark. ``stop_at_eos=False`` forces ``max_new_tokens``
        steps, so timings compare equal work.
        """
        from transformers import DynamicCache

        pad = self.tokenizer.pad_token_id
        eos = torch.tensor(self.model.eos_ids, device=self.backbone.device)
        mask, position = batch.attention_mask, batch.position_ids[:, -1:]
        rows = mask.shape[0]
        if plain:
            out = prefill_cache(self.backbone.model.get_decoder(), batch)
            last = out.last_hidden_state
            alpha = torch.zeros(rows, device=mask.device)
            category = torch.zeros(rows, dtype=torch.long, device=mask.device)
        else:
            last, alpha, category, out = self._prefill(batch, mask.bool(), policies, DynamicCache())
        hidden = last[:, -1]
        finished = torch.zeros(rows, dtype=torch.bool, device=mask.device)
        steps: list[torch.Tensor] = []
        decoder = self.backbone.model.get_decoder()
        for step in range(max_new_tokens):
            token = self.mix(hidden, alpha, category).argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            steps.append(token)
            if stop_at_eos:
                finished |= torch.isin(token, eos)
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break
            out, mask, position = extend_cache(decoder, token, mask, position, out.past_key_values)
            hidden = out.last_hidden_state[:, -1]
        tokens = torch.stack(steps, 1) if steps else torch.zeros(rows, 0, dtype=torch.long)
        return tokens, alpha

    def generate_ids(
        self,
        prompts: Sequence[Any],
        policies: Sequence[Policy],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        progress: Progress = None,
    ) -> list[list[int]]:
        check_rows(prompts, policies)  # rows are picked out into lists: a bare text would be its characters
        if len(prompts) != len(policies):
            raise ValueError("prompts and policies must have the same length")
        self._active(policies)  # unknown categories fail before any compute
        lengths = [sum(map(len, self.model.split_prompt(p))) for p in prompts]
        results: list[list[int]] = [[] for _ in prompts]
        for idx in length_batches(lengths, batch_size):
            batch = self.model.encode([prompts[i] for i in idx], [Policy(())] * len(idx))
            if max_new_tokens > 0:
                tokens, _ = self.decode(batch, [policies[i] for i in idx], max_new_tokens)
                for row, i in zip(tokens.tolist(), idx):
                    results[i] = until_eos(row, self.model.eos_ids)
            if progress is not None:
                progress(len(idx))
        return results

    def generate(
        self,
        prompts: Sequence[str],
        policies: Sequence[Policy],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        progress: Progress = None,
    ) -> list[str]:
        ids = self.generate_ids(
            prompts, policies, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "threshold": self.threshold,
            "alpha_mode": self.mode,
            "fixed_alpha": self.fixed_alpha,
            "guard_layer": self.guard_layer,
        }


# -- artifact -----------------------------------------------------------------------------------
def build_modules(
    hidden_size: int, num_categories: int, options: DSAOptions
) -> tuple[GuardHead, AlignmentAdapter]:
    guard = GuardHead(hidden_size, num_categories, options.guard_hidden)
    adapter = AlignmentAdapter(
        hidden_size, num_categories, options.adapter_rank, conditioned=options.condition == "category"
    )
    return guard, adapter


def state_tensors(guard: GuardHead, adapter: AlignmentAdapter) -> dict[str, torch.Tensor]:
    """Everything the artifact stores: guard.* (incl. normalisation buffers) and adapter.*."""
    out = {f"guard.{k}": v for k, v in guard.state_dict().items()}
    out |= {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
    return out


def load_state_tensors(guard: GuardHead, adapter: AlignmentAdapter, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`state_tensors`: put an artifact's guard.* and adapter.* back in place."""
    guard.load_state_dict({k.removeprefix("guard."): v for k, v in tensors.items() if k.startswith("guard.")})
    adapter.load_state_dict(
        {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    )


def load(artifact: Path, backbone: Backbone) -> DSAMethod:
    """Load and validate a ``dsa`` artifact for ``backbone`` (fingerprint, shapes, finiteness)."""
    from ..config import ConfigError

    manifest, tensors, registry = load_method_artifact(artifact, "dsa", backbone.describe())
    raw = dict(manifest["options"])
    try:
        categories = list(raw.pop("categories"))
        guard_layer = int(raw.pop("guard_layer_resolved"))
        options = DSAOptions.parse(raw)
        threshold = float(manifest["threshold"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ArtifactError(f"{artifact}: invalid dsa manifest ({exc})") from exc
    num_layers = len(decoder_layers(backbone.model))
    if not 1 <= guard_layer <= num_layers:
        raise ArtifactError(
            f"{artifact}: guard layer {guard_layer} does not exist in a {num_layers}-layer model"
        )
    for c in categories:
        if c not in registry:
            raise ArtifactError(f"{artifact}: category {c!r} is not in the artifact's registry")
    guard, adapter = build_modules(backbone.hidden_size, len(categories), options)
    expected = state_tensors(guard, adapter)
    bad = [k for k in expected if k not in tensors or tensors[k].shape != expected[k].shape]
    if bad or set(tensors) != set(expected):
        raise ArtifactError(
            f"{artifact}: tensors do not match the dsa options (check {bad or sorted(tensors)})"
        )
    load_state_tensors(guard, adapter, tensors)
    guard.requires_grad_(False)
    adapter.requires_grad_(False)
    weights_id = hashlib.sha256((Path(artifact) / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
    return DSAMethod(
        backbone, registry, categories, options, guard_layer, threshold, guard, adapter, weights_id
    )


RESUMABLE = True  # `mosaic train --resume` continues the adapter from its epoch checkpoints


def train(
    config: Any, output: Path, reporter: Any = None, backbone: Backbone | None = None, resume: bool = False
) -> dict[str, Any]:
    from .dsa_train import train_dsa

    return train_dsa(config, output, reporter=reporter, backbone=backbone, resume=resume)


# -- reports ------------------------------------------------------------------------------------
def guardrail_auc(
    method: DSAMethod, suite: Any, split: str = "test", batch_size: int = 32
) -> dict[str, float]:
    """Per-category ROC-AUC of the guardrail on a split: a category's prompts against every other
    prompt of the split (other categories, neutral, boundary); ``macro`` is their mean."""
    from ..policy import NEUTRAL

    rows = [e for e in suite.split(split) if e.category in method.index or e.category == NEUTRAL]
    probs = method.guard_scores([e.prompt for e in rows], batch_size=batch_size)
    out = {}
    for c, k in method.index.items():
        out[c] = roc_auc(probs[:, k], [e.category == c for e in rows])
    out["macro"] = sum(out.values()) / len(method.index)
    return out


def alpha_tradeoff(
    method: DSAMethod,
    groups: dict[str, list[str]],
    policies: Sequence[Policy],
    judge: Callable[[Sequence[str], Sequence[str]], list[bool]],
    alphas: Sequence[float | str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
    progress: Progress = None,
) -> list[dict[str, Any]]:
    """DSR and OR for each alpha (a number: fixed for every row; ``"step"``/``"smooth"``: targeted).

    Every (policy, group prompt) pair is one row. DSR = refusal rate on rows whose group is an
    active category; OR = refusal rate on the others, also split into inactive categories, neutral
    and boundary prompts.
    """
    prompts, rows, kinds = [], [], []
    for policy in policies:
        for group, items in groups.items():
            kind = "target" if group in policy else "inactive" if group in method.index else group
            for p in items:
                prompts.append(p)
                rows.append(policy)
                kinds.append(kind)
    curve = []
    for alpha in alphas:
        view = method.with_mode(alpha) if isinstance(alpha, str) else method.with_alpha(alpha)
        responses = view.generate(
            prompts, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        )
        refused = judge(prompts, responses)

        def rate(keep: Callable[[str], bool], refused: list[bool] = refused) -> float | None:
            sel = [r for r, k in zip(refused, kinds) if keep(k)]
            return sum(sel) / len(sel) if sel else None

        curve.append(
            {
                "alpha": alpha,
                "dsr": rate(lambda k: k == "target"),
                "or": rate(lambda k: k != "target"),
                "or_inactive": rate(lambda k: k == "inactive"),
                "or_neutral": rate(lambda k: k == "neutral"),
                "or_boundary": rate(lambda k: k == "boundary"),
            }
        )
    return curve


def compute_overhead(method: DSAMethod, prompt_tokens: int = 64) -> dict[str, Any]:
    """Extra compute per generated token vs the base model, from parameter counts.

    FLOPs ~ 2 x multiply-accumulates of the weight matrices a token passes through (attention
    scores ignored, they are the same for both): the base model's decoder plus its LM head; with
    alpha > 0 the adapter adds its MLP and a second LM-head product. The guardrail runs once per
    request on the pooled prompt state (amortised over ``prompt_tokens``).
    """
    model = method.backbone.model
    head = model.get_output_embeddings().weight.numel()
    decoder = sum(p.numel() for n, p in model.get_decoder().named_parameters() if "embed_tokens" not in n)
    adapter = sum(p.numel() for p in method.adapter.parameters())
    guard = sum(p.numel() for p in method.guard.parameters())
    base = 2 * (decoder + head)
    on = 2 * (adapter + head)
    guard_per_token = 2 * guard / prompt_tokens
    return {
        "base_params": sum(p.numel() for p in model.parameters()),
        "dsa_params": adapter + guard,
        "param_ratio": (adapter + guard) / sum(p.numel() for p in model.parameters()),
        "flops_per_token_base": base,
        "flops_per_token_adapter": on,
        "flops_ratio_alpha_on": (base + on) / base,
        "flops_ratio_alpha_off": (base + guard_per_token) / base,
    }
