"""The vLLM backend's embedding composition, on CPU: the tensors sent as ``prompt_embeds`` equal what
``ControlledModel`` feeds the HF model, and decoding from them alone reproduces its output.

vLLM itself cannot run here (no GPU; its wheels pin their own CUDA torch), so the last step, vLLM
consuming the tensor, is not exercised; see docs/serving.md.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mosaic_safety.controlled import ControlledModel
from mosaic_safety.policy import Policy
from mosaic_safety.serving.vllm_backend import (
    VLLMOfflineBackend,
    compose_prompt_embeds,
    embeds_from_base64,
    embeds_to_base64,
)

PROMPTS = [
    "What is 17 times 23?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
]
POLICIES = [Policy(()), Policy(("alcohol",)), Policy(("betting", "horror", "sex"))]


@pytest.fixture(params=["prefix", "user_end"])
def cm(request, tiny_backbone, tiny_tokens):
    return ControlledModel(tiny_backbone, tiny_tokens, placement=request.param)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("policy", POLICIES)
def test_composed_embeds_are_the_hf_input(cm, prompt, policy):
    embeds = compose_prompt_embeds(cm, prompt, policy)
    head, tail = cm.split_prompt(prompt)
    table = cm.model.get_input_embeddings()
    block = cm.tokens.compose(policy) if policy else torch.zeros(0, embeds.shape[1])
    want = torch.cat(
        [table(torch.tensor(head, dtype=torch.long)), block, table(torch.tensor(tail, dtype=torch.long))]
    ).detach()
    assert embeds.shape == (len(head) + block.shape[0] + len(tail), cm.backbone.hidden_size)
    assert torch.equal(embeds, want)
    # the same rows ControlledModel puts in a padded batch, wherever the padding lands
    batch = cm.encode([prompt, "a much longer prompt " * 5], [policy, Policy(("sex",))])
    n = embeds.shape[0]
    assert torch.equal(batch.inputs_embeds[0, -n:].detach(), embeds)
    assert batch.position_ids[0, -n:].tolist() == list(range(n))  # vLLM's positions for prompt_embeds


@pytest.mark.parametrize("policy", POLICIES)
def test_decoding_from_prompt_embeds_alone_reproduces_generate(cm, policy):
    """What vLLM does with the tensor: prefill on it (positions 0..L-1), then greedy token by token."""
    prompt = "Plan a trip to Lisbon for three days."
    embeds = compose_prompt_embeds(cm, prompt, policy)
    (want,) = cm.generate_ids([prompt], [policy], max_new_tokens=8)
    with torch.no_grad():
        out = cm.model(inputs_embeds=embeds[None], use_cache=True)
        got = []
        for _ in range(8):
            token = int(out.logits[0, -1].argmax())
            if token in cm.eos_ids:
                break
            got.append(token)
            out = cm.model(
                input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
            )
    assert got == want


def test_server_payload_round_trips(cm):
    embeds = compose_prompt_embeds(cm, "hi", Policy(("alcohol", "sex")))
    assert torch.equal(embeds_from_base64(embeds_to_base64(embeds)), embeds)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_backend_without_vllm_says_how_to_get_it(cm):
    with pytest.raises(ImportError, match="needs vllm"):
        VLLMOfflineBackend(cm, "some/model")


def test_deep_tokens_are_refused_by_the_vllm_path(tiny_backbone, minors):
    """Offsets inside the layers cannot travel as prompt embeddings: a clear error, not a silent drop."""
    from mosaic_safety.tokens import ControlTokens

    deep = ControlTokens.initialise(
        minors, tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer, m=3, deep_layers=1
    )
    with pytest.raises(ValueError, match=r"deep control tokens.*\(mosaic serve\)"):
        compose_prompt_embeds(ControlledModel(tiny_backbone, deep), "hi", Policy(("alcohol",)))
