"""Artifacts of the comparison methods (LoRA SFT, ORPO, magic tokens, DSA, ...).

Same rules as MOSAIC control-token artifacts: a directory with ``weights.safetensors`` and
``mosaic.json``, written through temporary files and renames, and validated on load (format and
version, method name, backbone hidden size and fingerprint, the expected tensors with their shapes,
finiteness). Only safetensors are read, never pickles. Secrets a method needs (magic-token
strings) live in ``secrets.json`` with owner-only permissions and never in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .. import __version__
from ..policy import CategoryRegistry
from ..tokens import (
    MANIFEST_FILE,
    ArtifactError,
    check_backbone,
    check_backbone_field,
    load_manifest_json,
    read_hashed,
    safetensors_bytes,
)

METHOD_FORMAT = "mosaic-method"
METHOD_FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
SECRETS_FILE = "secrets.json"


def atomic_write(path: Path, write: Any) -> None:
    """Run ``write(tmp)`` and rename the result to ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_method_artifact(
    out_dir: str | Path,
    method: str,
    backbone: dict[str, Any],
    registry: CategoryRegistry,
    tensors: Mapping[str, torch.Tensor],
    options: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    secrets: dict[str, Any] | None = None,
) -> Path:
    """Write a method artifact; other files in ``out_dir`` (logs, checkpoints) are left alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": METHOD_FORMAT,
        "format_version": METHOD_FORMAT_VERSION,
        "library_version": __version__,
        "method": method,
        "backbone": backbone,
        "registry": registry.to_dict(),
        "options": options or {},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    } | (extra or {})
    flat = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    if flat:
        data = safetensors_bytes(flat)
        atomic_write(out / WEIGHTS_FILE, lambda p: p.write_bytes(data))
        manifest["weights_sha256"] = hashlib.sha256(data).hexdigest()  # checked on load (read_hashed)
    if secrets is not None:

        def write_secret(p: Path) -> None:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(secrets, fh)

        atomic_write(out / SECRETS_FILE, write_secret)
    atomic_write(
        out / MANIFEST_FILE,
        lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8"),
    )
    return out


def artifact_method(artifact_dir: str | Path) -> str:
    """Which method wrote an artifact (``mosaic`` for control-token artifacts)."""
    return _identify(artifact_dir)[0]


def _identify(artifact_dir: str | Path) -> tuple[str, dict[str, Any], Path]:
    """(method name, manifest, manifest path) of an artifact of any kind."""
    manifest, path = load_manifest_json(artifact_dir)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: corrupt manifest (not an object)")
    if manifest.get("format") == "mosaic-control-tokens":
        return "mosaic", manifest, path
    if manifest.get("format") == METHOD_FORMAT and isinstance(manifest.get("method"), str):
        return manifest["method"], manifest, path
    raise ArtifactError(f"{path}: not a mosaic-safety artifact")


def load_method_artifact(
    artifact_dir: str | Path,
    method: str,
    backbone: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], CategoryRegistry]:
    """Read and validate a method artifact: (manifest, tensors, registry)."""
    root = Path(artifact_dir)
    found, manifest, path = _identify(root)
    if found != method:
        raise ArtifactError(f"{root}: this is a {found!r} artifact, not {method!r}")
    version = manifest.get("format_version")
    if type(version) is not int or version != METHOD_FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {manifest.get('format_version')!r} is not supported "
            f"(expects {METHOD_FORMAT_VERSION})"
        )
    for key in ("backbone", "registry", "tensors", "options"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest lacks {key!r}")
    _check_types(manifest, path)
    registry = CategoryRegistry.from_dict(manifest["registry"], source=str(path))
    expected: dict[str, list[int]] = manifest["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    if expected:
        wpath = root / WEIGHTS_FILE
        data = read_hashed(wpath, manifest.get("weights_sha256"))  # absent in artifacts from before it
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError) as exc:
            raise ArtifactError(f"{wpath}: not a readable safetensors file ({exc})") from exc
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ArtifactError(f"{wpath}: missing tensors {missing}, unexpected tensors {unexpected}")
        for name, shape in expected.items():
            t = tensors[name]
            if list(t.shape) != list(shape) or t.dtype != torch.float32:
                raise ArtifactError(
                    f"{wpath}: {name} has shape {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} float32"
                )
            if not torch.isfinite(t).all():
                raise ArtifactError(f"{wpath}: {name} contains NaN or infinite values")
    if backbone is not None:
        check_backbone(manifest, backbone, root)
    return manifest, tensors, registry


def _check_types(manifest: dict[str, Any], path: Path) -> None:
    """The fields the loader indexes, of the types it indexes them as (else a clear ``ArtifactError``)."""
    registry, tensors = manifest["registry"], manifest["tensors"]
    check_backbone_field(manifest, path)
    if not isinstance(registry, dict):
        raise ArtifactError(f"{path}: 'registry' must be a mapping")
    if not isinstance(manifest["options"], dict):
        raise ArtifactError(f"{path}: 'options' must be a mapping")
    shapes_ok = isinstance(tensors, dict) and all(
        isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
        for shape in tensors.values()
    )
    if not shapes_ok:
        raise ArtifactError(f"{path}: 'tensors' must map each tensor's name to its shape, a list of sizes")


def read_secrets(artifact_dir: str | Path) -> dict[str, Any]:
    path = Path(artifact_dir) / SECRETS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (this method stores its secrets there)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt secrets file ({exc})") from exc
