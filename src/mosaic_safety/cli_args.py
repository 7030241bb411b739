"""Option parsers shared by the CLI's command modules."""

from __future__ import annotations

from pathlib import Path

import typer


def nonempty_path(value: str) -> Path:
    """An output path as typed: ``-o ''`` would become ``.`` and write a run into the working
    directory (the repository, say) without a word."""
    if not str(value).strip():
        raise typer.BadParameter("an empty path; give a directory")
    return Path(value)


def _file_in_the_way(path: Path) -> Path | None:
    """The file that stops ``path`` from being a directory: itself or its nearest existing parent."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Fail before the work, not after it: a directory to be written must not be a file, nor sit
    under one (``-o results.json/x``)."""
    dangling = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:  # mkdir would fail on it with a bare "File exists"
        raise NotADirectoryError(
            f"{option} {path}: {dangling} is a symbolic link to {dangling.readlink()}, which does not exist"
        )
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise NotADirectoryError(f"{option} {path}: {blocker} is a file, not a directory")


def check_output_file(path: Path, option: str = "--out") -> None:
    """A file to be written must not be a directory, nor sit under a file."""
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a directory; give a file name")
    check_output_dir(path.parent, option)


def check_cache_dir() -> None:
    """The cache (base answers, converted models, evaluation responses) must be a directory: a
    file there failed a run only once it had generated everything it meant to keep."""
    from .backbone import BackboneError, cache_root

    root = cache_root()
    blocker = _file_in_the_way(root)
    if blocker is not None:
        raise BackboneError(f"the cache {root} cannot be created: {blocker} is a file (set MOSAIC_CACHE)")
