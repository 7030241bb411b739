"""Epoch checkpoints shared by the trainers: Adam's state, the run's position, the resume check.

A resumed run must continue the same optimisation, not restart it: without Adam's moments its
first steps would each move every element by the full learning rate again. The learned tensors
themselves live in the checkpoint's artifact, written by each trainer's own ``save``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import TrainConfig
from ..tokens import MANIFEST_FILE, ArtifactError, safetensors_bytes

OPTIMIZER_FILE = "optimizer.safetensors"
LIVE = "live"  # key suffix of a trained tensor stored beside Adam's state (``save_optimizer_state``)
STATE_FILE = "trainer_state.json"

Named = Sequence[tuple[str, torch.nn.Parameter]]


class TrainingClock:
    """A run's training seconds, sessions before a ``--resume`` included: a resumed run records its
    whole training time beside its whole step count, so its seconds per step stay comparable."""

    def __init__(self) -> None:
        self.prior = 0.0  # seconds of the sessions before this one, read from the resumed checkpoint
        self.started = time.time()

    def start(self) -> None:
        """Start this session's count (after set-up, which is not training time)."""
        self.started = time.time()

    def seconds(self) -> float:
        return self.prior + time.time() - self.started


def checkpoint_dir(out: Path, epoch: int) -> Path:
    return out / "checkpoints" / f"epoch-{epoch}"


