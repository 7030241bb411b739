"""A training run's output directory: what a run writes there, and replacing an earlier run safely.

An earlier run's checkpoints would sit beside a new run's (``--resume`` takes the last epoch, which
could be the old run's) and its log would be appended to, so a fresh run refuses an occupied
directory unless told to replace it. Replacing must not lose the earlier run to a start that fails
(a mistyped model name, a suite that does not load, a Ctrl-C in the first epoch): its files are
moved aside first and come back unless the new run has a checkpoint or an artifact of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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


ASIDE_PREFIX = ".replaced-run-"


def run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def has_progress(out: Path) -> bool:
    """Whether the run in ``out`` holds something worth keeping: a finished artifact or a complete
    checkpoint. A log of a first epoch that never finished is not (``--resume`` starts over)."""
    from .checkpoint import latest_checkpoint

    return (out / "mosaic.json").exists() or latest_checkpoint(out) is not None


MOVED = ".moved"  # in a set-aside folder: every file of the earlier run is in it
RESTORING = ".restoring"  # in a set-aside folder: its files are on their way back
LOCK = ".lock"  # held by the process whose --overwrite set the folder aside, while it runs


def _lock(aside: Path, wait: bool) -> IO[str] | None:
    """An exclusive lock on a set-aside folder: held by its own run, tested by :func:`recover_set_aside`
    (a folder whose run is alive is not a leftover). ``None`` when another process holds it."""
    handle = (aside / LOCK).open("a")
    return handle if _flock(handle, wait) else None


def _flock(handle: IO[str], wait: bool) -> bool:
    """Take an exclusive lock on an open file (``wait``: block until its holder lets go); on
    ``False`` another process holds it and the handle is closed."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return False
    return True


RUN_LOCK = ".mosaic-train.lock"  # in a run directory: held by the `mosaic train` writing there
EVAL_LOCK = ".mosaic-eval.lock"  # in an evaluation's --out: held by the `mosaic eval` writing there


@contextmanager
def exclusive_run(
    out: Path, lock: str = RUN_LOCK, command: str = "mosaic train", option: str = "--output"
) -> Iterator[None]:
    """Hold ``out`` for one ``command`` at a time, or fail at once.

    Two runs started into one directory both found it free (the check that refuses an occupied
    one, or another evaluation's results, comes long before the first file is written), then wrote
    over each other, and both said they had finished. The lock is a hidden file beside the
    command's files while it runs (the operating system releases it when the process ends, however
    it ends); it is removed when the command ends, and so is a directory made for a command that
    then wrote nothing (a model that did not load).
    """
    made = [p for p in (out, *out.parents) if not p.exists()]  # removed again if left empty
    out.mkdir(parents=True, exist_ok=True)
    path = out / lock
    handle = _lock_file(path)
    if handle is None:
        raise ArtifactError(
            f"{out} is in use by another `{command}` (it holds {path}); wait for it to "
            f"finish, or choose another {option}"
        )
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while held: a process that opened it meanwhile sees it go (_lock_file)
        for folder in made:  # innermost first; rmdir fails on a folder that holds anything
            try:
                folder.rmdir()
            except OSError:
                break
        handle.close()


def _lock_file(path: Path) -> IO[str] | None:
    """An exclusive lock on ``path`` (created if need be), or ``None`` while another process holds it.

    Its holder removes the file before letting go, so a lock taken on a file that is no longer at
    ``path`` is let go and taken again on the file there now.
    """
    while True:
        handle = path.open("a")
        if not _flock(handle, wait=False):
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return handle
        handle.close()


def set_aside_note(out: Path) -> str:
    """What a folder without a manifest holds of an ``--overwrite``: the earlier run, set aside by
    a replacement still running or by one that was killed ("" when neither)."""
    asides = sorted(out.glob(ASIDE_PREFIX + "*"))
    if not asides:
        return ""
    name = asides[0].name
    try:
        handle = _lock(asides[0], wait=False)
    except OSError:  # a read-only folder: say what it holds without telling which case
        return f"; the earlier run of an --overwrite is in {name}"
    if handle is None:
        return f"; a running --overwrite is replacing the run here (the earlier one is in {name})"
    handle.close()
    return (
        f"; an interrupted --overwrite left the earlier run in {name}, and the next "
        f"`mosaic train --output {out}` puts it back or settles it"
    )


def _put_back(aside: Path, out: Path, clear_out: bool) -> None:
    """Move the earlier run's files back into ``out`` (``clear_out``: the new run's partial files go
    first). The folder says it is restoring, so a kill midway is finished by the next recovery."""
    (aside / RESTORING).touch()
    if clear_out:
        for name in run_files(out):
            _remove(out / name)
    for name in run_files(aside):
        if (out / name).exists():  # the new run's: the earlier run's is the one set aside
            _remove(out / name)
        os.replace(aside / name, out / name)


