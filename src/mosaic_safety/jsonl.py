"""Append-only JSONL files shared by runs: the base-answer and generation caches.

Such a file outlives crashes and is written by runs side by side, so reading skips what cannot be a
record (a line cut short, undecodable bytes) and writing appends whole chunks under a lock, on a
line of their own.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def read_jsonl(path: Path) -> Iterator[Any]:
    """Every line of ``path`` that parses as JSON (none if the file does not exist)."""
    if not path.exists():
        return
    # undecodable bytes become U+FFFD, so a damaged line fails to parse instead of failing the read
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def append_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """Append ``rows`` as one write under an advisory lock, starting on a fresh line: a line left
    unfinished by a crash is not glued to the first new record (which would lose both)."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if not text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f, _exclusive(f):
        f.seek(0, 2)
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode("utf-8"))
        f.flush()


@contextlib.contextmanager
def _exclusive(f: IO[bytes]) -> Iterator[None]:
    """An advisory lock on an open file where the platform has one (POSIX ``flock``)."""
    try:
        import fcntl
    except ImportError:  # Windows: one unlocked write per chunk
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
