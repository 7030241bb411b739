"""What the cache directory holds, and removing what no run will read again.

The cache grows without bound otherwise: every reinstall of the package that ships the SmolLM2 GGUF
gives the file a new modification time, hence a new key and a new half-GB converted copy, and
every retrained artifact starts a new generation file. Nothing here touches runs or artifacts.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

AREAS: dict[str, str] = {
    "models": "converted GGUF checkpoints, one folder per source file",
    "responses": "base-model answers used as training targets",
    "generations": "evaluation responses, one file per method fingerprint",
    "dsa_states": "backbone states extracted for DSA training",
}


TEMPORARY = "temporary"  # a hidden file or folder: a job's write in progress, or one a kill left
STALE_AFTER_S = 3600.0  # a temporary item this old belongs to no running job


@dataclass(frozen=True)
class Entry:
    path: Path
    bytes: int
    state: str = ""  # converted models: see backbone.conversion_state; hidden items: TEMPORARY

    def stale(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > STALE_AFTER_S
        except OSError:
            return False


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:  # removed while we looked
            continue
    return total


def _state(area: str, path: Path) -> str:
    from .backbone import conversion_state  # imports torch: not at start-up (see ``entries``)

    if path.name.startswith("."):
        return TEMPORARY
    return conversion_state(path) if area == "models" and path.is_dir() else ""


def entries(area: str, root: Path | None = None) -> list[Entry]:
    """The items of one area, largest first; hidden ones (a conversion or an atomic write in
    progress, or what a killed job left of one) are ``temporary``."""
    # ``backbone`` imports torch (a second of start-up for every ``mosaic`` command, which loads
    # this module to register ``mosaic cache``; a Ctrl-C in it is a traceback): imported here
    from .backbone import cache_root

    if area not in AREAS:
        raise ValueError(f"unknown cache area {area!r}; valid: {', '.join(AREAS)}")
    folder = (root or cache_root()) / area
    if not folder.is_dir():
        return []
    found = [Entry(p, size_of(p), _state(area, p)) for p in folder.iterdir()]
    return sorted(found, key=lambda e: (-e.bytes, e.path.name))


def clear(areas: list[str], root: Path | None = None) -> int:
    """Remove whole areas; returns the bytes freed. Their contents are rebuilt on demand."""
    freed = 0
    for area in areas:
        for entry in entries(area, root):
            freed += entry.bytes
            _remove(entry.path)
    return freed


def prune(root: Path | None = None) -> list[Entry]:
    """Remove what no run will read again: every converted copy but the ones whose GGUF file is
    there unchanged, and temporary items older than an hour (younger ones may be a running job's).

    Copies from before source records (``unknown``) go too: a load that still wanted one converts
    again (about 20 s for SmolLM2), which is cheaper than keeping half a GB per reinstall forever.
    """
    removed = [
        e
        for area in AREAS
        for e in entries(area, root)
        if (e.state == TEMPORARY and e.stale())
        or (area == "models" and e.state not in ("current", TEMPORARY))
    ]
    for entry in removed:
        _remove(entry.path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
