"""On-disk cache of generations, so re-running an evaluation (or adding a method) is instant.

One JSONL file per method fingerprint under ``<cache_root>/generations``. A record's key covers
everything that changes the response: policy, prompt and decoding settings. Records are appended as
each batch finishes, so an interrupted run keeps what it already generated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..backbone import cache_root
from ..methods.base import digest


class GenerationCache:
    def __init__(self, fingerprint: str, root: Path | None = None):
        self.dir = (root or cache_root()) / "generations"
        self.path = self.dir / f"{fingerprint}.jsonl"
        self._data: dict[str, str] = {}
        if self.path.exists():
            with self.path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        self._data[rec["key"]] = rec["response"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut by an interrupted write: regenerate that one

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
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            for k, r in zip(keys, responses, strict=True):
                self._data[k] = r
                fh.write(json.dumps({"key": k, "response": r}) + "\n")
