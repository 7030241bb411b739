"""Prompt heads kept across training steps and epochs.

With ``user_end``, ``assistant`` (or ``system``) placement, a row's prompt up to its control
tokens (the system turn and the request) does not depend on the tokens, so its key/value cache is
the same every time the prompt is drawn. A run draws the same few hundred prompts every epoch, and
on SmolLM2 that prefill is about a quarter of a training step (``bench/step_caches.py``). This
cache runs each prompt's head once, keeps its keys and values (without padding) and its last final
state up to a byte budget, and builds each batch's left-padded :class:`PromptHeads` from them.
Prompts past the budget are recomputed every time, so a large model on a small device only loses
the saving, never fails.

The values equal a fresh prefill's up to float rounding: a head's keys and values at its real
positions do not depend on the padding around it (position ids come from the mask), and padded
positions are masked out of attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..controlled import ControlledModel, Prompt, PromptHeads, prompt_key


class HeadCache:
    """Per-prompt key/value tensors of the prompt heads of one :class:`ControlledModel`."""

    def __init__(self, model: ControlledModel, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("the head cache's byte budget must be >= 0 (0: off)")
        self.model = model
        self.max_bytes = max_bytes
        self.bytes = 0
        # per prompt: keys and values (layers, 2, kv_heads, length, head_dim) and the final hidden
        # state at the head's last token (d,)
        self._entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def heads(self, prompts: Sequence[Prompt]) -> PromptHeads | None:
        """The batch's heads, as ``ControlledModel.prefill_heads`` would return them.

        ``None`` where some row has no head (``prefix`` placement): the caller runs full forwards.
        """
        if self.max_bytes == 0:
            return self.model.prefill_heads(prompts)
        keys = [prompt_key(p) for p in prompts]
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        todo = list(dict.fromkeys(k for k, p in zip(keys, prompts) if k not in self._entries))
        if todo:
            by_key = {k: p for k, p in zip(keys, prompts)}
            computed = self.model.prefill_heads([by_key[k] for k in todo])
            if computed is None:
                return None
            for i, key in enumerate(todo):
                fresh[key] = (_unpadded(computed, i), computed.last_states[i].clone())
                self._store(key, fresh[key])
        self.misses += sum(k in fresh for k in keys)
        self.hits += sum(k not in fresh for k in keys)
        return _assemble([fresh.get(k) or self._entries[k] for k in keys])

    def warm(
        self, prompts: Sequence[Prompt], batch_size: int = 32, progress: Callable[[int], None] | None = None
    ) -> int:
        """Compute the heads of ``prompts`` ahead of training, in batches of similar length.

        A training step pads its few heads to the longest of them; warming runs every head in
        length-sorted batches with little padding, and the base answers for negatives can then be
        generated over these heads (``BaseResponseCache``). Stops once the budget is full, so a
        head is never computed only to be dropped. Returns how many heads it added.
        """
        if self.max_bytes == 0:
            return 0
        by_key = {prompt_key(p): p for p in prompts}
        todo = sorted(
            (k for k in by_key if k not in self._entries), key=lambda k: self._head_length(by_key[k])
        )
        added = 0
        for start in range(0, len(todo), batch_size):
            chunk = [by_key[k] for k in todo[start : start + batch_size]]
            before = len(self._entries)
            if self.heads(chunk) is None or len(self._entries) - before < len(chunk):
                return added + len(self._entries) - before  # no heads (prefix placement) or budget full
            added += len(chunk)
            if progress is not None:
                progress(len(chunk))
        return added

    def _head_length(self, prompt: Prompt) -> int:
        return len(self.model.split_prompt(prompt)[0])

    def _store(self, key: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        if self.bytes + size <= self.max_bytes:
            self._entries[key] = entry
            self.bytes += size


def _unpadded(heads: PromptHeads, row: int) -> torch.Tensor:
    """Row ``row``'s keys and values at its real (right-aligned) positions, one tensor."""
    length = int(heads.lengths[row])
    return torch.stack(
        [torch.stack((k[row, :, -length:], v[row, :, -length:])) for k, v in heads.keys_values]
    ).clone()


def _assemble(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> PromptHeads:
    """Left-pad per-prompt entries into one batch; padded keys and values are zeros (masked)."""
    entries = [entry for entry, _ in pairs]
    first = entries[0]
    layers, _, kv_heads, _, head_dim = first.shape
    lengths = [e.shape[3] for e in entries]
    width = max(lengths)
    out = first.new_zeros(layers, 2, len(entries), kv_heads, width, head_dim)
    mask = torch.zeros(len(entries), width, dtype=torch.long, device=first.device)
    for i, (entry, length) in enumerate(zip(entries, lengths)):
        out[:, :, i, :, width - length :] = entry
        mask[i, width - length :] = 1
    keys_values = [(out[layer, 0], out[layer, 1]) for layer in range(layers)]
    return PromptHeads(keys_values, mask, mask.sum(-1), torch.stack([last for _, last in pairs]))
