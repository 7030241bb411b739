"""The controlled model's invariants on tiny random models of other architectures than Llama.

Users bring Qwen, Gemma, Mistral, Phi, Granite, Cohere, OLMo, GPT-NeoX or GPT-2 backbones. Some
post-process the LM head's output in their forward (Gemma soft-caps it, Granite and Cohere scale
it), GPT-2 keeps its blocks in ``h``, and each builds its own caches. Each must give the base
model's logits and greedy text under the empty policy, keep rows independent, and train through
shared prompt heads with the full forward's values.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from test_controlled import PROMPTS, assert_rows_independent, base_greedy, base_logits, perturb
from tiny import build_model, build_tokenizer

from mosaic_safety.backbone import BackboneError, from_model, load_backbone
from mosaic_safety.controlled import ControlledModel, PlacementError
from mosaic_safety.policy import Policy
from mosaic_safety.tokens import ControlTokens
from mosaic_safety.training.head_cache import HeadCache
from mosaic_safety.training.teacher import BaseResponseCache

# (config class, model class, what this architecture needs or changes)
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 4}),
    # windows shorter than the prompts: keys leave the window (Gemma 2 attends eagerly, the others by SDPA)
    "gemma2-window": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 3}),
    "gemma3-window": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 3}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 3}),
}


def build(arch: str, tokenizer):
    config_class, model_class, extra = ARCHITECTURES[arch]
    return build_model(tokenizer, config_class=config_class, model_class=model_class, **extra)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_keeps_the_invariants(arch, tokenizer, minors):
    backbone = from_model(build(arch, tokenizer), tokenizer, name=f"tiny-{arch}")
    tokens = ControlTokens.initialise(
        minors, backbone.model.get_input_embeddings(), tokenizer, m=3, placement="user_end", deep_layers=1
    )
    cm = ControlledModel(backbone, tokens)

    # the empty policy: the base model's logits, and the same greedy text
    with torch.no_grad():
        logits = cm.forward(PROMPTS, [None] * len(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        ref = base_logits(backbone, prompt)
        assert (logits[i, -ref.shape[0] :] - ref).abs().max().item() <= 1e-5
    eos = tokenizer.eos_token_id
    for prompt, row in zip(PROMPTS, cm.generate_ids(PROMPTS, [""] * len(PROMPTS), max_new_tokens=5)):
        expected = base_greedy(backbone, prompt, 5)
        assert row == (expected[: expected.index(eos)] if eos in expected else expected)

    # active policies: rows independent of their batch, and training through shared prompt heads
    perturb(tokens, seed=1)
    with torch.no_grad():
        for offsets in tokens.deep.values():
            offsets.add_(torch.randn_like(offsets))
    assert_rows_independent(cm, minors)
    policies = [minors.policy("alcohol"), minors.policy("horror,sex"), Policy(())]
    targets = [[5, 6, 7], [9, 2], [11, 12]]
    full, labels = cm.response_logits(PROMPTS, policies, targets)
    shared, _ = cm.response_logits(PROMPTS, policies, targets, cm.prefill_heads(PROMPTS))
    assert (full - shared)[labels != -100].abs().max().item() <= 1e-5
    assert (full[0] - full[2]).abs().max().item() > 1e-3  # the tokens matter on this architecture

    # generation that runs each prompt's head once for several policies gives the plain path's text
    asked = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    under = [policies[0], policies[1], policies[2], policies[0]]
    for sampled in (False, True):  # the same seeded draws follow the logits closely: sampling shows more
        options = {"max_new_tokens": 12, "do_sample": sampled, "temperature": 2.0, "seed": 0}
        assert cm.generate_ids(asked, under, **options) == cm.generate_ids(
            asked, under, **options, share_heads=False
        )


def test_a_logits_step_not_known_fails_at_load(tokenizer, tmp_path):
    """A forward that changes the head's output in an unknown way is refused, not used silently."""

    class ShiftedLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + 1.0
            return out

    model = build_model(tokenizer)
    shifted = ShiftedLlama(model.config)
    shifted.load_state_dict(model.state_dict())
    with pytest.raises(BackboneError, match="does not reproduce"):
        from_model(shifted, tokenizer)

    class NoDecoderLlama(transformers.LlamaForCausalLM):  # get_decoder() falls back to the model itself
        def get_decoder(self):
            return self

    odd = NoDecoderLlama(model.config)
    odd.load_state_dict(model.state_dict())
    with pytest.raises(BackboneError, match="not supported: its decoder"):
        from_model(odd, tokenizer)

    # a known step wrongly configured for its architecture is caught the same way, through a real load
    model.config.final_logit_softcapping = 2.0  # Llama's forward has no soft-capping
    model.save_pretrained(tmp_path / "capped")
    tokenizer.save_pretrained(tmp_path / "capped")
    with pytest.raises(BackboneError, match=r"capped.*LlamaForCausalLM.*does not reproduce"):
        load_backbone(str(tmp_path / "capped"))


