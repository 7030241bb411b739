"""The frozen model's final hidden states along fixed targets, kept across training steps.

On a negative the loss needs the base model's next-token distributions along the base model's own
answer (the paper's KL) and, with ``optim.refusal_path_kl``, along a refusal template. Neither
depends on the control tokens, so the same (prompt, target) pair gives the same distributions every
epoch. Whole logits rows are too large to keep (49,152 floats per position on SmolLM2); the final
hidden state they come from is a d-vector (576 floats), so this cache keeps those and applies the
LM head when a batch needs them. A cached pair costs one matrix product instead of a forward pass
through every layer. Pairs past the byte budget are recomputed each time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..controlled import ControlledModel, Prompt, PromptHeads, prompt_key
from ..policy import Policy


class BaseStates:
    """Per (prompt, target) final hidden states of the frozen model, up to ``max_bytes``."""

    def __init__(self, model: ControlledModel, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("the base-state cache's byte budget must be >= 0 (0: off)")
        self.model = model
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}  # (len(target), d)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @torch.no_grad()
    def logits(
        self, prompts: Sequence[Prompt], targets: Sequence[Sequence[int]], heads: PromptHeads | None = None
    ) -> torch.Tensor:
        """The base model's logits along each row's target, ``(B, T, V)`` aligned like
        ``ControlledModel.response_logits``; positions past a row's target are zeros (never used)."""
        keys = [(prompt_key(p), tuple(t)) for p, t in zip(prompts, targets)]
        if self.max_bytes == 0:
            todo = list(range(len(keys)))
        else:
            first = {}
            for i, key in enumerate(keys):
                if key not in self._entries:
                    first.setdefault(key, i)
            todo = list(first.values())
        fresh: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        if todo:
            states, _ = self.model.response_states(
                [prompts[i] for i in todo],
                [Policy(())] * len(todo),
                [targets[i] for i in todo],
                heads.rows(todo) if heads is not None else None,
            )
            for j, i in enumerate(todo):
                fresh[keys[i]] = entry = states[j, : len(targets[i])].clone()
                self._store(keys[i], entry)
        self.misses += sum(k in fresh for k in keys)
        self.hits += sum(k not in fresh for k in keys)
        rows = [fresh[k] if k in fresh else self._entries[k] for k in keys]
        width = max(len(t) for t in targets)
        out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
        return self.model.states_to_logits(out)

    def _store(self, key: tuple[str, tuple[int, ...]], entry: torch.Tensor) -> None:
        size = entry.numel() * entry.element_size()
        if self.max_bytes and self.bytes + size <= self.max_bytes:
            self._entries[key] = entry
            self.bytes += size
