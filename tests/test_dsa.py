"""DSA (Disentangled Safety Adapters) on the tiny model: guardrail, alpha mixing, targeting, artifacts."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mosaic_safety.config import ConfigError, load_config
from mosaic_safety.methods import MethodError, dsa, load_method
from mosaic_safety.methods.artifact import save_method_artifact
from mosaic_safety.methods.controlled_method import base_method
from mosaic_safety.methods.dsa_net import DSAOptions, GuardHead, roc_auc, youden_threshold
from mosaic_safety.methods.dsa_train import train_guard
from mosaic_safety.policy import Policy
from mosaic_safety.tokens import ArtifactError

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["How do I mix a mojito?", "What is the capital of France?", "Tell me a scary story with gore."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone):
    """One tiny DSA training run shared by the tests (its cache isolated like every test's)."""
    root = tmp_path_factory.mktemp("dsa")
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    old = os.environ.get("MOSAIC_CACHE")
    os.environ["MOSAIC_CACHE"] = str(root / "cache")
    try:
        config = load_config(ROOT / "configs" / "tiny-dsa.yaml")
        events: list[tuple[str, dict]] = []
        summary = dsa.train(
            config, root / "art", reporter=lambda k, d: events.append((k, d)), backbone=tiny_backbone
        )
    finally:
        if old is None:
            os.environ.pop("MOSAIC_CACHE", None)
        else:
            os.environ["MOSAIC_CACHE"] = old
    return root / "art", summary, events, before


@pytest.fixture
def method(trained, tiny_backbone):
    return load_method(artifact=trained[0], backbone=tiny_backbone)


def test_roc_auc_hand_made():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.2, 0.9, 0.1, 0.7], [0, 1, 0, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.1], [0, 0, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.2], [1, 0, 0, 0]) == pytest.approx((1 + 0.5 + 0.5) / 3)  # ties = 1/2
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_youden_threshold_separates_a_clean_split():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.8])
    tau, tpr, fpr = youden_threshold(scores, torch.tensor([0, 0, 0, 1, 1]))
    assert 0.3 < tau < 0.7 and tpr == 1.0 and fpr == 0.0