GEMMA2_LIKE = (  # Gemma 2's template refuses a system message
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DROPS_SYSTEM = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", [GEMMA2_LIKE, DROPS_SYSTEM], ids=["raises", "drops"])
def test_system_placement_without_a_system_turn_is_a_clear_error(template, minors):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    backbone = from_model(build_model(tokenizer), tokenizer)
    tokens = ControlTokens.initialise(minors, backbone.model.get_input_embeddings(), tokenizer, m=2)
    with pytest.raises(PlacementError, match="no system turn"):
        ControlledModel(backbone, tokens, placement="system").split_prompt("hi")
    head, rest = ControlledModel(backbone, tokens, placement="user_end").split_prompt("hi")
    assert head and rest  # the other placements work with the same template


@pytest.mark.parametrize(
    "arch, shares", [("gemma2-window", False), ("mistral-window", False), ("gemma2", True), ("llama", True)]
)
def test_base_answers_over_kept_heads_stay_within_the_window(arch, shares, tokenizer, tmp_path):
    """The teacher's answers, with training's kept prompt heads at hand, are the plain greedy ones,
    and it decodes over those heads only where no row reaches past an attention window.

    With ``user`` placement each row's tail holds its request, so tails differ in length and
    decoding over shared heads leaves padding between head and tail, which a window shorter than
    the row may count (Gemma 2's first logits moved by 0.3). Greedy text rarely shows such a shift,
    hence the check on which path ran.
    """
    model = build_model(tokenizer) if arch == "llama" else build(arch, tokenizer)
    cm = ControlledModel(from_model(model, tokenizer), placement="user")
    assert cm.sliding_window == {"gemma2-window": 3, "mistral-window": 3, "gemma2": 4096}.get(arch)
    prompts = [*PROMPTS, "hi", "another request about a scary story"]
    plain = BaseResponseCache(cm, tmp_path / "plain", max_new_tokens=12, batch_size=5)
    heads = HeadCache(cm, 2**30)
    heads.warm(prompts)
    over = BaseResponseCache(cm, tmp_path / "over", max_new_tokens=12, batch_size=5, heads=heads)
    assert plain.fill(prompts) == over.fill(prompts) == len(prompts)
    assert [over.get(p) for p in prompts] == [plain.get(p) for p in prompts]
    assert (heads.hits > 0) == shares
    span = cm.shared_span(prompts, [Policy(())] * len(prompts), 12)
    assert span > 3 and cm.heads_share_exactly(span) == shares


@pytest.mark.parametrize("arch", ["gemma2", "granite", "cohere"])
def test_known_logits_steps_pass_the_load_check_in_bfloat16(arch, tokenizer):
    """The check compares the same operations in the model's dtype, so bf16 is no false alarm."""
    model = build(arch, tokenizer).to(torch.bfloat16)
    backbone = from_model(model, tokenizer)
    cm = ControlledModel(backbone)
    with torch.no_grad():
        ours = cm.forward(PROMPTS[:1], [None])[0]
    ref = base_logits(backbone, PROMPTS[0])
    assert ours.dtype == torch.bfloat16
    # one bf16 step at these magnitudes at most (kernels may differ between the two paths on some
    # CPUs); a missing cap or scale moves these logits by 0.3 to 5
    torch.testing.assert_close(ours[-ref.shape[0] :], ref, rtol=0, atol=0.05)


def test_devices_and_dtypes_that_cannot_work_here_are_clear_errors():
    from mosaic_safety.backbone import BackboneError, load_backbone, resolve_device

    with pytest.raises(BackboneError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="CUDA is not available"):
            load_backbone("tiny-random-llama", device="cuda")
    with pytest.raises(BackboneError, match="unknown dtype 'float16'"):
        load_backbone("tiny-random-llama", dtype="float16")


def test_a_model_path_that_does_not_exist_is_a_clear_error_as_a_path_too(tmp_path):
    """A ``Path`` failed with "'PosixPath' object has no attribute 'count'"."""
    from pathlib import Path

    from mosaic_safety.backbone import BackboneError, load_backbone

    for spec in (str(tmp_path / "missing"), Path(tmp_path / "missing")):
        with pytest.raises(BackboneError, match="not found"):
            load_backbone(spec)
