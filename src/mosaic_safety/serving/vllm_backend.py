"""Scale-out on vLLM: send MOSAIC's composed prompt embeddings to vLLM as ``prompt_embeds``.

The control tokens are vectors in the model's input-embedding space, so a frozen model served by
vLLM can apply them without any change to vLLM: compose the embedded, chat-templated prompt with
the policy's control vectors spliced in (exactly what ``ControlledModel.encode`` feeds the HF
model for a batch of one, positions ``0..L-1``), and pass that ``(L, d)`` tensor as the request's
``prompt_embeds``. vLLM then brings paged attention, continuous batching and tensor parallelism;
every request still carries its own policy.

Two ways to reach vLLM (both need vLLM ≥ 0.9 with prompt-embeds support):

- ``VLLMOfflineBackend``: an in-process ``vllm.LLM(model, enable_prompt_embeds=True)``.
- ``VLLMServerBackend``: a running ``vllm serve MODEL --enable-prompt-embeds``; the tensor travels
  base64-encoded (``torch.save`` format) in the Completions API's ``prompt_embeds`` field.

vllm is imported lazily, so this module loads (and its composition is testable) without it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import torch

from ..controlled import ControlledModel, Prompt
from ..policy import Policy


def compose_prompt_embeds(
    model: ControlledModel, prompt: Prompt, policy: Policy | Sequence[str] | None
) -> torch.Tensor:
    """The ``(L, d)`` input embeddings of one request: templated prompt + the policy's control vectors.

    A batch of one has no padding and positions ``0..L-1``, which is what vLLM assumes for
    ``prompt_embeds``; so this is exactly the HF model's input for that request.
    """
    if model.tokens is not None and model.tokens.deep_layers:
        raise ValueError(
            "deep control tokens add offsets inside the decoder layers, which prompt embeddings cannot "
            "carry; serve this artifact with the built-in server (mosaic serve), not vLLM"
        )
    with torch.no_grad():
        batch = model.encode([prompt], [model.policy(policy)])
    if not bool(batch.attention_mask.all()):  # cannot happen for a batch of one; guard the invariant
        raise RuntimeError("a single-row batch must not be padded")
    return batch.inputs_embeds[0].detach().to("cpu").contiguous()


def embeds_to_base64(embeds: torch.Tensor) -> str:
    """Serialise for the vLLM OpenAI server's ``prompt_embeds`` field (``torch.save`` + base64)."""
    buffer = io.BytesIO()
    torch.save(embeds, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def embeds_from_base64(data: str) -> torch.Tensor:
    """The inverse of ``embeds_to_base64`` (what the vLLM server does on receipt)."""
    return torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True)


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:  # an optional dependency: say how to get it
        raise ImportError(
            "the vLLM backend needs vllm (GPU machine): pip install 'vllm>=0.9' in an environment whose "
            "torch matches vllm's pin; see docs/serving.md"
        ) from exc
    return vllm


class VLLMOfflineBackend:
    """Generate with an in-process ``vllm.LLM``; one ``prompt_embeds`` request per (prompt, policy)."""

    def __init__(self, controlled: ControlledModel, model_path: str, **llm_kwargs: Any):
        vllm = _require_vllm()
        self.controlled = controlled
        self.llm = vllm.LLM(model=model_path, enable_prompt_embeds=True, **llm_kwargs)
        self._sampling = vllm.SamplingParams

    def generate(
        self,
        prompts: Sequence[Prompt],
        policies: Sequence[Any],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> list[str]:
        inputs = [
            {"prompt_embeds": compose_prompt_embeds(self.controlled, p, q).to(self.controlled.model.dtype)}
            for p, q in zip(prompts, policies)
        ]
        params = self._sampling(max_tokens=max_new_tokens, temperature=temperature)
        outputs = self.llm.generate(inputs, params)
        return [out.outputs[0].text for out in outputs]


class VLLMServerBackend:
    """Generate through a running vLLM OpenAI server started with ``--enable-prompt-embeds``."""

    def __init__(self, controlled: ControlledModel, base_url: str, model: str, api_key: str = "EMPTY"):
        from openai import OpenAI

        self.controlled = controlled
        self.client = OpenAI(base_url=base_url, api_key=api_key)
        self.model = model

    def request(
        self, prompt: Prompt, policy: Any, max_new_tokens: int = 64, temperature: float = 0.0
    ) -> dict:
        """The Completions request body (without ``model``) that carries one policy-conditioned prompt."""
        embeds = compose_prompt_embeds(self.controlled, prompt, policy)
        return {
            "prompt": "",
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "extra_body": {"prompt_embeds": embeds_to_base64(embeds)},
        }

    def generate(
        self,
        prompts: Sequence[Prompt],
        policies: Sequence[Any],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> list[str]:
        out = []
        for p, q in zip(prompts, policies):
            resp = self.client.completions.create(
                model=self.model, **self.request(p, q, max_new_tokens, temperature)
            )
            out.append(resp.choices[0].text)
        return out