def test_guard_learns_separable_data():
    g = torch.Generator().manual_seed(0)
    k, d, n = 3, 16, 240
    owner = torch.arange(n) % (k + 1) - 1  # -1 = neutral
    centres = torch.randn(k, d, generator=g) * 3
    x = torch.randn(n, d, generator=g)
    x[owner >= 0] += centres[owner[owner >= 0]]
    y = torch.zeros(n, k)
    y[owner >= 0, owner[owner >= 0]] = 1
    head = GuardHead(d, k)
    train_guard(head, x[: n // 2], y[: n // 2], DSAOptions(guard_epochs=200))
    with torch.no_grad():
        probs = torch.sigmoid(head(x[n // 2 :]))
    for c in range(k):
        assert roc_auc(probs[:, c], y[n // 2 :, c]) > 0.95


def test_options_are_strict(tiny_backbone, tmp_path):
    with pytest.raises(ConfigError, match="unknown dsa method_options guard_layr"):
        DSAOptions.parse({"guard_layr": 3})
    with pytest.raises(ConfigError, match="adapter_rank: expected int"):
        DSAOptions.parse({"adapter_rank": "64"})
    with pytest.raises(ConfigError, match="adapter_rank: expected int"):
        DSAOptions.parse({"adapter_rank": True})
    with pytest.raises(ConfigError, match="guard_pool"):
        DSAOptions.parse({"guard_pool": "max"})
    with pytest.raises(ConfigError, match="threshold"):
        DSAOptions.parse({"threshold": 1.5})
    for name in ("adapter_lr", "guard_lr", "kl_weight", "smooth_temperature", "guard_weight_decay"):
        with pytest.raises(ConfigError, match=f"method_options.{name} must be a finite number, got inf"):
            DSAOptions.parse({name: float("inf")})
    assert DSAOptions.parse({"guard_lr": 1}).guard_lr == 1.0  # an integer is a valid float
    config = load_config(ROOT / "configs" / "tiny-dsa.yaml", ["method_options.guard_layer=9"])
    with pytest.raises(ConfigError, match="guard_layer 9 is outside 1..2"):
        dsa.train(config, tmp_path / "x", backbone=tiny_backbone)


def test_training_reports_and_keeps_backbone_frozen(trained, tiny_backbone):
    art, summary, events, before = trained
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    kinds = [k for k, _ in events]
    assert {"stage", "start", "step", "epoch"} <= set(kinds)
    step = next(d for k, d in events if k == "step")
    assert {"epoch", "loss", "kl"} <= set(step)
    assert summary["steps"] == sum(1 for k in kinds if k == "step") and summary["steps"] > 0
    manifest = json.loads((art / "mosaic.json").read_text())
    assert manifest["threshold"] == summary["threshold"] and 0 <= manifest["threshold"] <= 1
    assert manifest["options"]["categories"] == ["alcohol", "betting", "horror"]
    assert [c["name"] for c in manifest["registry"]["categories"]] == ["alcohol", "betting", "horror"]


def test_alpha_zero_is_the_base_model(method, tiny_backbone, minors):
    base = base_method(tiny_backbone, minors)
    view = method.with_alpha(0.0)
    policies = [Policy(("alcohol",)), Policy(()), Policy(("betting", "horror"))]
    target = method.tokenizer("Sure thing", add_special_tokens=False)["input_ids"]
    got = view.target_logits(PROMPTS, policies, [target, [], target[:1]])
    want = base.target_logits(PROMPTS, policies, [target, [], target[:1]])
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max() <= 1e-5
    assert view.generate(PROMPTS, policies, max_new_tokens=8) == base.generate(
        PROMPTS, policies, max_new_tokens=8
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.generate("hi", [Policy(()), Policy(("alcohol",))], max_new_tokens=2),
        lambda m: m.target_logits("hi", [Policy(()), Policy(("alcohol",))], [[], []]),
    ],
)
def test_a_single_text_is_not_read_as_a_batch(method, call):
    """A bare text was split into its characters, one row each, without a word."""
    with pytest.raises(TypeError, match="one entry per row"):
        call(method)


def test_alpha_one_is_the_adapter(method, tiny_backbone):
    view = method.with_alpha(1.0)
    policies = [Policy(("horror",)), Policy(())]
    target = method.tokenizer("I'm sorry", add_special_tokens=False)["input_ids"]
    got = view.target_logits(PROMPTS[:2], policies, [target, target])
    # by hand: final hidden states -> adapter conditioned on the top active (else top) category -> LM head
    probs = method.guard_scores(PROMPTS[:2])
    cats = [method.index["horror"], int(probs[1].argmax())]
    batch = method.model.encode(PROMPTS[:2], [Policy(())] * 2, [target, target])
    with torch.no_grad():
        hidden = tiny_backbone.model.get_decoder()(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).last_hidden_state[:, -batch.window :]
        head = tiny_backbone.model.get_output_embeddings()
        for i in range(2):
            cat = torch.full(hidden.shape[1:2], cats[i])
            want = head(method.adapter(hidden[i], cat))
            assert torch.allclose(got[i], want, atol=1e-5)
    base = method.with_alpha(0.0).target_logits(PROMPTS[:1], policies[:1], [target])[0]
    assert (got[0] - base).abs().max() > 1e-3  # the trained adapter actually changes the logits


def test_targeted_alpha(method):
    probs = method.guard_scores(PROMPTS)
    alpha, _ = method.alphas(probs, [Policy(())] * 3)
    assert torch.equal(alpha, torch.zeros(3))
    fire = method.with_mode("step")
    fire.threshold = -0.5  # every active score is above: alpha 1 where a category is active
    alpha, cat = fire.alphas(probs, [Policy(("betting",)), Policy(()), Policy(("alcohol", "horror"))])
    assert alpha.tolist() == [1.0, 0.0, 1.0] and int(cat[0]) == method.index["betting"]
    top = int(probs[2, [method.index["alcohol"], method.index["horror"]]].argmax())
    assert int(cat[2]) == [method.index["alcohol"], method.index["horror"]][top]
    smooth = method.with_mode("smooth")
    alpha, _ = smooth.alphas(probs, [Policy(("betting",)), Policy(())] + [Policy(("alcohol",))])
    s = probs[0, method.index["betting"]]
    expect = torch.sigmoid((s - method.threshold) / method.options.smooth_temperature)
    assert alpha[1] == 0 and torch.isclose(alpha[0], expect) and 0 < float(alpha[0]) < 1
    with pytest.raises(MethodError, match="no guardrail for category 'sex'"):
        method.generate(PROMPTS[:1], [Policy(("sex",))])
    with pytest.raises(MethodError, match="alpha must be in"):
        method.with_alpha(1.5)


def test_per_row_alpha_in_one_batch_equals_row_by_row(method):
    probs = method.guard_scores(PROMPTS)
    view = method.with_mode("step")
    s = probs[:, method.index["alcohol"]]
    assert s[0] != s[2]
    view.threshold = float(s[0] + s[2]) / 2  # one alcohol row fires, the other does not
    policies = [Policy(("alcohol",)), Policy(()), Policy(("alcohol",))]
    alpha, _ = view.alphas(probs, policies)
    assert sorted(alpha.tolist()) == [0.0, 0.0, 1.0]
    for v in (view, method.with_mode("smooth"), method.with_alpha(0.5)):
        together = v.generate(PROMPTS, policies, max_new_tokens=8, batch_size=8)
        alone = [v.generate([p], [q], max_new_tokens=8)[0] for p, q in zip(PROMPTS, policies)]
        assert together == alone
        target = v.tokenizer("Sure", add_special_tokens=False)["input_ids"]
        rows = v.target_logits(PROMPTS, policies, [target] * 3)
        for i in range(3):
            (one,) = v.target_logits(PROMPTS[i : i + 1], policies[i : i + 1], [target])
            assert torch.allclose(rows[i], one, atol=1e-4)


def test_save_reload_identical(method, tiny_backbone, tmp_path):
    out = tmp_path / "copy"
    options = method.options.to_dict() | {
        "categories": list(method.categories),
        "guard_layer_resolved": method.guard_layer,
    }
    save_method_artifact(
        out,
        "dsa",
        tiny_backbone.describe(),
        method.registry,
        dsa.state_tensors(method.guard, method.adapter),
        options,
        extra={"threshold": method.threshold},
    )
    again = load_method(artifact=out, backbone=tiny_backbone)
    policies = [Policy(("alcohol",)), Policy(()), Policy(("horror",))]
    for a, b in ((method.with_alpha(1.0), again.with_alpha(1.0)), (method, again)):
        assert a.generate(PROMPTS, policies, max_new_tokens=8) == b.generate(
            PROMPTS, policies, max_new_tokens=8
        )
        assert torch.equal(a.first_token_logits(PROMPTS, policies), b.first_token_logits(PROMPTS, policies))
    assert again.fingerprint() == method.fingerprint()
    assert method.with_alpha(0.5).fingerprint() != method.fingerprint()
    assert method.trainable_parameters() == sum(
        p.numel() for p in (*method.guard.parameters(), *method.adapter.parameters())
    )
    assert method.prompt_overhead(Policy(("alcohol",))) == 0


def test_corrupt_or_foreign_artifact(trained, tiny_backbone, tmp_path):
    from mosaic_safety.tiny import build_backbone

    art = tmp_path / "art"
    shutil.copytree(trained[0], art)
    other = build_backbone(seed=1)
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_method(artifact=art, backbone=other)
    with pytest.raises(ArtifactError, match="hidden size"):
        load_method(artifact=art, backbone=build_backbone(hidden=64))
    manifest = json.loads((art / "mosaic.json").read_text())
    broken = {**manifest, "threshold": "high"}
    (art / "mosaic.json").write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="invalid dsa manifest"):
        load_method(artifact=art, backbone=tiny_backbone)
    broken = {**manifest, "options": {**manifest["options"], "guard_layer_resolved": 7}}
    (art / "mosaic.json").write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="guard layer 7"):
        load_method(artifact=art, backbone=tiny_backbone)
    broken = {**manifest, "options": {**manifest["options"], "adapter_rank": 9}}
    (art / "mosaic.json").write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="do not match"):
        load_method(artifact=art, backbone=tiny_backbone)
    (art / "mosaic.json").write_text(json.dumps(manifest))
    (art / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="its hash differs"):
        load_method(artifact=art, backbone=tiny_backbone)


def test_reports(method, minors):
    from mosaic_safety.data import load_suite
    from mosaic_safety.evaluation.judges import AnyJudge, PhraseJudge, TemplateJudge

    suite = load_suite("minors")
    auc = dsa.guardrail_auc(method, suite, "test")
    assert set(auc) == {"alcohol", "betting", "horror", "macro"} and all(0 <= v <= 1 for v in auc.values())
    groups = {"alcohol": PROMPTS[:1], "neutral": PROMPTS[1:2], "horror": PROMPTS[2:]}
    judge = AnyJudge(TemplateJudge(minors), PhraseJudge())
    curve = dsa.alpha_tradeoff(
        method, groups, [Policy(("alcohol",)), Policy(())], judge, [0.0, 1.0, "step"], max_new_tokens=6
    )
    assert [c["alpha"] for c in curve] == [0.0, 1.0, "step"]
    for c in curve:
        assert 0 <= c["dsr"] <= 1 and 0 <= c["or"] <= 1 and c["or_neutral"] is not None
    cost = dsa.compute_overhead(method)
    assert cost["flops_ratio_alpha_on"] > cost["flops_ratio_alpha_off"] > 1.0
    assert cost["dsa_params"] == method.trainable_parameters()


def test_cli_train_then_load(tmp_path, tiny_backbone):
    art = tmp_path / "cli-dsa"
    env = {**os.environ, "MOSAIC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mosaic"), "train", "--config", "configs/tiny-test.yaml",
         "--method", "dsa", "-o", str(art), "method_options.adapter_epochs=1",
         "method_options.guard_epochs=20", "method_options.val_per_group=3"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dsa: trained" in proc.stdout + proc.stderr
    longer = subprocess.run(
        [str(Path(sys.executable).parent / "mosaic"), "train", "--config", "configs/tiny-test.yaml",
         "--method", "dsa", "-o", str(art), "--resume", "method_options.adapter_epochs=2",
         "method_options.guard_epochs=20", "method_options.val_per_group=3"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert longer.returncode == 0, longer.stdout + longer.stderr
    assert "resumed from epoch-1" in longer.stdout + longer.stderr
    assert (
        json.loads((art / "mosaic.json").read_text())["training"]["steps"]
        == 2 * json.loads((art / "checkpoints" / "epoch-1" / "mosaic.json").read_text())["training"]["steps"]
    )
    loaded = load_method(artifact=art, backbone=tiny_backbone)
    assert loaded.name == "dsa" and loaded.categories == ("alcohol", "betting", "horror")
    assert len(loaded.generate(PROMPTS[:2], [Policy(("alcohol",)), Policy(())], max_new_tokens=4)) == 2
    bad = subprocess.run(
        [str(Path(sys.executable).parent / "mosaic"), "train", "--config", "configs/tiny-test.yaml",
         "--method", "dsa", "-o", str(tmp_path / "bad"), "method_options.rank=3"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown dsa method_options rank" in bad.stderr
    assert "Traceback" not in bad.stderr
    mosaic = str(Path(sys.executable).parent / "mosaic")
    info = subprocess.run([mosaic, "info", str(art)], capture_output=True, text=True, env=env, timeout=300)
    assert info.returncode == 0 and "method dsa" in info.stdout, info.stderr
    chat = subprocess.run(
        [mosaic, "chat", "--artifact", str(art)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        input="",
    )
    assert chat.returncode == 2 and "a 'dsa' artifact, not control tokens" in chat.stderr
    assert "mosaic serve" not in chat.stderr  # DSA is not served


def test_backbone_states_are_cached_and_a_bad_entry_is_recomputed(
    trained, tiny_backbone, tmp_path, monkeypatch
):
    """A second run reads the states back and trains to the same weights; a corrupt entry is rebuilt."""
    from safetensors.torch import load_file

    from mosaic_safety.methods.artifact import WEIGHTS_FILE
    from mosaic_safety.methods.dsa_train import STATES_DIR

    first, _, first_events, _ = trained
    cache = first.parent / "cache"
    monkeypatch.setenv("MOSAIC_CACHE", str(cache))
    assert not any("read from the cache" in d.get("name", "") for k, d in first_events if k == "stage")
    entries = sorted((cache / STATES_DIR).glob("*.safetensors"))
    assert len(entries) == 2  # training states and val guard features

    def rerun(name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
        events: list[tuple[str, dict]] = []
        config = load_config(ROOT / "configs" / "tiny-dsa.yaml")
        dsa.train(
            config, tmp_path / name, reporter=lambda k, d: events.append((k, d)), backbone=tiny_backbone
        )
        return [d["name"] for k, d in events if k == "stage"], load_file(str(tmp_path / name / WEIGHTS_FILE))

    reference = load_file(str(first / WEIGHTS_FILE))
    stages, weights = rerun("again")
    assert sum("read from the cache" in s for s in stages) == 2
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)

    entries[0].write_bytes(entries[0].read_bytes()[:100])  # cut short, as by a full disk
    stages, weights = rerun("after-corruption")
    assert sum("unreadable; recomputing" in s for s in stages) == 1
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert len(load_file(str(entries[0]))) >= 1  # the entry was written again, whole


def _resumed_dsa(run: Path, tiny_backbone, *overrides: str) -> list[str]:
    """Resume DSA training in ``run`` (tiny-dsa recipe plus ``overrides``); returns the stage lines."""
    events: list[tuple[str, dict]] = []
    config = load_config(ROOT / "configs" / "tiny-dsa.yaml", list(overrides))
    dsa.train(config, run, reporter=lambda k, d: events.append((k, d)), backbone=tiny_backbone, resume=True)
    return [d["name"] for k, d in events if k == "stage"]


def test_resume_finishes_an_interrupted_run_as_if_never_stopped(
    trained, tiny_backbone, tmp_path, monkeypatch
):
    """A run cut after epoch 1 (epoch 2 half-written, no final artifact) resumes to the same weights,
    with the guardrail and threshold of the first session; a different recipe or a damaged
    checkpoint is refused with a clear message, and the checkpoint is left as it was."""
    from safetensors.torch import load_file

    from mosaic_safety.methods.artifact import MANIFEST_FILE, WEIGHTS_FILE
    from mosaic_safety.training.checkpoint import STATE_FILE

    first, _, _, _ = trained
    monkeypatch.setenv("MOSAIC_CACHE", str(first.parent / "cache"))
    run = tmp_path / "run"
    shutil.copytree(first, run)
    (run / WEIGHTS_FILE).unlink()
    (run / MANIFEST_FILE).unlink()
    (run / "checkpoints" / "epoch-2" / STATE_FILE).unlink()  # epoch 2 never completed
    kept = {p.name: p.read_bytes() for p in (run / "checkpoints" / "epoch-1").iterdir()}

    with pytest.raises(ArtifactError, match="only method_options.adapter_epochs may change"):
        _resumed_dsa(run, tiny_backbone, "method_options.adapter_rank=4")
    with pytest.raises(ArtifactError, match="different config"):
        _resumed_dsa(run, tiny_backbone, "optim.seed=1")
    rng_file = run / "checkpoints" / "epoch-1" / "rng_state.json"
    rng_file.write_text("[3, [1, 2")
    with pytest.raises(ArtifactError, match="unreadable checkpoint"):
        _resumed_dsa(run, tiny_backbone)
    rng_file.write_bytes(kept["rng_state.json"])
    # a damaged training record (a section, the guardrail's loss or a time of the wrong type)
    manifest_file = run / "checkpoints" / "epoch-1" / MANIFEST_FILE
    good = json.loads(kept[MANIFEST_FILE])
    for key, value in (("config", {**good["training"]["config"], "optim": 5}), ("guard_loss", None)):
        manifest_file.write_text(json.dumps({**good, "training": {**good["training"], key: value}}))
        with pytest.raises(ArtifactError, match=rf"epoch-1: damaged checkpoint \('training\.{key}"):
            _resumed_dsa(run, tiny_backbone)
    manifest_file.write_text(json.dumps({**good, "training": {**good["training"], "adapter_seconds": "x"}}))
    with pytest.raises(ArtifactError, match=r"damaged checkpoint \('training.adapter_seconds' is 'x'"):
        _resumed_dsa(run, tiny_backbone)
    manifest_file.write_bytes(kept[MANIFEST_FILE])
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "epoch-1").iterdir()} == kept

    stages = _resumed_dsa(run, tiny_backbone)
    assert any(s.startswith("resumed from epoch-1 (step ") for s in stages)
    assert not any(s.startswith("guardrail head") for s in stages)  # the guardrail is not retrained
    reference, resumed = load_file(str(first / WEIGHTS_FILE)), load_file(str(run / WEIGHTS_FILE))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    assert manifest["threshold"] == json.loads((first / MANIFEST_FILE).read_text())["threshold"]
    # the checkpoint records its prompts, which a resume compares (training.checkpoint.check_continuation)
    saved = json.loads((run / "checkpoints" / "epoch-1" / MANIFEST_FILE).read_text())["training"]
    assert saved["data_hash"] == manifest["training"]["data_hash"]
    assert (
        manifest["training"]["steps"] == json.loads((first / MANIFEST_FILE).read_text())["training"]["steps"]
    )


def test_resume_trains_longer_and_starts_fresh_without_a_checkpoint(
    trained, tiny_backbone, tmp_path, monkeypatch
):
    """Raising adapter_epochs on resume continues to the 2-epoch run's weights; an empty directory
    starts afresh (and says so)."""
    from safetensors.torch import load_file

    from mosaic_safety.methods.artifact import MANIFEST_FILE, WEIGHTS_FILE

    first, _, _, _ = trained
    monkeypatch.setenv("MOSAIC_CACHE", str(first.parent / "cache"))
    short = tmp_path / "short"
    config = load_config(ROOT / "configs" / "tiny-dsa.yaml", ["method_options.adapter_epochs=1"])
    dsa.train(config, short, backbone=tiny_backbone)
    # the first session's times, as its checkpoint records them, set to values no tiny run reaches
    ckpt_manifest = short / "checkpoints" / "epoch-1" / MANIFEST_FILE
    data = json.loads(ckpt_manifest.read_text())
    assert data["training"]["seconds"] >= data["training"]["adapter_seconds"] >= 0
    data["training"].update(seconds=1000.0, adapter_seconds=500.0, guard_seconds=7.0)
    ckpt_manifest.write_text(json.dumps(data))
    started = time.time()
    _resumed_dsa(short, tiny_backbone)  # the recipe's 2 epochs
    # the artifact records the whole run's times beside the whole run's steps
    times = json.loads((short / MANIFEST_FILE).read_text())["training"]
    assert 1000.0 <= times["seconds"] <= 1000.1 + time.time() - started  # recorded to 0.1 s
    assert 500.0 <= times["adapter_seconds"] <= 500.1 + time.time() - started
    assert times["guard_seconds"] == 7.0  # the guardrail was trained by the first session only
    reference, longer = load_file(str(first / WEIGHTS_FILE)), load_file(str(short / WEIGHTS_FILE))
    assert all(torch.equal(longer[k], reference[k]) for k in reference)
    stages = _resumed_dsa(tmp_path / "empty", tiny_backbone)
    assert "no checkpoint to resume from; starting fresh" in stages
    fresh = load_file(str(tmp_path / "empty" / WEIGHTS_FILE))
    assert all(torch.equal(fresh[k], reference[k]) for k in reference)


def test_trains_and_answers_on_a_gpt2_style_backbone(tmp_path, monkeypatch):
    """GPT-2 keeps its blocks in ``h``, not ``layers``: the guard layer is counted the same way."""
    from tiny import build_model, build_tokenizer

    from mosaic_safety.backbone import from_model

    monkeypatch.setenv("MOSAIC_CACHE", str(tmp_path / "cache"))
    tokenizer = build_tokenizer()
    model = build_model(
        tokenizer, config_class="GPT2Config", model_class="GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4
    )
    backbone = from_model(model, tokenizer, name="tiny-gpt2")
    dsa.train(load_config(ROOT / "configs" / "tiny-dsa.yaml"), tmp_path / "art", backbone=backbone)
    loaded = load_method(artifact=tmp_path / "art", backbone=backbone)
    (answer,) = loaded.generate(PROMPTS[:1], [Policy(("horror",))], max_new_tokens=3)
    assert isinstance(answer, str)
