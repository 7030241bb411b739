"""The cache directory: converted models that no load can use again are found and removed, and
`mosaic cache` shows and trims it without touching what is still used."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mosaic_safety.backbone import COMPLETE, SOURCE, _remove_orphaned_conversions, conversion_state
from tests.test_cli import mosaic


def _copy(models: Path, name: str, source: Path | None, record: dict | None = None) -> Path:
    """A converted copy as convert_gguf writes it: files, their marker, the source record."""
    copy = models / name
    copy.mkdir(parents=True)
    (copy / "model.safetensors").write_bytes(b"\0" * 1000)
    if source is not None or record is not None:
        stat = source.stat() if source is not None and source.exists() else None
        rec = record or {"path": str(source.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}
        (copy / SOURCE).write_text(json.dumps(rec))
    sizes = {p.name: p.stat().st_size for p in copy.iterdir()}
    (copy / COMPLETE).write_text(json.dumps(sizes))
    return copy


@pytest.fixture
def cache(tmp_path):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" * 10)
    models = tmp_path / "cache" / "models"
    current = _copy(models, "model-current", gguf)
    os.utime(gguf, (1, 1))  # the package was reinstalled: same file, a new modification time
    reinstalled = _copy(models, "model-reinstalled", gguf)
    gone = _copy(
        models, "model-gone", None, {"path": str(tmp_path / "old" / "model.gguf"), "size": 40, "mtime": 5}
    )
    legacy = _copy(models, "model-legacy", None)
    broken = models / "model-broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\0" * 10)  # no marker: never loaded
    running = models / ".convert-abc"
    running.mkdir()
    return tmp_path / "cache", {
        "current": current,
        "reinstalled": reinstalled,
        "gone": gone,
        "legacy": legacy,
        "broken": broken,
        "running": running,
    }


def test_conversion_states(cache):
    _, copies = cache
    states = {name: conversion_state(path) for name, path in copies.items() if name != "running"}
    assert states == {
        "current": "orphaned",  # its file's modification time changed since: its key is gone
        "reinstalled": "current",
        "gone": "orphaned",
        "legacy": "unknown",
        "broken": "unusable",
    }
    (copies["legacy"] / SOURCE).write_text("{not json")  # a damaged record: no key to match
    assert conversion_state(copies["legacy"]) == "orphaned"


def test_a_conversion_removes_only_orphaned_copies(cache):
    """What runs after each conversion: copies of replaced or removed GGUF files go; the copy just
    made, copies it cannot judge and another process's conversion in progress stay."""
    root, copies = cache
    _remove_orphaned_conversions(root / "models", keep=copies["reinstalled"])
    left = {p.name for p in (root / "models").iterdir()}
    assert left == {"model-reinstalled", "model-legacy", "model-broken", ".convert-abc"}


def test_cache_cli_info_prune_clear(cache):
    root, copies = cache
    (root / "responses").mkdir()
    (root / "responses" / "answers.jsonl").write_text('{"key": "k", "response": "r"}\n')
    info = mosaic("cache", "info", cache=root).stdout
    assert "model-reinstalled" in info and "current" in info and "orphaned" in info
    assert "mosaic cache prune" in info

    killed = root / "models" / ".convert-old"  # a conversion killed two hours ago
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 500)
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    (root / "dsa_states").mkdir()
    (root / "dsa_states" / ".states.safetensors.123.tmp").write_bytes(b"\0" * 50)  # a write in progress
    info = mosaic("cache", "info", cache=root).stdout
    assert "3 temporary items" in info and ".convert-old" in info

    pruned = mosaic("cache", "prune", cache=root).stdout
    assert "removed 4 converted model copies and 1 temporary items" in pruned
    # a conversion still running (an hour has not passed) is left to finish
    assert {p.name for p in (root / "models").iterdir()} == {"model-reinstalled", ".convert-abc"}
    assert (root / "dsa_states" / ".states.safetensors.123.tmp").exists()
    mosaic("cache", "clear", "dsa_states", "--yes", cache=root)
    assert not list((root / "dsa_states").iterdir())  # cleared: temporary items too

    bad = mosaic("cache", "clear", "respones", "--yes", cache=root, check=False)
    assert bad.returncode == 2 and "unknown area 'respones'" in bad.stderr
    assert (root / "responses" / "answers.jsonl").exists()  # nothing removed on a typo
    declined = mosaic("cache", "clear", "responses", cache=root, check=False, stdin="n\n")
    assert declined.returncode == 1 and (root / "responses" / "answers.jsonl").exists()
    mosaic("cache", "clear", "responses", "--yes", cache=root)
    assert not (root / "responses" / "answers.jsonl").exists()
    assert (root / "models" / "model-reinstalled").exists()  # other areas untouched
