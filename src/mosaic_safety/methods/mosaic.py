"""``mosaic``: learned control tokens (the method this library is about) behind the method interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backbone import Backbone
from .base import Method


def train(
    config: Any, output: Path, reporter: Any = None, backbone: Backbone | None = None
) -> dict[str, Any]:
    from ..training.trainer import Trainer

    trainer = Trainer(config, backbone=backbone, reporter=reporter)
    result = trainer.train(output)
    return {"steps": result.steps, "seconds": result.seconds, "final_loss": result.final_loss}


def load(artifact: Path, backbone: Backbone) -> Method:
    from .controlled_method import mosaic_method

    return mosaic_method(artifact, backbone)
