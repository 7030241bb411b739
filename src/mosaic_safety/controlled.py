"""The frozen model with per-row control-token prefixes: forward, generate and stream.

Every row of a batch may carry a different policy. A row is laid out as

    [left padding] [template text before the placement point] [control tokens] [rest of the
    chat-templated prompt] [optional target tokens]

The placement point is the very start (``prefix``), the start of the system turn (``system``), the
start of the last user message (``user``), its end (``user_end``) or the start of the assistant's
turn, after the generation header (``assistant``). Only the last two let the control tokens
themselves attend to the request, which helps small models tell categories apart; with
``assistant`` the last control token is the position that decides the first response token, so the
tokens' own (learned) queries read the request there. The first three keep a policy's prefix
cacheable across requests.

Control tokens are spliced into the embedded sequence with ``masked_scatter``, so gradients flow
to them and nowhere else. Deep tokens also add their per-layer offsets at the same positions while
the prompt runs (:func:`steering`, forward pre-hooks on the decoder layers). Position ids are
derived from the attention mask, so a row's result does not depend on how much padding the rest of
its batch forced on it. With an empty policy a row is exactly the chat-templated prompt, and its
logits are the base model's.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from jinja2 import TemplateError

from .backbone import Backbone
from .logits import output_logits
from .policy import CategoryRegistry, Policy, PolicyError
from .tokens import PLACEMENTS, ControlTokens

Prompt = str | Sequence[dict[str, str]]  # a user message, or a list of chat messages
Generators = torch.Generator | Sequence[torch.Generator] | None  # sampling: one, one per row, or greedy

_SENTINEL = "\u2063MOSAIC\u2063"  # invisible separators: never produced by real prompts


class PlacementError(ValueError):
    """The chat template cannot host control tokens at the requested placement."""


class GenerationError(ValueError):
    """Decoding settings that cannot work (a batch of no rows, a temperature of 0 when sampling)."""


@dataclass
class EncodedBatch:
    """Model inputs for one batch; ``labels`` cover only the last ``window`` logits."""

    inputs_embeds: torch.Tensor  # (B, L, d)
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor | None = None  # (B, window): -100 where no target
    window: int = 1  # logits kept from the end of the sequence
    ctrl_mask: torch.Tensor | None = None  # (B, L): where the control tokens are
    deep: torch.Tensor | None = None  # (layers, control tokens in the batch, d): deep-token offsets

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(-1)


@dataclass
class PromptHeads:
    """The KV cache of each row's prompt up to its control tokens, computed once without gradients.

    With ``user_end``, ``assistant`` or ``system`` placement most of a row (the system turn, the
    request) comes before the control tokens and so does not depend on them. Training runs that
    part once, under ``no_grad``, and back-propagates only through the short tail (tokens, template
    rest, response), and the teacher pass on the same rows reuses it.
    """

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (B, heads, Lh, head_dim)
    mask: torch.Tensor  # (B, Lh), left-padded
    lengths: torch.Tensor  # (B,) real head tokens per row
    # (B, d): the final hidden state at each head's last token. With ``assistant`` placement and an
    # empty policy that position predicts the first response token, and no tail position does.
    last_states: torch.Tensor | None = None

    def rows(self, index: Sequence[int]) -> PromptHeads:
        """The heads of a subset of rows (for the teacher pass on the negatives)."""
        idx = torch.as_tensor(list(index), device=self.mask.device)
        kv = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.keys_values]
        last = self.last_states.index_select(0, idx) if self.last_states is not None else None
        return PromptHeads(kv, self.mask.index_select(0, idx), self.lengths.index_select(0, idx), last)

    def required_last_states(self) -> torch.Tensor:
        """``last_states``, for a row with nothing after its head: only the head's end predicts its next token."""
        if self.last_states is None:
            raise ValueError("these heads carry no last states; a row has nothing after its head")
        return self.last_states


