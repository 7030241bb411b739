"""The method interface: none, in_context and mosaic on the tiny model; method artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from mosaic_safety.methods import MethodError, load_method
from mosaic_safety.methods.artifact import (
    artifact_method,
    load_method_artifact,
    read_secrets,
    save_method_artifact,
)
from mosaic_safety.methods.controlled_method import base_method, in_context_method, in_context_rules
from mosaic_safety.policy import Policy
from mosaic_safety.tokens import ArtifactError

PROMPTS = ["How do I mix a mojito?", "What is the capital of France?"]


@pytest.fixture
def mosaic_artifact(tmp_path, tiny_backbone, tiny_tokens):
    out = tmp_path / "art"
    tiny_tokens.save(out, tiny_backbone.describe())
    return out


def test_none_ignores_policy_and_equals_base(tiny_backbone, minors):
    from mosaic_safety.controlled import ControlledModel

    method = base_method(tiny_backbone, minors)
    assert not method.policy_dependent
    got = method.generate(PROMPTS, [Policy(("alcohol",)), Policy(())], max_new_tokens=6)
    want = ControlledModel(tiny_backbone).generate(PROMPTS, [None, None], max_new_tokens=6)
    assert got == want
    assert method.trainable_parameters() == 0
    assert method.prompt_overhead(Policy(("alcohol",))) == 0


@pytest.mark.parametrize("build", [base_method, in_context_method])
@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.generate("hi", [Policy(()), Policy(())], max_new_tokens=2),  # was rows "h" and "i"
        lambda m: m.target_logits("hi", [Policy(()), Policy(())], [[], []]),
        lambda m: m.first_token_logits("hi", [Policy(()), Policy(())]),
    ],
)
def test_a_single_text_is_not_read_as_a_batch(tiny_backbone, minors, build, call):
    """The rewrite turned a bare text into a list of its characters before the model's own check."""
    with pytest.raises(TypeError, match="one entry per row"):
        call(build(tiny_backbone, minors))


def test_in_context_rules_name_only_active_categories(tiny_backbone, minors):
    rules = in_context_rules(minors, Policy(("alcohol", "horror")))
    assert "alcohol" in rules and minors["horror"].refusal_text in rules
    assert minors["betting"].display not in rules
    method = in_context_method(tiny_backbone, minors)
    assert method.prompt_overhead(Policy(())) == 0
    assert method.prompt_overhead(Policy(("alcohol",))) > 20
    assert method.prompt_overhead(Policy(("alcohol", "horror"))) > method.prompt_overhead(
        Policy(("alcohol",))
    )


def test_a_hand_built_policy_is_rewritten_in_canonical_order(tiny_backbone, minors):
    """The rewriting methods list a policy's categories in the system prompt: a Policy built in
    another order, or with a name twice, must give the prompt its registry-ordered set gives."""
    method = in_context_method(tiny_backbone, minors)
    canonical = minors.policy("betting,horror")
    for hand_built in (Policy(("horror", "betting")), Policy(("betting", "horror", "horror"))):
        assert method._inputs(PROMPTS[:1], [hand_built]) == method._inputs(PROMPTS[:1], [canonical])
    with torch.no_grad():
        a = method.first_token_logits(PROMPTS[:1], [Policy(("horror", "betting"))])
        b = method.first_token_logits(PROMPTS[:1], [canonical])
    assert torch.equal(a, b)


def test_an_artifact_without_a_model_name_asks_for_one(tmp_path, mosaic_artifact):
    import shutil

    art = tmp_path / "unnamed"
    shutil.copytree(mosaic_artifact, art)
    manifest = json.loads((art / "mosaic.json").read_text())
    (art / "mosaic.json").write_text(json.dumps(manifest | {"backbone": "tiny-random-llama"}))
    with pytest.raises(
        ArtifactError, match="'backbone' must be a mapping with the model's 'name'; give --model"
    ):
        load_method(artifact=art)


def test_mosaic_method_logits_match_controlled_model(tiny_backbone, mosaic_artifact):
    method = load_method(artifact=mosaic_artifact, backbone=tiny_backbone)
    assert method.name == "mosaic" and method.trainable_parameters() == 5 * 3 * tiny_backbone.hidden_size
    policies = [Policy(("alcohol",)), Policy(("betting", "sex"))]
    first = method.first_token_logits(PROMPTS, policies)
    direct = method.model.next_token_logits(PROMPTS, policies)
    assert torch.allclose(first, direct, atol=1e-5)
    assert method.prompt_overhead(Policy(("betting", "sex"))) == 6
    # target logits: row j predicts target token j
    target = method.tokenizer("Sure thing", add_special_tokens=False)["input_ids"]
    (rows,) = method.target_logits(PROMPTS[:1], policies[:1], [target])
    assert rows.shape == (len(target) + 1, tiny_backbone.vocab_size)
    assert torch.allclose(rows[0], first[0], atol=1e-5)


