"""Methods comparable under one protocol: ``none``, ``in_context``, ``mosaic`` and trained baselines.

Each trained method lives in its own module ``mosaic_safety.methods.<name>`` exposing

- ``train(config: TrainConfig, output: Path, reporter=None, backbone=None) -> dict`` (a summary with
  at least ``steps`` and ``seconds``; the artifact is written to ``output``), and
- ``load(artifact: Path, backbone: Backbone) -> Method``.

so ``mosaic train --method NAME`` and ``mosaic eval --method NAME`` work without a central switch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .base import Method, MethodError, digest

PROMPTING = ("none", "in_context")
TRAINED = ("mosaic", "lora_sft", "orpo", "magic_token", "dsa")
METHODS = PROMPTING + TRAINED

__all__ = ["METHODS", "Method", "MethodError", "digest", "load_method", "method_module"]


def method_module(name: str) -> Any:
    """The module implementing trained method ``name`` (its ``train`` and ``load``)."""
    if name not in TRAINED:
        raise MethodError(f"unknown trained method {name!r}; choose one of {', '.join(TRAINED)}")
    if name == "mosaic":
        return importlib.import_module(".mosaic", __name__)
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            raise MethodError(f"method {name!r} is not available in this build") from None
        raise


def load_method(
    name: str | None = None,
    *,
    artifact: str | Path | None = None,
    backbone: Any = None,
    model: str | None = None,
    suite: str = "minors",
    registry: Any = None,
    device: str = "cpu",
    dtype: str = "auto",
) -> Method:
    """Build a method by name (``None``: the method that wrote ``artifact``).

    Prompting methods need a backbone (or ``model``) and a registry (``registry``, else the built-in
    one named ``suite``); trained methods load
    their artifact and check it belongs to the backbone (the artifact's own model if none is given).
    """
    from ..backbone import load_backbone
    from ..policy import CategoryRegistry
    from .artifact import artifact_method

    if name is None:
        if artifact is None:
            raise MethodError("give a method name or an artifact")
        name = artifact_method(artifact)
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if name in PROMPTING:
        if artifact is not None:
            raise MethodError(f"method {name!r} takes no artifact")
        from .controlled_method import base_method, in_context_method

        backbone = backbone or load_backbone(model or "smollm2-135m-instruct", device=device, dtype=dtype)
        registry = registry or CategoryRegistry.load(suite)
        return (base_method if name == "none" else in_context_method)(backbone, registry)
    if artifact is None:
        raise MethodError(f"method {name!r} needs --artifact (train one with `mosaic train --method {name}`)")
    found = artifact_method(artifact)
    if found != name:
        raise MethodError(f"{artifact} is a {found!r} artifact, not {name!r}")
    if backbone is None:
        backbone = load_backbone(model or _artifact_model(artifact), device=device, dtype=dtype)
    return method_module(name).load(Path(artifact), backbone)


def _artifact_model(artifact: str | Path) -> str:
    """The model an artifact names, read before the artifact's own checks run (they need it loaded)."""
    from ..tokens import ArtifactError, load_manifest_json

    manifest, path = load_manifest_json(artifact)
    backbone = manifest.get("backbone") if isinstance(manifest, dict) else None
    name = backbone.get("name") if isinstance(backbone, dict) else None
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{path}: 'backbone' must be a mapping with the model's 'name'; give --model")
    return name
