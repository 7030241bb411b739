"""Control-token artifacts: round trip, atomic writes, and every way a bad artifact must fail."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mosaic_safety.tokens import (
    ArtifactError,
    ControlTokens,
    init_from_text_tokens,
    read_manifest,
)


def test_init_from_description_is_in_embedding_span(tiny_backbone, tiny_tokens):
    emb = tiny_backbone.model.get_input_embeddings().weight
    for block in tiny_tokens.blocks.values():
        assert block.shape == (3, emb.shape[1]) and block.dtype == torch.float32
        assert block.norm(dim=-1).max() <= emb.norm(dim=-1).max() + 1e-5


def test_text_init_copies_the_description_token_rows(tiny_backbone, minors):
    emb = tiny_backbone.model.get_input_embeddings()
    tok = tiny_backbone.tokenizer
    tokens = ControlTokens.initialise(minors, emb, tok, m=4, init="text")
    cat = minors["alcohol"]
    ids = tok(f"{cat.display}: {cat.description}", add_special_tokens=False)["input_ids"]
    assert torch.equal(tokens.blocks["alcohol"], emb.weight[torch.tensor(ids[:4])].detach())
    short = tok("beer", add_special_tokens=False)["input_ids"]
    repeated = init_from_text_tokens(emb, tok, "beer", m=len(short) + 2)
    assert torch.equal(repeated, emb.weight[torch.tensor((short * 3)[: len(short) + 2])].detach())


def test_save_load_round_trip(tmp_path, tiny_backbone, tiny_tokens):
    out = tiny_tokens.save(tmp_path / "a", tiny_backbone.describe(), {"training": {"steps": 3}})
    tensors = load_file(str(out / "tokens.safetensors"))
    assert set(tensors) == {f"category.{c}" for c in tiny_tokens.categories}
    loaded = ControlTokens.load(out, tiny_backbone.describe())
    for name in tiny_tokens.categories:
        assert torch.equal(loaded.blocks[name], tiny_tokens.blocks[name].detach())
    manifest = read_manifest(out)
    assert manifest["composition_order"] == list(tiny_tokens.registry.names)
    assert manifest["backbone"]["fingerprint"] == tiny_backbone.fingerprint
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # the Backbone itself, as a user writes it, is checked as its describe() is: it was "not subscriptable"
    assert ControlTokens.load(str(out), tiny_backbone).categories == tiny_tokens.categories


def test_save_refuses_what_load_refuses_non_finite_tensors(tmp_path, tiny_backbone, tiny_tokens):
    """A diverged run's NaN tokens were written as an artifact that every loader then refused."""
    name = tiny_tokens.categories[0]
    with torch.no_grad():
        tiny_tokens.blocks[name][0, 0] = float("nan")
    with pytest.raises(ArtifactError, match=f"category.{name} contains NaN or infinite values, not saved"):
        tiny_tokens.save(tmp_path / "a", tiny_backbone.describe())
    assert not (tmp_path / "a" / "tokens.safetensors").exists()
    assert not (tmp_path / "a" / "mosaic.json").exists()


def test_save_keeps_other_files_in_the_directory(tmp_path, tiny_backbone, tiny_tokens):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train_log.jsonl").write_text("{}\n")
    tiny_tokens.save(tmp_path / "a", tiny_backbone.describe())
    tiny_tokens.save(tmp_path / "a", tiny_backbone.describe())
    assert (tmp_path / "a" / "train_log.jsonl").read_text() == "{}\n"


def write_tensors(artifact, tensors) -> None:
    """Replace an artifact's tensors as a deliberate edit would: the manifest's hash follows, so the
    checks below the hash are the ones tested."""
    import hashlib

    save_file(tensors, str(artifact / "tokens.safetensors"))
    manifest = json.loads((artifact / "mosaic.json").read_text())
    manifest["tokens_sha256"] = hashlib.sha256((artifact / "tokens.safetensors").read_bytes()).hexdigest()
    (artifact / "mosaic.json").write_text(json.dumps(manifest))


