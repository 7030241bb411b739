"""Shared fixtures for the data tests (kept here: the repository has no top-level conftest)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mosaic_safety.policy import CategoryRegistry

REPO = Path(__file__).resolve().parents[2]
MINORS_DIR = REPO / "src" / "mosaic_safety" / "data" / "builtin" / "minors"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a model or dataset hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minors() -> CategoryRegistry:
    return CategoryRegistry.load("minors")


def row(i: int, category: str = "alcohol", split: str = "train", **extra: object) -> dict[str, object]:
    """A valid JSONL row with a prompt unique to ``i``."""
    out: dict[str, object] = {
        "id": f"r-{i}",
        "prompt": f"request number {i} about topic {i * 7919 % 104729}",
        "category": category,
        "split": split,
    }
    out.update(extra)
    return out


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write rows (dicts are JSON-encoded, strings written verbatim) to a .jsonl file."""

    def _write(rows: list[object], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return _write


@pytest.fixture
def make_row() -> Callable[..., dict[str, object]]:
    return row
