"""On-disk cache of generations, so re-running an evaluation (or adding a method) is instant.

One JSONL file per method fingerprint under ``<cache_root>/generations``. A record's key covers
everything that changes the response: policy, prompt and decoding settings. Records are appended as
each batch finishes, so an interrupted run keeps what it already generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..backbone import cache_root
from ..jsonl import append_jsonl, read_jsonl
from ..methods.base import digest


class GenerationCache:
    def __init__(self, fingerprint: str, root: Path | None = None):
        self.dir = (root or cache_root()) / "generations"
        self.path = self.dir / f"{fingerprint}.jsonl"
        self._data: dict[str, str] = {}
        for rec in read_jsonl(self.path):
            # anything but a key and a text (a damaged line, a null response) is generated again
            if (
                isinstance(rec, dict)
                and isinstance(rec.get("key"), str)
                and isinstance(rec.get("response"), str)
            ):
                self._data[rec["key"]] = rec["response"]

    @staticmethod
    def key(policy_key: str, prompt: str, settings: dict[str, Any]) -> str:
        return digest(policy_key, prompt, settings)

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def put_many(self, keys: Sequence[str], responses: Sequence[str]) -> None:
        rows = [{"key": k, "response": r} for k, r in zip(keys, responses, strict=True)]
        self._data.update(zip(keys, responses))
        append_jsonl(self.path, rows)  # whole, on its own line, under a lock
