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
