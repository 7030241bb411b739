"""mosaic-safety: composable per-request safety policies for frozen causal LMs (MOSAIC control tokens).

The public API is imported lazily, so ``import mosaic_safety`` (and the CLI's start-up) does not pay
for torch and transformers until something that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Backbone": "backbone",
    "load_backbone": "backbone",
    "BackboneError": "backbone",
    "Category": "policy",
    "CategoryRegistry": "policy",
    "Policy": "policy",
    "PolicyError": "policy",
    "ControlTokens": "tokens",
    "ArtifactError": "tokens",
    "ControlledModel": "controlled",
    "GenerationError": "controlled",
    "PlacementError": "controlled",
    "TrainConfig": "config",
    "ConfigError": "config",
    "load_config": "config",
    "Trainer": "training.trainer",
    "load_suite": "data",
    "DataError": "data",
    "Suite": "data",
    "Example": "data",
    "Method": "methods",
    "load_method": "methods",
    "MethodError": "methods",
    "EvalPlan": "evaluation.protocol",
    "evaluate": "evaluation.protocol",
    "build_judge": "evaluation.judges",
}

__all__ = ["__version__", *_EXPORTS]


def __dir__() -> list[str]:
    """The lazy exports too, so that tab completion (``mosaic_safety.<TAB>``) offers them."""
    return sorted({*globals(), *_EXPORTS})


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mosaic_safety' has no attribute {name!r}")