@pytest.fixture
def artifact(tmp_path, tiny_backbone, tiny_tokens):
    return tiny_tokens.save(tmp_path / "art", tiny_backbone.describe())


def test_wrong_backbone_is_rejected(artifact):
    from mosaic_safety.tiny import build_backbone

    other = build_backbone(seed=1)
    with pytest.raises(ArtifactError, match="fingerprint"):
        ControlTokens.load(artifact, other.describe())
    wider = build_backbone(hidden=64)
    with pytest.raises(ArtifactError, match="hidden size 32"):
        ControlTokens.load(artifact, wider.describe())


def test_corrupt_tensor_file(artifact):
    (artifact / "tokens.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="its hash differs"):
        ControlTokens.load(artifact)
    manifest = json.loads((artifact / "mosaic.json").read_text())
    del manifest["tokens_sha256"]  # as an artifact from before the hash was recorded
    (artifact / "mosaic.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        ControlTokens.load(artifact)


def test_corrupt_manifest(artifact):
    (artifact / "mosaic.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        ControlTokens.load(artifact)


def test_future_format_version(artifact):
    manifest = json.loads((artifact / "mosaic.json").read_text())
    manifest["format_version"] = 99
    (artifact / "mosaic.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99"):
        ControlTokens.load(artifact)


def test_non_finite_and_wrong_shape(artifact):
    tensors = load_file(str(artifact / "tokens.safetensors"))
    tensors["category.alcohol"][0, 0] = float("nan")
    write_tensors(artifact, tensors)
    with pytest.raises(ArtifactError, match="NaN"):
        ControlTokens.load(artifact)
    tensors["category.alcohol"] = torch.zeros(3, 7)
    write_tensors(artifact, tensors)
    with pytest.raises(ArtifactError, match=r"shape \(3, 7\)"):
        ControlTokens.load(artifact)
    del tensors["category.alcohol"]
    write_tensors(artifact, tensors)
    with pytest.raises(ArtifactError, match="missing"):
        ControlTokens.load(artifact)


def test_tensor_file_is_as_readable_as_the_manifest(artifact):
    """safetensors' save_file creates owner-only files: a server running as another user could read
    the manifest and not the tokens."""
    mode = (artifact / "mosaic.json").stat().st_mode & 0o777
    assert (artifact / "tokens.safetensors").stat().st_mode & 0o777 == mode


def test_tensors_from_another_save_are_refused(artifact, tiny_backbone, tiny_tokens, tmp_path):
    """A save killed between its two renames leaves new tensors beside the old manifest."""
    with torch.no_grad():
        tiny_tokens.blocks["alcohol"].add_(1.0)
    other = tiny_tokens.save(tmp_path / "other", tiny_backbone.describe())
    (artifact / "tokens.safetensors").write_bytes((other / "tokens.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="not the file mosaic.json was written with"):
        ControlTokens.load(artifact)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.__setitem__("format_version", True), "format version True"),
        (lambda m: m.__setitem__("format_version", 1.0), "format version 1.0"),
        (lambda m: m.__setitem__("backbone", "tiny"), "'backbone' must be a mapping"),
        (
            lambda m: m["backbone"].pop("fingerprint"),
            "'backbone' must be a mapping with the model's 'name' and 'fingerprint'",
        ),
        (lambda m: m["backbone"].pop("name"), "with the model's 'name'"),
        (lambda m: m["categories"][0].__setitem__("refusal", 5), "needs 'refusal', a text"),
        (lambda m: m.__setitem__("metrics", [1]), "'metrics' must be a mapping"),
        (
            lambda m: m["backbone"].__setitem__("hidden_size", "32"),
            "'hidden_size' must be a positive integer",
        ),
        (lambda m: m.__setitem__("registry", ["minors"]), "'registry' must be a mapping"),
        (lambda m: m["registry"].pop("name"), "'registry' must be a mapping with a 'name'"),
        (lambda m: m.__setitem__("categories", []), "'categories' must be a non-empty list"),
        (lambda m: m["categories"].__setitem__(0, "alcohol"), r"categories\[0\] must be a mapping"),
        (lambda m: m["categories"][0].pop("m"), "needs 'm', a positive integer, got None"),
        (lambda m: m["categories"][0].__setitem__("m", 0), "needs 'm', a positive integer, got 0"),
        (lambda m: m.__setitem__("composition_order", ["horror"]), "'composition_order' must list every"),
        (lambda m: m.__setitem__("training", []), "'training' must be a mapping"),
    ],
)
def test_malformed_manifest_fields_fail_clearly(artifact, change, message):
    manifest = json.loads((artifact / "mosaic.json").read_text())
    change(manifest)
    (artifact / "mosaic.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        ControlTokens.load(artifact)


def test_composition_order_survives_a_round_trip_in_a_registry_that_is_not_alphabetical(
    tmp_path, tiny_backbone, minors
):
    from mosaic_safety.policy import CategoryRegistry

    registry = CategoryRegistry("mine", tuple(minors[n] for n in ("sex", "betting", "alcohol")))
    tokens = ControlTokens.initialise(
        registry, tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer, m=2, init="vocab"
    )
    assert tokens.categories == ("sex", "betting", "alcohol")
    policy = registry.policy("alcohol,sex")
    assert policy.categories == ("sex", "alcohol")
    loaded = ControlTokens.load(tokens.save(tmp_path / "a", tiny_backbone.describe()))
    assert loaded.categories == ("sex", "betting", "alcohol") and loaded.registry.names == registry.names
    assert torch.equal(loaded.compose(loaded.registry.policy("alcohol,sex")), tokens.compose(policy).detach())
    # an artifact written before the category list kept that order: composition_order restores it
    manifest = json.loads((tmp_path / "a" / "mosaic.json").read_text())
    manifest["categories"] = sorted(manifest["categories"], key=lambda c: c["name"])
    (tmp_path / "a" / "mosaic.json").write_text(json.dumps(manifest))
    assert ControlTokens.load(tmp_path / "a").registry.names == ("sex", "betting", "alcohol")


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        ControlTokens.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no mosaic.json"):
        ControlTokens.load(tmp_path / "empty")


def test_compose_and_missing_category(tiny_backbone, minors):
    tokens = ControlTokens.initialise(
        minors,
        tiny_backbone.model.get_input_embeddings(),
        tiny_backbone.tokenizer,
        m=2,
        categories=["alcohol", "sex"],
    )
    assert tokens.compose(minors.policy("sex,alcohol")).shape == (4, 32)
    assert torch.equal(tokens.compose(minors.policy("sex,alcohol"))[:2], tokens.blocks["alcohol"])
    with pytest.raises(ArtifactError, match="no control tokens for horror"):
        tokens.compose(minors.policy("horror"))


def test_bad_init_arguments(tiny_backbone, minors):
    emb, tok = tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer
    with pytest.raises(ValueError, match="between 1 and 64"):
        ControlTokens.initialise(minors, emb, tok, m=0)
    with pytest.raises(ValueError, match="unknown init"):
        ControlTokens.initialise(minors, emb, tok, m=2, init="zeros")
    with pytest.raises(ValueError, match="unknown placement"):
        ControlTokens.initialise(minors, emb, tok, m=2, placement="suffix")


@pytest.fixture
def deep_artifact(tmp_path, tiny_backbone, minors):
    emb, tok = tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer
    tokens = ControlTokens.initialise(minors, emb, tok, m=3, deep_layers=1)
    with torch.no_grad():
        for offsets in tokens.deep.values():
            offsets.normal_()
    return tokens, tokens.save(tmp_path / "deep", tiny_backbone.describe())


def test_deep_offsets_start_at_zero_and_round_trip(tiny_backbone, minors, deep_artifact):
    fresh = ControlTokens.initialise(
        minors, tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer, m=3, deep_layers=1
    )
    assert all(o.shape == (1, 3, 32) and not o.any() for o in fresh.deep.values())
    assert fresh.num_parameters() == 2 * 5 * 3 * 32 and fresh.deep_layers == 1
    tokens, out = deep_artifact
    assert read_manifest(out)["deep_layers"] == 1
    assert set(load_file(str(out / "tokens.safetensors"))) == {
        f"{kind}.{c}" for kind in ("category", "deep") for c in tokens.categories
    }
    loaded = ControlTokens.load(out, tiny_backbone.describe())
    for name in tokens.categories:
        assert torch.equal(loaded.deep[name], tokens.deep[name].detach())
    policy = minors.policy("sex,alcohol")
    assert torch.equal(
        loaded.compose_deep(policy), torch.cat([tokens.deep["alcohol"], tokens.deep["sex"]], 1)
    )
    assert loaded.compose_deep(minors.policy("")) is None


def test_broken_deep_artifacts_fail_clearly(deep_artifact):
    _, out = deep_artifact
    path = out / "tokens.safetensors"
    good = load_file(str(path))
    for change, message in [
        (lambda t: t.pop("deep.horror"), "'deep.horror' is missing"),
        (lambda t: t.__setitem__("deep.horror", torch.zeros(2, 3, 32)), r"expected \(1, 3, 32\)"),
        (lambda t: t["deep.horror"].__setitem__((0, 0, 0), float("inf")), "NaN or infinite"),
    ]:
        tensors = {k: v.clone() for k, v in good.items()}
        change(tensors)
        write_tensors(out, tensors)
        with pytest.raises(ArtifactError, match=message):
            ControlTokens.load(out)
    write_tensors(out, good)
    manifest = json.loads((out / "mosaic.json").read_text())
    for layers, message in [("1", "non-negative integer"), (0, "unexpected tensors")]:
        (out / "mosaic.json").write_text(json.dumps(manifest | {"deep_layers": layers}))
        with pytest.raises(ArtifactError, match=message):
            ControlTokens.load(out)


def test_deep_offsets_must_cover_every_block(tiny_tokens, minors):
    blocks = {n: b.detach() for n, b in tiny_tokens.blocks.items()}
    with pytest.raises(ArtifactError, match="needs both for every category"):
        ControlTokens(minors, blocks, deep={"alcohol": torch.zeros(1, 3, 32)})
    with pytest.raises(ArtifactError, match="expected"):
        ControlTokens(minors, blocks, deep={n: torch.zeros(1, 2, 32) for n in blocks})


# -- tokens.py: behaviour a mutation audit found unpinned ------------------------------
def _rewrite_tensors(artifact, tensors) -> None:
    import hashlib

    save_file(tensors, str(artifact / "tokens.safetensors"))
    manifest = json.loads((artifact / "mosaic.json").read_text())
    manifest["tokens_sha256"] = hashlib.sha256((artifact / "tokens.safetensors").read_bytes()).hexdigest()
    (artifact / "mosaic.json").write_text(json.dumps(manifest))


def test_artifact_tensors_must_be_float32(tmp_path, tiny_backbone, tiny_tokens):
    artifact = tiny_tokens.save(tmp_path / "art", tiny_backbone.describe())
    tensors = load_file(str(artifact / "tokens.safetensors"))
    tensors["category.alcohol"] = tensors["category.alcohol"].half()
    _rewrite_tensors(artifact, tensors)
    with pytest.raises(ArtifactError, match="float32"):
        ControlTokens.load(artifact)


def test_text_init_shorter_than_m_repeats_the_whole_text(tiny_backbone):
    from mosaic_safety.tokens import init_from_text

    emb, tok = tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    rows = init_from_text(emb, tok, "ab", 5)
    vectors = emb.weight[torch.tensor(ids)].float()
    expected = torch.stack([vectors[0], vectors[1], vectors[0], vectors[1], vectors[0]])
    assert torch.allclose(rows, expected)
