"""A training run's output directory: what a run writes there, and replacing an earlier run safely.

An earlier run's checkpoints would sit beside a new run's (``--resume`` takes the last epoch, which
could be the old run's) and its log would be appended to, so a fresh run refuses an occupied
directory unless told to replace it. Replacing must not lose the earlier run to a start that fails
(a mistyped model name, a suite that does not load): its files are moved aside first and come back
unless the new run has written files of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..tokens import ArtifactError

RUN_FILES = (
    "mosaic.json",
    "tokens.safetensors",
    "train_log.jsonl",
    "eval_table.json",
    "checkpoints",
    "tensorboard",
    "weights.safetensors",  # comparison methods (methods/artifact.py)
    "secrets.json",
)
"""What a training run of any method writes into its output directory."""


def run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def claim_output(out: Path, overwrite: bool = False) -> None:
    """Refuse a directory that holds a run unless ``overwrite``; then remove that run's files.

    Files that are not a run's are never touched. The CLI moves the earlier run aside first
    (:func:`replacing_run`), so by the time a trainer calls this there is nothing left to remove.
    """
    found = run_files(out)
    if not found:
        return
    if not overwrite:
        raise ArtifactError(
            f"{out} already holds a training run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output"
        )
    for name in found:
        _remove(out / name)


@dataclass
class Replacement:
    """What :func:`replacing_run` did with the earlier run, for the message a stopped run prints."""

    restored: bool = False  # the new run stopped before writing anything, and the earlier one is back


@contextmanager
def replacing_run(out: Path, overwrite: bool, keep: Path | None = None) -> Iterator[Replacement]:
    """Start a fresh run in ``out``, replacing an earlier one only once the new one is under way.

    Without ``overwrite`` an occupied ``out`` is an error. With it, the earlier run's files move to
    a hidden folder inside ``out``. If the block fails before the new run has written any run file,
    they move back; otherwise (the new run got going, or it finished) they are deleted. ``keep`` is
    a path the new run reads (an incremental run's base artifact): replacing a run that holds it
    would delete what the new run starts from, so that is refused up front.
    """
    found = run_files(out)
    if found and not overwrite:
        claim_output(out)  # raises with the message that says what to do
    if found and keep is not None:
        base = Path(os.path.abspath(keep))
        if base == Path(os.path.abspath(out)) or any(
            base.is_relative_to(os.path.abspath(out / n)) for n in found
        ):
            raise ArtifactError(
                f"{keep} belongs to the run that --overwrite would replace in {out}, and this run starts "
                "from it; choose another --output"
            )
    state = Replacement()
    aside: Path | None = None
    moved: list[str] = []
    try:
        if found:
            aside = Path(tempfile.mkdtemp(prefix=".replaced-run-", dir=out))
            for name in found:
                os.replace(out / name, aside / name)
                moved.append(name)
        yield state
    except BaseException:
        # what the new run wrote: run files other than the earlier run's that have not moved yet
        written = [n for n in run_files(out) if n in moved or n not in found]
        if aside is not None and not written:
            for name in moved:
                os.replace(aside / name, out / name)
            state.restored = True
        raise
    finally:
        if aside is not None and aside.exists():
            shutil.rmtree(aside)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