class ControlledModel:
    """A frozen backbone plus control tokens, applying one policy per row."""

    def __init__(
        self,
        backbone: Backbone,
        tokens: ControlTokens | None = None,
        registry: CategoryRegistry | None = None,
        placement: str | None = None,
        prompt_cache_size: int = 4096,
    ):
        self.backbone = backbone
        self.tokens = tokens
        self.registry = registry or (tokens.registry if tokens is not None else None)
        self.placement = placement or (tokens.placement if tokens is not None else "prefix")
        if self.placement not in PLACEMENTS:  # an unknown one would be read as ``system`` below
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if tokens is not None:
            if tokens.hidden_size != backbone.hidden_size:
                raise ValueError(
                    f"control tokens have hidden size {tokens.hidden_size}, the model {backbone.hidden_size}"
                )
            tokens.to(backbone.device)
            layers = len(decoder_layers(backbone.model)) if tokens.deep_layers else 0
            if tokens.deep_layers and tokens.deep_layers != layers - 1:
                raise ValueError(
                    f"deep control tokens for a {tokens.deep_layers + 1}-layer model, "
                    f"but this model has {layers} layers"
                )
        self._split_cache: OrderedDict[tuple[str, str], tuple[list[int], list[int]]] = OrderedDict()
        self._cache_size = prompt_cache_size
        self._cached_template = backbone.tokenizer.chat_template  # the split cache holds its ids
        gen_eos = getattr(backbone.model.generation_config, "eos_token_id", None)
        eos = {backbone.tokenizer.eos_token_id}
        eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
        self.eos_ids = sorted(e for e in eos if e is not None)

    def __repr__(self) -> str:
        categories = list(self.tokens.categories) if self.tokens is not None else []
        deep = bool(self.tokens is not None and self.tokens.deep_layers)
        return (
            f"ControlledModel(backbone={self.backbone.name!r}, categories={categories!r}, "
            f"placement={self.placement!r}, deep={deep})"
        )

    @property
    def model(self) -> Any:
        return self.backbone.model

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def sliding_window(self) -> int | None:
        """The attention window of the model's sliding-window layers; ``None`` where every layer
        attends to the whole sequence."""
        config = self.model.config.get_text_config()
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
            return None
        return int(window)

    def heads_share_exactly(self, span: int) -> bool:
        """Whether decoding over shared heads gives the plain path's values for rows that span
        ``span`` positions, padding included.

        Decoding over shared heads left-pads each row's tail after its head, so a row can have
        padding between its prompt and its control tokens. Where no key ever leaves an attention
        window, that padding is simply masked out. Past the window it can count: on a tiny Gemma 2
        (eager attention) with a 3-token window the first logits moved by 0.3. Training's tails are
        right-padded, so training never has padding inside a row and shares heads whatever the window.
        """
        window = self.sliding_window
        return window is None or span <= window

    def shared_span(self, prompts: Sequence[Prompt], policies: Sequence[Policy], new_tokens: int) -> int:
        """Positions a batch decoded over shared heads spans: the longest head, the longest tail
        (control tokens and the rest of the prompt) and the new tokens."""
        splits = [self.split_prompt(p) for p in prompts]
        tails = [len(rest) + self.block_length(q) for (_, rest), q in zip(splits, policies)]
        return max(len(head) for head, _ in splits) + max(tails) + new_tokens

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def policy(self, names: str | Sequence[str] | Policy | None) -> Policy:
        """A request's policy in the registry's canonical order, the order its blocks compose in:
        a ``Policy`` built by hand in another order, or with a name twice, means the same set."""
        if isinstance(names, Policy):
            names = list(names.categories)
        # a registry names unknown categories as such; without tokens it still has no vectors for them
        policy = self.registry.policy(names) if self.registry is not None else None
        if self.tokens is None and (policy if policy is not None else names):
            raise PolicyError(
                "this model has no control tokens (no artifact); only the empty policy is allowed"
            )
        return policy or Policy(())

    # -- prompt encoding ----------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """The chat-templated prompt text, ending with the assistant generation header."""
        return self.tokenizer.apply_chat_template(
            _messages(prompt), tokenize=False, add_generation_prompt=True
        )

    def split_prompt(self, prompt: Prompt) -> tuple[list[int], list[int]]:
        """Token ids of the templated prompt, split where the control tokens go."""
        if self.tokenizer.chat_template is not self._cached_template:
            # a prompt's ids change with the template, and ``render`` always reads the current one
            self._split_cache.clear()
            self._cached_template = self.tokenizer.chat_template
        key = (prompt_key(prompt), self.placement)
        hit = self._split_cache.get(key)
        if hit is not None:
            self._split_cache.move_to_end(key)
            return hit
        check_text(prompt)
        full = self.render(prompt)
        before = self._text_before_placement(prompt, full)
        encode = self.tokenizer
        ids = encode(full, add_special_tokens=False)["input_ids"]
        head = encode(before, add_special_tokens=False)["input_ids"] if before else []
        # Where a token spans the insertion point (a prompt opening with "\n\n" after the
        # template's "\n"), the tokens go at the last token boundary before it: the prompt's own
        # tokens stay exactly those of the plain template.
        cut = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
        result = (ids[:cut], ids[cut:])
        self._split_cache[key] = result
        if len(self._split_cache) > self._cache_size:
            self._split_cache.popitem(last=False)
        return result

    def _text_before_placement(self, prompt: Prompt, full: str) -> str:
        if self.placement == "prefix":
            return ""
        if self.placement == "assistant":  # the whole templated prompt comes first
            return full
        messages = [dict(m) for m in _messages(prompt)]
        if self.placement in ("user", "user_end"):
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise PlacementError(f"placement {self.placement!r} needs a user message")
            text = messages[users[-1]]["content"]
            messages[users[-1]]["content"] = (
                _SENTINEL + text if self.placement == "user" else text + _SENTINEL
            )
        else:  # system
            if messages[0]["role"] == "system":
                messages[0]["content"] = _SENTINEL + messages[0]["content"]
            else:  # templates that inject a default system prompt: insert before its text
                messages.insert(0, {"role": "system", "content": _SENTINEL})
        if self.placement == "system":
            unusable = (
                "placement 'system': this chat template has no system turn to host the control tokens; "
                "use placement 'prefix', 'user' or 'user_end'"
            )
        else:
            unusable = (
                f"placement {self.placement!r}: this chat template rewrites the user message around "
                "the insertion point, so the control tokens have no place in it; use placement "
                "'prefix' or 'assistant'"
            )
        try:
            marked = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:  # Gemma 2's template raises "System role not supported"
            raise PlacementError(f"{unusable} (the template says: {exc})") from exc
        if _SENTINEL not in marked:  # a template that drops system messages
            raise PlacementError(unusable)
        before = marked[: marked.index(_SENTINEL)]
        if not full.startswith(before):
            # Llama 3's templates trim each message: whitespace ending the user's text stays in
            # front of the marker but not in the real prompt, so the tokens go where the text ends
            before = before.rstrip()
            if not full.startswith(before):
                raise PlacementError(unusable)
        return before

    def encode(
        self,
        prompts: Sequence[Prompt],
        policies: Sequence[Policy],
        targets: Sequence[Sequence[int]] | None = None,
        credit: Sequence[str | None] | None = None,
    ) -> EncodedBatch:
        """Left-padded embeddings with the control tokens of each row's policy spliced in.

        ``credit`` names, per row, the one category whose tokens get that row's gradient (None: all).
        """
        check_rows(prompts, policies)
        if len(prompts) != len(policies) or (targets is not None and len(targets) != len(prompts)):
            raise ValueError("prompts, policies and targets must have the same length")
        credit = _row_credit(credit, len(prompts))
        if not prompts:
            raise ValueError("cannot encode an empty batch")
        rows, ctrl_spans, blocks, offsets = [], [], [], []
        for i, (prompt, policy) in enumerate(zip(prompts, policies)):
            head, tail = self.split_prompt(prompt)
            policy = self.policy(policy)  # canonical: its blocks and deep offsets compose alike
            block = self._block(policy, credit[i])
            target = list(targets[i]) if targets is not None else []
            rows.append(head + [0] * block.shape[0] + tail + target)
            ctrl_spans.append((len(head), block.shape[0]))
            if block.shape[0]:
                blocks.append(block)
                offsets.append(self.tokens.compose_deep(policy, credit[i]))
        length = max(len(r) for r in rows)
        batch = len(rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((batch, length), pad, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.long)
        ctrl_mask = torch.zeros(batch, length, dtype=torch.bool)
        window = 1 + (max(len(t) for t in targets) if targets is not None else 0)
        labels = torch.full((batch, length + 1), -100, dtype=torch.long) if targets is not None else None
        for i, row in enumerate(rows):
            offset = length - len(row)
            ids[i, offset:] = torch.tensor(row)
            mask[i, offset:] = 1
            start, n = ctrl_spans[i]
            ctrl_mask[i, offset + start : offset + start + n] = True
            if labels is not None and len(targets[i]):
                labels[i, length - len(targets[i]) : length] = torch.tensor(list(targets[i]))
        ids, mask, ctrl_mask = ids.to(self.device), mask.to(self.device), ctrl_mask.to(self.device)
        embeds = self._embed(ids, ctrl_mask, blocks)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if labels is not None:
            # logits at window index j (sequence position L-window+j) predict position L-window+j+1
            labels = labels[:, length - window + 1 : length + 1].to(self.device)
        deep = _cat_offsets(offsets)
        return EncodedBatch(
            embeds, mask, position_ids, labels, window, ctrl_mask if deep is not None else None, deep
        )

    def _embed(self, ids: torch.Tensor, ctrl_mask: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the control vectors spliced in where ``ctrl_mask`` is set, row by row.

        ``masked_scatter`` keeps the graph to the control tokens, so gradients reach them and nothing else.
        """
        embeds = self.model.get_input_embeddings()(ids)
        if not blocks:
            return embeds
        return embeds.masked_scatter(ctrl_mask.unsqueeze(-1), torch.cat(blocks).to(embeds.dtype))

    @property
    def context_length(self) -> int | None:
        """Positions the backbone was built for (``max_position_embeddings``), where it says."""
        n = getattr(self.backbone.model.config, "max_position_embeddings", None)
        return n if isinstance(n, int) and n > 0 else None

    def check_fits(self, positions: int, max_new_tokens: int) -> None:
        """A prompt and its answer must fit the model's window: past it, learned positions crash
        mid-batch (every row of the batch fails) and rotary ones decode garbage without a word."""
        limit = self.context_length
        if limit is not None and positions + max_new_tokens > limit:
            raise GenerationError(
                f"the prompt takes {positions} positions (control tokens included) and up to "
                f"{max_new_tokens} new tokens were asked for: {positions + max_new_tokens} exceeds "
                f"the model's context window of {limit}"
            )

    def block_length(self, policy: Policy) -> int:
        """Control positions ``policy`` adds to a prompt (its block checked like any other)."""
        return int(self._block(self.policy(policy)).shape[0])

    def _block(self, policy: Policy, credit: str | None = None) -> torch.Tensor:
        """The control vectors of a policy its caller has put in canonical order (``policy``)."""
        if not policy:
            return torch.zeros(0, self.backbone.hidden_size, device=self.device)
        return self.tokens.compose(policy, credit)

    # -- forward ------------------------------------------------------------------------------
    def logits(self, batch: EncodedBatch, window: int | None = None) -> torch.Tensor:
        """Logits of the last ``window`` positions (all positions with ``window=0``)."""
        return head_logits(self.model, self.decoder_output(batch), batch.window if window is None else window)

    # -- response logits (training) ------------------------------------------------------------
    @torch.no_grad()
    def prefill_heads(self, prompts: Sequence[Prompt]) -> PromptHeads | None:
        """Run every row's prompt up to its control tokens once; ``None`` if some row has no head.

        With ``prefix`` placement (or a template that puts nothing before the tokens) there is
        nothing to share and callers fall back to the full forward.
        """
        heads = [self.split_prompt(p)[0] for p in prompts]
        if not heads or not all(heads):
            return None
        from transformers import DynamicCache

        length = max(map(len, heads))
        ids = torch.full((len(heads), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(heads), length, dtype=torch.long)
        for i, head in enumerate(heads):
            ids[i, length - len(head) :] = torch.tensor(head)
            mask[i, length - len(head) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model.get_decoder()(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            past_key_values=DynamicCache(),
            use_cache=True,
        )
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return PromptHeads(kv, mask, mask.sum(-1), out.last_hidden_state[:, -1])

    def response_logits(
        self,
        prompts: Sequence[Prompt],
        policies: Sequence[Policy],
        targets: Sequence[Sequence[int]],
        heads: PromptHeads | None = None,
        credit: Sequence[str | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits predicting each target token, aligned at the response start: ``(B, T, V)``, ``(B, T)``.

        Index ``j`` of a row is the logit that predicts its ``j``-th target token (labels are -100
        past a row's target). With ``heads`` (from :meth:`prefill_heads` on the same prompts) only
        the part from the control tokens on is run with gradients; the values equal the full
        forward's up to float rounding.

        The LM head runs on the aligned final hidden states only, as one matrix product over a
        contiguous ``(B * T, d)`` block: on a strided slice of the sequence torch falls back to a
        batched product at less than half the speed on CPU, and gathering aligned rows from
        full logits moves 49,152 floats per position instead of ``d``.
        """
        states, labels = self.response_states(prompts, policies, targets, heads, credit)
        return self.states_to_logits(states), labels

    def response_states(
        self,
        prompts: Sequence[Prompt],
        policies: Sequence[Policy],
        targets: Sequence[Sequence[int]],
        heads: PromptHeads | None = None,
        credit: Sequence[str | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`response_logits`, but the final hidden states ``(B, T, d)`` that the LM head maps
        to those logits (:meth:`states_to_logits`). A d-vector is far smaller than a vocabulary row,
        so training keeps the frozen model's states along fixed targets instead of its logits.
        """
        if not targets or any(len(t) == 0 for t in targets):
            raise ValueError("every row needs at least one target token")
        width = max(len(t) for t in targets)
        if heads is None:
            batch = self.encode(prompts, policies, targets, credit)
            hidden = self._hidden(batch)
            starts = [batch.window - 1 - len(t) for t in targets]  # end-aligned rows
        else:
            hidden, starts = self._tail_states(prompts, policies, targets, heads, credit)
        index = torch.tensor([[s + j for j in range(width)] for s in starts], device=hidden.device)
        index = index.clamp(max=hidden.shape[1] - 1)
        aligned = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        labels = torch.full((len(targets), width), -100, dtype=torch.long)
        for i, t in enumerate(targets):
            labels[i, : len(t)] = torch.tensor(list(t))
        return aligned, labels.to(self.device)

    def states_to_logits(self, states: torch.Tensor) -> torch.Tensor:
        """The LM head applied to final hidden states (from :meth:`response_states`)."""
        return output_logits(self.model, states)

    def _hidden(self, batch: EncodedBatch) -> torch.Tensor:
        """Final hidden states of the last ``batch.window`` positions (what :meth:`logits` maps)."""
        return self.decoder_output(batch).last_hidden_state[:, -batch.window :]

    def decoder_output(self, batch: EncodedBatch, **kwargs: Any) -> Any:
        """The decoder (no LM head) over an encoded batch, deep offsets applied; ``kwargs`` go to the
        decoder (``output_hidden_states=True`` for every layer's states, as diagnostics read them)."""
        with steering(self.model, batch.ctrl_mask, batch.deep):
            return self.model.get_decoder()(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                **kwargs,
            )

    def _tail_batch(
        self,
        prompts: Sequence[Prompt],
        policies: Sequence[Policy],
        targets: Sequence[Sequence[int]] | None = None,
        left_pad: bool = False,
        credit: Sequence[str | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, list[int]]:
        """The rows' tails ``[control tokens][rest of the template][target]``, to run over their heads.

        Right-padded for teacher forcing (every row's target starts at a known index), left-padded
        for decoding (every row ends in the last column). Returns the embeddings with the control
        vectors spliced in, the mask, where the control tokens are, the deep offsets and each
        row's tail length.
        """
        rows, spans, blocks, offsets = [], [], [], []
        credit = _row_credit(credit, len(prompts))
        for i, (prompt, policy) in enumerate(zip(prompts, policies)):
            policy = self.policy(policy)  # canonical: its blocks and deep offsets compose alike
            block = self._block(policy, credit[i])
            target = list(targets[i]) if targets is not None else []
            rows.append([0] * block.shape[0] + self.split_prompt(prompt)[1] + target)
            spans.append(block.shape[0])
            if block.shape[0]:
                blocks.append(block)
                offsets.append(self.tokens.compose_deep(policy, credit[i]))
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        ctrl = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            start = length - len(row) if left_pad else 0
            ids[i, start : start + len(row)] = torch.tensor(row)
            mask[i, start : start + len(row)] = 1
            ctrl[i, start : start + spans[i]] = True
        ids, mask, ctrl = ids.to(self.device), mask.to(self.device), ctrl.to(self.device)
        return self._embed(ids, ctrl, blocks), mask, ctrl, _cat_offsets(offsets), [len(r) for r in rows]

    def _tail_states(
        self,
        prompts: Sequence[Prompt],
        policies: Sequence[Policy],
        targets: Sequence[Sequence[int]],
        heads: PromptHeads,
        credit: Sequence[str | None] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Right-padded tails ``[control tokens][template rest][target]`` over the cached heads.

        Returns the final hidden states from the first position that predicts a target token on,
        and each row's start in them.
        """
        from transformers import DynamicCache

        if heads.mask.shape[0] != len(prompts):
            raise ValueError("heads were computed for a different number of rows")
        embeds, mask, ctrl, deep, lengths = self._tail_batch(prompts, policies, targets, credit=credit)
        starts = [n - len(t) - 1 for n, t in zip(lengths, targets)]  # the position that predicts target[0]
        with steering(self.model, ctrl, deep):
            out = self.model.get_decoder()(
                inputs_embeds=embeds,
                attention_mask=torch.cat([heads.mask, mask], dim=1),
                position_ids=heads.lengths.unsqueeze(1) + torch.arange(mask.shape[1], device=self.device),
                past_key_values=DynamicCache(heads.keys_values),
                use_cache=True,
            )
        hidden = out.last_hidden_state
        if min(starts) < 0:  # a row whose tail is only its target: target[0] is predicted by the head's end
            last_states = heads.required_last_states()
            hidden = torch.cat([last_states.unsqueeze(1).to(hidden.dtype), hidden], dim=1)
            starts = [s + 1 for s in starts]
        first = min(starts)
        return hidden[:, first:], [s - first for s in starts]

    def forward(self, prompts: Sequence[Prompt], policies: Sequence[Any]) -> torch.Tensor:
        """Full-sequence logits ``(B, L, V)`` (left-padded) for prompts under per-row policies."""
        check_rows(prompts, policies)
        batch = self.encode(prompts, [self.policy(p) for p in policies])
        return self.logits(batch, window=0)

    def next_token_logits(self, prompts: Sequence[Prompt], policies: Sequence[Any]) -> torch.Tensor:
        """Logits of the first response token ``(B, V)``: cheap input to margins and probes."""
        check_rows(prompts, policies)
        batch = self.encode(prompts, [self.policy(p) for p in policies])
        return self.logits(batch, window=1)[:, -1]

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode_steps(
        self,
        batch: EncodedBatch,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: Generators = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, step by step, reusing the KV cache.

        Finished rows (after EOS) yield the pad id. Stops when all rows finished or the budget ends.
        """
        if max_new_tokens < 1:
            return
        out = prefill_logits(self.model, batch)
        yield from self._decode(
            out,
            batch.attention_mask,
            batch.position_ids[:, -1:],
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            generator,
        )

    @torch.no_grad()
    def decode_steps_over_heads(
        self,
        prompts: Sequence[Prompt],
        policies: Sequence[Policy],
        heads: PromptHeads,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: Generators = None,
    ) -> Iterator[torch.Tensor]:
        """:meth:`decode_steps` for rows whose prompt heads are already computed (``heads.rows``).

        Several policies over one prompt share its head, so an evaluation that asks every policy
        about the same prompts runs each request once instead of once per policy. Each row's tail
        (control tokens, rest of the template) is left-padded after its head; the padding between
        the two is masked and position ids continue from the head, so a row's tokens are those of
        :meth:`decode_steps` up to float rounding.

        A row with an empty tail (the empty policy with ``assistant`` placement) decodes its first
        token from the head's stored last state (``heads.last_states``).
        """
        if max_new_tokens < 1:
            return
        from transformers import DynamicCache

        embeds, mask, ctrl, deep, lengths = self._tail_batch(prompts, policies, left_pad=True)
        full_mask = torch.cat([heads.mask, mask], dim=1)
        cache = DynamicCache(heads.keys_values)
        logits = None
        if mask.shape[1]:
            with steering(self.model, ctrl, deep):
                out = self.model.get_decoder()(
                    inputs_embeds=embeds,
                    attention_mask=full_mask,
                    position_ids=heads.lengths.unsqueeze(1) + (mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache,
                    use_cache=True,
                )
            logits, cache = head_logits(self.model, out, 1), out.past_key_values
        # each row's last position so far: the end of its tail, or of its head where the tail is empty
        last = heads.lengths + torch.tensor(lengths, device=self.device) - 1
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            from_head = self.states_to_logits(heads.required_last_states()[empty]).unsqueeze(1)
            if logits is None:
                logits = from_head
            else:
                logits[empty] = from_head.to(logits.dtype)
        first = SimpleNamespace(logits=logits, past_key_values=cache)
        yield from self._decode(
            first, full_mask, last.unsqueeze(1), max_new_tokens, do_sample, temperature, top_p, generator
        )

    def _decode(
        self,
        out: Any,
        mask: torch.Tensor,
        position: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
        generator: Generators,
    ) -> Iterator[torch.Tensor]:
        """The decoding loop after a prefill whose last logits are in ``out``."""
        eos = torch.tensor(self.eos_ids, device=self.device)
        pad = self.tokenizer.pad_token_id
        finished = torch.zeros(mask.shape[0], dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            token = pick_token(out.logits[:, -1].float(), do_sample, temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            yield token
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                return
            out, mask, position = extend_cache(self.model, token, mask, position, out.past_key_values)

    def generate_ids(
        self,
        prompts: Sequence[Prompt],
        policies: Sequence[Any],
        max_new_tokens: int = 64,
        batch_size: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        progress: Any = None,
        share_heads: bool = True,
        keep_eos: bool = False,
    ) -> list[list[int]]:
        """Generated token ids per prompt (the stop token only with ``keep_eos``: which of several
        EOS ids ended a row is part of a training target). Batches are formed from similar lengths.

        A batch that asks about one prompt under several policies runs that prompt's head once
        (:meth:`decode_steps_over_heads`) unless ``share_heads`` is off or the batch would reach
        past a sliding window (:meth:`heads_share_exactly`); batches of distinct prompts take the
        plain path.
        """
        check_rows(prompts, policies)
        if len(prompts) != len(policies):
            raise ValueError("prompts and policies must have the same length")
        check_decoding(max_new_tokens, do_sample, temperature, top_p, batch_size)
        resolved = [self.policy(p) for p in policies]
        keys = [prompt_key(p) for p in prompts]
        lengths = [
            sum(map(len, self.split_prompt(p))) + self.block_length(q) for p, q in zip(prompts, resolved)
        ]
        if lengths:
            self.check_fits(max(lengths), max_new_tokens)
        # one generator per row, seeded by its place in the input: a row's sample does not depend on
        # the batch size or on which rows it is batched with
        first_seed = 0 if seed is None else seed
        row_generators = (
            [torch.Generator(device=self.device).manual_seed(first_seed + i) for i in range(len(prompts))]
            if do_sample
            else None
        )
        results: list[list[int]] = [[] for _ in prompts]
        for idx in length_batches(lengths, batch_size, keys):
            generators = [row_generators[i] for i in idx] if row_generators is not None else None
            options = (max_new_tokens, do_sample, temperature, top_p, generators)
            distinct = list(dict.fromkeys(keys[i] for i in idx))
            heads = None
            if (
                share_heads
                and len(distinct) < len(idx)
                and self.heads_share_exactly(
                    self.shared_span([prompts[i] for i in idx], [resolved[i] for i in idx], max_new_tokens)
                )
            ):
                first: dict[str, int] = {}
                for i in idx:
                    first.setdefault(keys[i], i)
                heads = self.prefill_heads([prompts[first[k]] for k in distinct])
            if heads is not None:
                where = {k: j for j, k in enumerate(distinct)}
                rows = heads.rows([where[keys[i]] for i in idx])
                steps = list(
                    self.decode_steps_over_heads(
                        [prompts[i] for i in idx], [resolved[i] for i in idx], rows, *options
                    )
                )
            else:
                batch = self.encode([prompts[i] for i in idx], [resolved[i] for i in idx])
                steps = list(self.decode_steps(batch, *options))
            if steps:
                tokens = torch.stack(steps, dim=1).tolist()
                for row, i in zip(tokens, idx):
                    results[i] = until_eos(row, self.eos_ids, keep=keep_eos)
            if progress is not None:
                progress(len(idx))
        return results

    def generate(self, prompts: Sequence[Prompt], policies: Sequence[Any], **kwargs: Any) -> list[str]:
        """Generated text per prompt; see ``generate_ids`` for the options."""
        ids = self.generate_ids(prompts, policies, **kwargs)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    def stream(
        self,
        prompt: Prompt,
        policy: Any = None,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield text pieces of one response as they are produced (same tokens as ``generate``).

        A piece that ends inside a character (an incomplete UTF-8 sequence decodes to U+FFFD) waits
        for the next token; whatever is still held back when decoding ends is yielded then, so the
        pieces join to what ``generate`` returns.
        """
        check_decoding(max_new_tokens, do_sample, temperature, top_p)
        resolved = self.policy(policy)
        self.check_fits(
            sum(map(len, self.split_prompt(prompt))) + self.block_length(resolved), max_new_tokens
        )
        batch = self.encode([prompt], [resolved])
        generator = torch.Generator(device=self.device).manual_seed(seed or 0) if do_sample else None
        produced: list[int] = []
        emitted = ""
        for token in self.decode_steps(batch, max_new_tokens, do_sample, temperature, top_p, generator):
            tok = int(token[0])
            if tok in self.eos_ids:
                break
            produced.append(tok)
            text = self.tokenizer.decode(produced, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            if len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
        text = self.tokenizer.decode(produced, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted) :]


def check_rows(prompts: Any, policies: Any) -> None:
    """Batch calls take a list of prompts and a list of policies, one of each per row. A bare text
    or ``Policy`` iterates too, by character or by category (``generate("hi", ["", ""])`` answered
    "h" and "i"), so it is refused instead of read as several rows."""
    for value, what in ((prompts, "prompts"), (policies, "policies")):
        if isinstance(value, (str, Policy, Mapping)):
            raise TypeError(
                f"{what} must be a list with one entry per row, got a single {type(value).__name__}: "
                f"for one row pass [{value!r}]"
            )


def check_decoding(
    max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, batch_size: int = 1
) -> None:
    """Decoding settings that would crash deep in a batch or silently return nothing."""
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if batch_size < 1:
        raise GenerationError(f"batch size must be at least 1, got {batch_size}")
    if do_sample and not 0 < temperature < math.inf:
        raise GenerationError(
            f"sampling needs a finite temperature above 0, got {temperature} (greedy: no sampling)"
        )
    if do_sample and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


def check_text(prompt: Prompt) -> None:
    """Text the tokenizer can take: bytes that were not UTF-8 (a terminal in Latin-1, a file read
    with surrogate escapes) arrive as lone surrogates, which it rejects with a TypeError."""
    for text in [prompt] if isinstance(prompt, str) else [m.get("content", "") for m in prompt]:
        try:
            str(text).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = _shown_surrogates(text[exc.start : exc.end])
            raise GenerationError(
                f"the prompt is not valid UTF-8 text: {bad!r} at character {exc.start} "
                f"(in {text[max(0, exc.start - 20) : exc.start]!r}...)"
            ) from None


def _shown_surrogates(text: str) -> bytes:
    """Lone surrogates as a user can read them: the bytes a surrogate escape stands for (``b'\\xe9'``
    from a Latin-1 terminal), else their escapes: a JSON ``"\\ud83d"`` (half an emoji) is no
    escaped byte, and encoding it back raised from inside the error message."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def prompt_key(prompt: Prompt) -> str:
    """A prompt's identity in caches and batching. Text and message lists live apart (``t:`` and
    ``m:``): a user who types what a message list's repr looks like asks something else."""
    if isinstance(prompt, str):
        return "t:" + prompt
    return "m:" + json.dumps([dict(m) for m in _messages(prompt)], sort_keys=True, ensure_ascii=False)


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat messages, checked: the chat template renders a missing role or a
    non-text content as empty or as ``None`` without a word, and the placements index them."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (Mapping, bytes)) or not isinstance(prompt, Sequence):
        raise TypeError(
            f"a prompt is a text or a list of chat messages, got {type(prompt).__name__} {prompt!r}"
            + (
                "; a list of messages is one prompt: wrap it in a list for a batch"
                if isinstance(prompt, Mapping)
                else ""
            )
        )
    messages = list(prompt)
    if not messages:
        raise ValueError("a prompt needs at least one message")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise TypeError(
                f"message {i} of a prompt must be a mapping with a 'role' and a 'content' text, got {m!r}"
            )
    return messages


# -- decoding pieces shared with serving/engine.py and methods/dsa.py -----------------------------
def length_batches(
    lengths: Sequence[int], batch_size: int, keys: Sequence[str] | None = None
) -> Iterator[list[int]]:
    """Row indices in batches of similar length, shortest first: little padding per batch.

    With ``keys`` (the rows' prompts), rows of one length are grouped by prompt, so that the
    policies asked about one prompt land in one batch and can share its head.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], keys[i] if keys is not None else ""))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def prefill_cache(module: Any, batch: EncodedBatch, **kwargs: Any) -> Any:
    """The first decoding forward: the whole prompt through ``module`` into a fresh KV cache.

    ``module`` is the bare decoder (hidden states; :func:`prefill_logits` adds the last logits) or
    the causal LM.
    """
    from transformers import DynamicCache

    with steering(module, batch.ctrl_mask, batch.deep):
        return module(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            past_key_values=DynamicCache(),
            use_cache=True,
            **kwargs,
        )


def head_logits(lm: Any, decoder_out: Any, window: int = 1) -> torch.Tensor:
    """The LM head of ``lm`` over the last ``window`` positions of a decoder output (0: all).

    The head runs on a contiguous copy of those states. The model's own ``logits_to_keep`` applies
    it to a strided slice, which torch on CPU runs as a batched product over a copy of the head's
    weight for every row: in bf16 that copy took 4.7 s of a 7.5 s, 48-row generation of SmolLM2.
    """
    states = decoder_out.last_hidden_state
    return output_logits(lm, (states[:, -window:] if window else states).contiguous())


def prefill_logits(lm: Any, batch: EncodedBatch) -> SimpleNamespace:
    """The first decoding forward of the causal LM ``lm``: its KV cache and last-position logits."""
    out = prefill_cache(lm.get_decoder(), batch)
    return SimpleNamespace(logits=head_logits(lm, out, 1), past_key_values=out.past_key_values)


def decoder_layers(module: Any) -> Any:
    """The decoder layers of a causal LM or of its bare decoder (``layers``; GPT-2 style ``h``)."""
    decoder = module.get_decoder() if hasattr(module, "get_decoder") else module
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"{type(module).__name__}: no decoder layers found for deep control tokens")
    return layers


@contextmanager
def steering(module: Any, ctrl_mask: torch.Tensor | None, deep: torch.Tensor | None) -> Iterator[None]:
    """While a prompt runs through ``module``, add deep-token offsets at the control positions.

    Layer ``l + 1`` receives ``deep[l]`` added to the hidden states where ``ctrl_mask`` is set, in
    the row-major order of ``masked_scatter`` (the order the control vectors were spliced in).
    Decoding steps after the prefill carry no control positions and run without the hooks.
    """
    if deep is None or ctrl_mask is None:
        yield
        return
    where = ctrl_mask.unsqueeze(-1)

    def hook_for(offsets: torch.Tensor) -> Any:
        def add(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[:2] != ctrl_mask.shape:
                raise RuntimeError(
                    "deep control tokens: the steered forward saw an unexpected sequence shape"
                )
            hidden = hidden + torch.zeros_like(hidden).masked_scatter(where, offsets.to(hidden.dtype))
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return add

    layers = decoder_layers(module)
    handles = [
        layer.register_forward_pre_hook(hook_for(deep[i]), with_kwargs=True)
        for i, layer in enumerate(layers[1 : deep.shape[0] + 1])
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _row_credit(credit: Sequence[str | None] | None, rows: int) -> Sequence[str | None]:
    """Per-row credit (see :meth:`ControlledModel.encode`), checked against the batch size."""
    if credit is None:
        return [None] * rows
    if len(credit) != rows:
        raise ValueError(f"credit has {len(credit)} entries for {rows} rows")
    return credit


def _cat_offsets(offsets: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The batch's deep offsets, rows concatenated like their control vectors (``None`` if not deep)."""
    present = [o for o in offsets if o is not None]
    return torch.cat(present, dim=1) if present else None


def extend_cache(
    module: Any, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, past_key_values: Any
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One decoding step: feed each row's new ``token`` (B,) through ``module`` with the KV cache.

    Returns the output and the grown attention mask and position ids (B, 1) for the next step.
    """
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    position = position + 1
    out = module(
        input_ids=token[:, None],
        attention_mask=mask,
        position_ids=position,
        past_key_values=past_key_values,
        use_cache=True,
    )
    return out, mask, position


def until_eos(row: list[int], eos_ids: list[int], keep: bool = False) -> list[int]:
    """A generated row cut before its first EOS, or after it with ``keep`` (finished rows are
    padded after it)."""
    for j, tok in enumerate(row):
        if tok in eos_ids:
            return row[: j + 1] if keep else row[:j]
    return row


def pick_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: Generators
) -> torch.Tensor:
    """Next token per row from ``(B, V)`` logits: argmax, or a temperature / top-p sample (drawn
    from one generator, or from each row's own when ``generator`` is a list of them)."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError("temperature must be positive when sampling")
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        keep[..., 0] = True  # the likeliest token always: a top_p that rounds to 0 leaves nothing
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        return torch.cat(
            [torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generator)]
        ).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
