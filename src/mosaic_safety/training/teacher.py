"""Self-distilled targets for negatives: the frozen model's own greedy answers, cached on disk.

On a negative, the controlled model must answer as the base model would. The target sequence is
the base model's greedy response (generated once without control tokens); the KL term is then
taken position by position along it. Generation is the slow part of data preparation, so answers
are cached in a JSONL file keyed by what decides them: every weight of the model with the dtype and
device type it runs in (``Backbone.output_key``), the prompt's token ids as the chat template
renders them (a template that writes today's date renders a new prompt tomorrow), the stop tokens
and the decoding settings. A second run, or another recipe on the same model, reuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..controlled import ControlledModel, until_eos
from ..jsonl import append_jsonl, read_jsonl
from ..policy import Policy
from .head_cache import HeadCache


def response_key(
    output_key: str, prompt_ids: Sequence[int], eos_ids: Sequence[int], max_new_tokens: int
) -> str:
    raw = json.dumps([output_key, list(prompt_ids), list(eos_ids), "greedy", max_new_tokens])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _cached_row(row: Any) -> tuple[str, list[int]] | None:
    """A cache record's key and ids; ``None`` for anything else (a stray edit, another program's
    line), which is then generated again instead of served as a target."""
    if not isinstance(row, dict):
        return None
    key, ids = row.get("key"), row.get("ids")
    if not isinstance(key, str) or not isinstance(ids, list):
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return None
    return key, ids


class BaseResponseCache:
    """Greedy base-model responses (token ids, EOS included when the model stopped)."""

    def __init__(
        self,
        model: ControlledModel,
        cache_dir: str | Path,
        max_new_tokens: int = 32,
        batch_size: int = 32,
        heads: HeadCache | None = None,
    ):
        self.model = model
        self.heads = heads  # where prompt heads are kept (training's cache): generation reuses them
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        fingerprint = model.backbone.fingerprint
        self.path = Path(cache_dir) / f"responses-{fingerprint}.jsonl"
        self._output_key = model.backbone.output_key
        self._store: dict[str, list[int]] = {}
        self._keys: dict[str, str] = {}
        for record in read_jsonl(self.path):
            row = _cached_row(record)
            if row is not None:
                self._store[row[0]] = row[1]

    def key(self, prompt: str) -> str:
        key = self._keys.get(prompt)
        if key is None:  # rendered once per prompt: the split cache holds fewer than a run's pools
            head, tail = self.model.split_prompt(prompt)
            key = response_key(self._output_key, head + tail, self.model.eos_ids, self.max_new_tokens)
            self._keys[prompt] = key
        return key

    def missing(self, prompts: Sequence[str]) -> list[str]:
        return sorted({p for p in prompts if self.key(p) not in self._store})

    def fill(self, prompts: Sequence[str], progress: Callable[[int], None] | None = None) -> int:
        """Generate and store the responses not cached yet; returns how many were generated."""
        todo = self.missing(prompts)
        if not todo:
            return 0
        # chunks of similar length: a left-padded batch runs its longest prompt's length for every row
        todo.sort(key=lambda p: (sum(map(len, self.model.split_prompt(p))), p))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            ids = self._generate(chunk)  # a row that stopped by itself ends with its stop token
            keys = [self.key(prompt) for prompt in chunk]
            self._store.update(zip(keys, ids))
            # each chunk survives an interruption; runs sharing the cache never interleave lines
            append_jsonl(self.path, [{"key": k, "ids": row} for k, row in zip(keys, ids)])
            if progress is not None:
                progress(len(chunk))
        return len(todo)

    def _generate(self, chunk: list[str]) -> list[list[int]]:
        """Greedy answers for one chunk, over the kept prompt heads when there are any.

        Not where the chunk would reach past a sliding window: decoding over shared heads can
        leave padding between a row's head and its tail (``ControlledModel.heads_share_exactly``).
        """
        heads = None
        if self.heads is not None and self.model.heads_share_exactly(
            self.model.shared_span(chunk, [Policy(())] * len(chunk), self.max_new_tokens)
        ):
            heads = self.heads.heads(chunk)
        if heads is None:
            return self.model.generate_ids(
                chunk,
                [None] * len(chunk),
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                keep_eos=True,
            )
        steps = list(
            self.model.decode_steps_over_heads(chunk, [Policy(())] * len(chunk), heads, self.max_new_tokens)
        )
        rows = torch.stack(steps, dim=1).tolist()
        return [until_eos(row, self.model.eos_ids, keep=True) for row in rows]

    def get(self, prompt: str) -> list[int]:
        try:
            return self._store[self.key(prompt)]
        except KeyError:
            raise KeyError(f"no cached base response for prompt {prompt[:60]!r}; call fill() first") from None