def recover_set_aside(out: Path) -> str | None:
    """Finish what a killed ``--overwrite`` left (SIGKILL, a power cut: no ``finally`` ran).

    Its earlier run sits in a hidden folder in ``out``. A folder whose moves never finished, or whose
    restore was under way, is put back. Otherwise, if the new run got as far as a checkpoint, the
    replacement stands and the folder goes; if not, the earlier run comes back. A folder whose run
    is still alive (it holds the folder's lock) is left alone. Returns what was done, for the user,
    or ``None`` when there was nothing to do.
    """
    found = sorted(out.glob(ASIDE_PREFIX + "*"), key=lambda p: p.stat().st_mtime) if out.is_dir() else []
    locks = [(a, _lock(a, wait=False)) for a in found]
    asides = [a for a, lock in locks if lock is not None]  # the others belong to a running run
    # a folder without the marker whose files are also in ``out`` was set aside by an older version,
    # whose moves cannot be told apart from a new run's files: it is named, not guessed at
    unclear = [
        a
        for a in asides
        if not (a / MOVED).exists()
        and not (a / RESTORING).exists()
        and set(run_files(a)) & set(run_files(out))
    ]
    asides = [a for a in asides if a not in unclear]
    try:
        if unclear:
            names = ", ".join(a.name for a in unclear)
            return (
                f"{out} holds a run an older --overwrite set aside ({names}); move its files back by hand "
                "to keep it, or delete the folder"
            )
        if not asides:
            return None
        partial = [a for a in asides if not (a / MOVED).exists() or (a / RESTORING).exists()]
        if partial:  # the earlier run is split between ``out`` and the folder: join it again
            for aside in partial:
                _put_back(aside, out, clear_out=False)
            restored = True
        elif has_progress(out):
            restored = False
        else:
            # repeated killed overwrites nest: the newest folder holding a run is the earlier run
            keep = next((a for a in reversed(asides) if has_progress(a)), None)
            if keep is not None:
                _put_back(keep, out, clear_out=True)
            restored = keep is not None
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)
        if restored:
            return f"restored the earlier run in {out} that a stopped --overwrite had set aside"
        if has_progress(out):
            return (
                f"removed the earlier run that a stopped --overwrite had set aside in {out}: the run "
                "that replaced it had written a checkpoint"
            )
        return f"removed folders a stopped --overwrite had left in {out} (they held no finished run)"
    finally:
        for _, lock in locks:
            if lock is not None:
                lock.close()


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

    restored: bool = False  # the new run stopped before its first checkpoint, and the earlier one is back


@contextmanager
def replacing_run(out: Path, overwrite: bool, keep: Path | str | None = None) -> Iterator[Replacement]:
    """Start a fresh run in ``out``, replacing an earlier one only once the new one is under way.

    Without ``overwrite`` an occupied ``out`` is an error. With it, the earlier run's files move to
    a hidden folder inside ``out``. If the block fails before the new run has a complete checkpoint
    or its artifact, they move back; otherwise (the new run got going, or it finished) they are
    deleted. A process killed outright leaves the folder; :func:`recover_set_aside` settles it. ``keep`` is
    a path the new run reads (an incremental run's base artifact): replacing a run that holds it
    would delete what the new run starts from, so that is refused up front.
    """
    found = run_files(out)
    if found and not overwrite:
        claim_output(out)  # raises with the message that says what to do
    if found and keep is not None:
        # resolved: a symlink to the run (or into it) is the run; the run's own entries are not
        # followed, since only they move aside, not what a link among them points to
        base, root = Path(keep).resolve(), Path(out).resolve()
        if base == root or any(base.is_relative_to(root / n) for n in found):
            raise ArtifactError(
                f"{keep} belongs to the run that --overwrite would replace in {out}, and this run starts "
                "from it; choose another --output"
            )
    state = Replacement()
    aside: Path | None = None
    lock: IO[str] | None = None
    moved: list[str] = []
    entered = settled = False
    try:
        if found:
            aside = Path(tempfile.mkdtemp(prefix=ASIDE_PREFIX, dir=out))
            lock = _lock(aside, wait=True)
            for name in found:
                os.replace(out / name, aside / name)
                moved.append(name)
            (aside / MOVED).touch()
        entered = True
        yield state
        settled = True  # the new run finished: the earlier one goes
    except BaseException:
        if aside is None:
            raise
        if not entered or not has_progress(out):
            # stopped while setting the earlier run aside, or before the new run had anything to
            # keep (an empty log, a first epoch cut short): the earlier run comes back
            _put_back(aside, out, clear_out=entered)
            state.restored = True
        settled = True  # put back, or replaced by a run with a checkpoint of its own
        raise
    finally:
        # a stop during the restore itself leaves the folder (marked) for recover_set_aside
        if aside is not None and settled:
            shutil.rmtree(aside, ignore_errors=True)
        if lock is not None:
            lock.close()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