def save_optimizer_state(
    ckpt: Path,
    optimizer: torch.optim.Optimizer,
    named: Named,
    epoch: int,
    step: int,
    live: dict[str, torch.Tensor] | None = None,
) -> None:
    """Adam's moments and step count per named parameter, then the position (written last: it
    marks the checkpoint complete).

    ``live``: the tensors the optimiser is training, per name, when the checkpoint's artifact holds
    something else (their moving average, ``optim.ema``); ``--resume`` continues from these.
    """
    state = {f"{name}.{LIVE}": t.detach().cpu().contiguous() for name, t in (live or {}).items()}
    for name, param in named:
        s = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                state[f"{name}.{key}"] = s[key].detach().cpu().contiguous()
        if "step" in s:
            state[f"{name}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / OPTIMIZER_FILE).write_bytes(safetensors_bytes(state))
    # renamed into place: a kill mid-write never leaves a marker that says complete but does not parse
    marker = ckpt / f".{STATE_FILE}.tmp"
    marker.write_text(json.dumps({"epoch": epoch, "step": step}) + "\n")
    os.replace(marker, ckpt / STATE_FILE)


def is_complete(ckpt: Path) -> bool:
    """Whether a checkpoint's marker (written last) is whole."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        return isinstance(state, dict) and "epoch" in state and "step" in state
    except (OSError, ValueError):
        return False


def open_log(out: Path, resumed_step: int | None = None, fresh: bool = False) -> TextIO:
    """The run's ``train_log.jsonl``, open for appending (``fresh``: emptied first).

    A resumed run drops the lines logged after its checkpoint, and a line cut short by a kill:
    those steps are trained again, and a log that lists them twice plots a loss that jumps back.
    """
    path = out / "train_log.jsonl"
    if fresh:
        return path.open("w", encoding="utf-8")
    if resumed_step is not None and path.exists():
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                continue
            if not isinstance(step, int) or step <= resumed_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return path.open("a", encoding="utf-8")


def unreadable_checkpoint(ckpt: Path, why: str) -> ArtifactError:
    """A damaged epoch checkpoint (a disk error, a power cut between its files). It is not deleted
    for the user, who may want to look at it; removing it resumes from the epoch before."""
    return ArtifactError(
        f"{ckpt}: unreadable checkpoint ({why}); delete that folder to resume from the epoch before it"
    )


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint of the latest epoch in a run directory, if any (one whose marker is
    missing or damaged, as by a power cut, is passed over for the one before)."""
    ckpts = [c for c in (out / "checkpoints").glob("epoch-*") if c.name[6:].isdigit() and is_complete(c)]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_optimizer_state(ckpt: Path, optimizer: torch.optim.Optimizer, named: Named) -> tuple[int, int]:
    """Restore Adam's state for ``named`` from ``ckpt``; returns the (epoch, step) reached there."""
    try:
        state = load_file(str(ckpt / OPTIMIZER_FILE))
        info = json.loads((ckpt / STATE_FILE).read_text())
        epoch, step = int(info["epoch"]), int(info["step"])
        restored = {
            param: {
                "step": torch.tensor(float(state[f"{name}.step"][0])),
                "exp_avg": state[f"{name}.exp_avg"].to(param.device),
                "exp_avg_sq": state[f"{name}.exp_avg_sq"].to(param.device),
            }
            for name, param in named
            if f"{name}.exp_avg" in state
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as exc:
        raise unreadable_checkpoint(ckpt, f"{type(exc).__name__}: {exc}") from exc
    optimizer.state.update(restored)  # only once all of it was read: no half-restored optimiser
    return epoch, step


def load_live_tensors(ckpt: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The live tensors ``save_optimizer_state`` stored for ``names``; an error if any is missing."""
    try:
        state = load_file(str(ckpt / OPTIMIZER_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise unreadable_checkpoint(ckpt, f"{type(exc).__name__}: {exc}") from exc
    missing = [n for n in names if f"{n}.{LIVE}" not in state]
    if missing:
        raise ArtifactError(
            f"{ckpt}: the checkpoint lacks the live tensors of {', '.join(missing)} that a run with "
            "optim.ema resumes from (incomplete or not written by such a run)"
        )
    return {n: state[f"{n}.{LIVE}"] for n in names}


def training_record(
    ckpt: Path,
    manifest: dict[str, Any],
    required: bool = True,
    numbers: Sequence[str] = ("seconds",),
    needed: Sequence[str] = (),
) -> dict[str, Any]:
    """A checkpoint manifest's ``training`` record, checked for what ``--resume`` reads of it: the
    config it was made with (each section a mapping), its base, and ``numbers`` (where given) and
    ``needed`` (always), numbers. A hand-edited or damaged record is one clear error, not a
    traceback halfway through the resume. ``required``: the record and its config must be there
    (``False``: older checkpoints may lack them)."""
    training = manifest.get("training", None if required else {})
    problem = None
    if not isinstance(training, dict):
        problem = "no 'training' record" if training is None else "'training' is not a mapping"
    else:
        config = training.get("config", None if required else {})
        defaults = TrainConfig().to_dict()
        if config is None and not required:
            pass  # the caller says what a checkpoint without it means
        elif not isinstance(config, dict):
            problem = "no 'training.config'" if config is None else "'training.config' is not a mapping"
        elif bad := [
            k for k, d in defaults.items() if isinstance(d, dict) and not isinstance(config.get(k, {}), dict)
        ]:
            problem = f"'training.config.{bad[0]}' is not a mapping"
        for key in (*numbers, *needed):
            value = training.get(key, None if key in needed else 0.0)
            if problem is None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                problem = f"'training.{key}' is {value!r}, not a number"
        if problem is None and not isinstance(training.get("base") or {}, dict):
            problem = "'training.base' is not a mapping"
    if problem is not None:
        raise ArtifactError(
            f"{ckpt}: damaged checkpoint ({problem} in {MANIFEST_FILE}); delete this epoch's folder to "
            "resume from the one before, or train afresh with --overwrite"
        )
    return training


def check_same_recipe(
    ckpt: Path, saved: dict[str, Any], config: dict[str, Any], longer: str = "optim.epochs"
) -> None:
    """Refuse to resume a checkpoint made with another recipe (only the epoch count, ``longer``, may grow)."""
    before, now = _flat(resume_key(saved)), _flat(resume_key(config))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k} {before.get(k)!r} → {now.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ArtifactError(
            f"{ckpt}: checkpoint was made with a different config ({shown}{more}); resume needs the "
            f"same one (only {longer} may change, to train longer)"
        )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` as ``{"optim.lr": 1}``: the settings a message can name."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_continuation(
    ckpt: Path, training: dict[str, Any], data_hash: str, epochs: int, setting: str = "optim.epochs"
) -> None:
    """What the recipe check cannot see: the prompts the run trained on (a suite directory can be
    edited between sessions) and how far it got (fewer epochs than it trained cannot be resumed)."""
    saved = training.get("data_hash")  # checkpoints of every trainer record it (older DSA ones not)
    if saved is not None and saved != data_hash:
        raise ArtifactError(
            f"{ckpt}: the run trained on other prompts (data hash {saved}, now {data_hash}); the suite "
            "or data settings changed since, so resuming would mix two datasets: train afresh"
        )
    done = int(ckpt.name.rsplit("-", 1)[1])
    if epochs < done:
        raise ArtifactError(
            f"{ckpt}: the run has trained {done} epochs; {setting}={epochs} cannot undo them (give "
            f"{done} or more to resume, or use the checkpoint of the epoch you want as it is)"
        )


def resume_key(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config a resumed run must share with its checkpoint.

    Everything that shapes the optimisation, except the epoch count (to train longer). Fields the
    checkpoint predates take their defaults, which keep the old behaviour. Where the run lives
    (``output``: a run directory may be moved or copied), how it logs, which epoch's tokens it
    ships (``select``: chosen from the checkpoints afterwards) and how it is evaluated do not change
    the optimisation, so they may differ.
    """
    free = {"output", "log", "eval", "select"}
    defaults = TrainConfig().to_dict()  # fields added since the checkpoint take their defaults
    key = {}
    for name, default in defaults.items():
        if name in free:
            continue
        value = config.get(name, default)
        if isinstance(default, dict) and isinstance(value, dict) and name != "method_options":
            value = {k: value.get(k, d) for k, d in default.items()}
        key[name] = value
    speed_only = {"epochs", "cache_mb"}  # more epochs; a cache that only changes float rounding
    return {
        **key,
        "model": _model_key(key["model"]),
        "optim": {k: v for k, v in key["optim"].items() if k not in speed_only},
    }


def _model_key(model: dict[str, Any]) -> dict[str, Any]:
    """The model as the optimisation sees it: its weights and the dtype they run in. Which device
    holds them (``cuda`` or ``cuda:1``) changes no step, and ``auto`` is the dtype it stands for."""
    device = str(model.get("device") or "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = model.get("dtype")
    if dtype in (None, "auto"):
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return {**{k: v for k, v in model.items() if k != "device"}, "dtype": dtype}
