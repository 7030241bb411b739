"""A causal LM's logits from its final hidden states, as the model's own forward computes them.

mosaic-safety applies the LM head itself: on contiguous states (the model's ``logits_to_keep``
slices them with a stride, which is slow on CPU), on the target positions of a training batch, and
on DSA's mixed states. Some architectures change the head's output in their forward: Gemma 2 and 3
soft-cap it (``final_logit_softcapping``), Cohere multiplies it by ``logit_scale``, Granite divides
it by ``logits_scaling``. Without the same step the empty policy would not give the base model's
distribution. Greedy text would survive, because each of these maps is monotonic, but sampling,
the KL objective and every reported probability would not.

:func:`logits_mismatch` compares this path with the model's own forward on a few tokens. The
backbone runs it once at load (``backbone.py``), so an architecture with a step not known here
fails with a clear message instead of training against the wrong distribution.
"""

from __future__ import annotations

from typing import Any

import torch

# the largest difference, relative to the largest logit, that counts as the same logits: the two
# paths run the same operations on the same states, so they agree to float rounding, or to a step
# of a 16-bit dtype where a model's forward does its last step in float32. A missing cap or scale
# moves logits by a factor, far past either.
RELATIVE_TOLERANCE = 1e-4


def output_logits(lm: Any, states: torch.Tensor) -> torch.Tensor:
    """The LM head of ``lm`` on final hidden states ``(..., d)``, with its architecture's final step."""
    logits = lm.get_output_embeddings()(states)
    config = lm.config.get_text_config()  # a multimodal model's language settings
    scaling = getattr(config, "logits_scaling", None)  # Granite
    if scaling is not None and scaling != 1:
        logits = logits / scaling
    scale = getattr(config, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 and 3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def margin_over_rivals(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How far ``logits`` ``(..., V)`` put each ``labels`` token ``(...)`` above every other token.

    Greedy decoding picks the label exactly where this is positive, so it scores a decision (a
    refusal's first token, a base answer kept) on the scale greedy text sees; the margin hinge and
    the analysis scripts share it. Labels of -100 (ignored positions) are read as token 0.
    """
    z = logits.float()
    index = labels.clamp(min=0).unsqueeze(-1)
    target = z.gather(-1, index).squeeze(-1)
    rival = z.scatter(-1, index, float("-inf")).amax(-1)
    return target - rival


@torch.no_grad()
def logits_mismatch(lm: Any, ids: list[int]) -> str | None:
    """``None`` where :func:`output_logits` gives ``lm``'s own logits for ``ids``; else what differs."""
    input_ids = torch.tensor([ids], device=lm.device)
    reference = lm(input_ids=input_ids).logits.float()
    states = getattr(lm.get_decoder()(input_ids=input_ids), "last_hidden_state", None)
    if states is None:
        return "its decoder (get_decoder()) gives no final hidden states to apply the LM head to"
    ours = output_logits(lm, states).float()
    if ours.shape != reference.shape:
        shapes = f"{tuple(ours.shape)} against its forward's {tuple(reference.shape)}"
        return f"the LM head on its final states gives logits of shape {shapes}"
    difference = float((ours - reference).abs().max()) / (1.0 + float(reference.abs().max()))
    if difference <= max(RELATIVE_TOLERANCE, 2 * torch.finfo(states.dtype).eps):
        return None
    return (
        f"its forward changes the LM head's output in a way mosaic-safety does not reproduce (largest "
        f"relative difference {difference:.2g}); known are Gemma's final_logit_softcapping, Cohere's "
        "logit_scale and Granite's logits_scaling"
    )