def test_fingerprint_tracks_weights(tiny_backbone, tiny_tokens, tmp_path, minors):
    a = tmp_path / "a"
    tiny_tokens.save(a, tiny_backbone.describe())
    fp_a = load_method(artifact=a, backbone=tiny_backbone).fingerprint()
    with torch.no_grad():
        tiny_tokens.blocks["alcohol"].add_(1.0)
    tiny_tokens.save(a, tiny_backbone.describe())
    assert load_method(artifact=a, backbone=tiny_backbone).fingerprint() != fp_a
    assert (
        base_method(tiny_backbone, minors).fingerprint()
        != in_context_method(tiny_backbone, minors).fingerprint()
    )


def test_fingerprint_tracks_dtype(tiny_backbone, minors):
    """Cached evaluations of an fp32 backbone must not answer for the same weights in bf16."""
    import copy

    from mosaic_safety.backbone import from_model

    bf16 = from_model(
        copy.deepcopy(tiny_backbone.model).to(torch.bfloat16), tiny_backbone.tokenizer, tiny_backbone.name
    )
    assert base_method(bf16, minors).fingerprint() != base_method(tiny_backbone, minors).fingerprint()


def test_load_method_errors(tiny_backbone, tmp_path, mosaic_artifact):
    with pytest.raises(MethodError, match="unknown method 'lora'.*lora_sft"):
        load_method("lora", backbone=tiny_backbone)
    with pytest.raises(MethodError, match="needs --artifact"):
        load_method("mosaic", backbone=tiny_backbone)
    with pytest.raises(MethodError, match="takes no artifact"):
        load_method("none", artifact=mosaic_artifact, backbone=tiny_backbone)
    with pytest.raises(MethodError, match="is a 'mosaic' artifact, not 'lora_sft'"):
        load_method("lora_sft", artifact=mosaic_artifact, backbone=tiny_backbone)
    with pytest.raises(ArtifactError, match="not found"):
        load_method(artifact=tmp_path / "nope", backbone=tiny_backbone)


def test_method_artifact_roundtrip_and_validation(tmp_path, tiny_backbone, minors):
    out = tmp_path / "m"
    tensors = {"head.weight": torch.randn(4, 3)}
    save_method_artifact(
        out, "dsa", tiny_backbone.describe(), minors, tensors, {"alpha": 0.5}, secrets={"token": "s3cret"}
    )
    assert artifact_method(out) == "dsa"
    manifest, loaded, registry = load_method_artifact(out, "dsa", tiny_backbone.describe())
    assert manifest["options"] == {"alpha": 0.5} and registry.names == minors.names
    assert torch.equal(loaded["head.weight"], tensors["head.weight"])
    assert "s3cret" not in (out / "mosaic.json").read_text()
    assert read_secrets(out) == {"token": "s3cret"} and (out / "secrets.json").stat().st_mode & 0o077 == 0
    with pytest.raises(ArtifactError, match="not 'orpo'"):
        load_method_artifact(out, "orpo")
    other = {**tiny_backbone.describe(), "fingerprint": "0" * 16}
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_method_artifact(out, "dsa", other)
    good = (out / "weights.safetensors").read_bytes()
    (out / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="its hash differs"):  # another file than the manifest's
        load_method_artifact(out, "dsa")
    manifest = json.loads((out / "mosaic.json").read_text())
    (out / "mosaic.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "weights_sha256"}))
    with pytest.raises(ArtifactError, match="not a readable safetensors"):  # no hash: an older artifact
        load_method_artifact(out, "dsa")
    (out / "weights.safetensors").write_bytes(good)
    for key, value, message in [
        ("format_version", True, "format version True"),
        ("backbone", "tiny", "'backbone' must be a mapping"),
        ("registry", ["minors"], "'registry' must be a mapping"),
        ("options", [], "'options' must be a mapping"),
        ("tensors", {"head.weight": "4x3"}, "'tensors' must map each tensor's name to its shape"),
    ]:
        (out / "mosaic.json").write_text(json.dumps(manifest | {key: value}))
        with pytest.raises(ArtifactError, match=message):
            load_method_artifact(out, "dsa")
    save_method_artifact(
        out, "dsa", tiny_backbone.describe(), minors, {"head.weight": torch.full((4, 3), float("nan"))}
    )
    with pytest.raises(ArtifactError, match="NaN"):
        load_method_artifact(out, "dsa")
    manifest = json.loads((out / "mosaic.json").read_text())
    manifest["format_version"] = 99
    (out / "mosaic.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_method_artifact(out, "dsa")
