"""``lora_sft``: the paper's SFT baseline, LoRA on the frozen backbone, the policy named in the system prompt.

The adapter learns from MOSAIC's own order-sampled data: the category's refusal template on
positives and the base model's greedy answer on negatives, with response-token cross-entropy. One
adapter serves every policy; the active categories reach it as their display names in the system
prompt (``system_template``), so the conditioning is text the adapter learns to read. The MOSAIC
paper does not say how its SFT baseline is conditioned on the policy (its §3.4); this is the
closest analogue of MOSAIC's composable tokens that a single adapter allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backbone import Backbone
from ..config import TrainConfig
from ..controlled import Prompt
from ..policy import Policy
from .base import Method
from .lora_common import LORA_OPTIONS, AdapterMethod, AdapterTrainer, Option, load_adapter, topics_rewrite

NAME = "lora_sft"
DEFAULT_TEMPLATE = "Restricted topics: {topics}."

OPTIONS: dict[str, Option] = {
    **LORA_OPTIONS,
    "system_template": Option(
        str, DEFAULT_TEMPLATE, lambda v: "{topics}" in v, "must contain the placeholder {topics}"
    ),
}


class SFTTrainer(AdapterTrainer):
    """Plain SFT; the policy reaches the adapter as topic names in the system prompt (``orpo`` reuses it)."""

    name = NAME
    schema = OPTIONS

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._rewrite = topics_rewrite(self.registry, self.options["system_template"])

    def rewrite(self, prompt: str, policy: Policy) -> Prompt:
        return self._rewrite(prompt, policy)[0]


RESUMABLE = True  # `mosaic train --resume` continues its epoch checkpoints


def train(
    config: TrainConfig,
    output: Path,
    reporter: Any = None,
    backbone: Backbone | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    return SFTTrainer(config, backbone=backbone, reporter=reporter).train(output, resume=resume)


def load(artifact: Path, backbone: Backbone) -> Method:
    return load_topics_adapter(artifact, backbone, NAME, OPTIONS)


def load_topics_adapter(artifact: Path, backbone: Backbone, name: str, schema: dict[str, Option]) -> Method:
    """An adapter artifact conditioned by the ``system_template`` topics prompt (``lora_sft``, ``orpo``)."""
    loaded = load_adapter(artifact, backbone, name, schema)
    rewrite = topics_rewrite(loaded.registry, loaded.options["system_template"])
    return AdapterMethod(
        name,
        loaded.model,
        loaded.base,
        loaded.registry,
        rewrite,
        loaded.identity,
        loaded.trainable,
        empty_to_base=loaded.options["empty_policy"] == "base",
    )
