"""The LoRA baselines on the tiny model: lora_sft, orpo and magic_token train, save, reload and generate.

Every method is trained for real (a few dozen steps on the tiny random Llama) through the same code
path as ``mosaic train --method NAME``; the shared session backbone must come out bitwise unchanged.
"""

from __future__ import annotations

import json
import math
import os
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mosaic_safety.config import ConfigError, load_config
from mosaic_safety.controlled import ControlledModel
from mosaic_safety.methods import MethodError, load_method, method_module
from mosaic_safety.methods.artifact import SECRETS_FILE, WEIGHTS_FILE, read_secrets
from mosaic_safety.methods.lora_common import AdapterMethod, adapted_copy, parse_options
from mosaic_safety.methods.orpo import log_odds, orpo_loss
from mosaic_safety.policy import Policy, PolicyError
from mosaic_safety.tokens import MANIFEST_FILE, ArtifactError

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny-test.yaml")
PROMPTS = ["How do I mix a mojito?", "What is the capital of France?", "Best poker strategy?"]
METHODS = [
    ("lora_sft", ()),
    ("orpo", ()),
    ("magic_token", ()),
    ("magic_token", ("method_options.mode=three_modes", "sampling.per_subset=2")),  # 3 rows per item
]


def _config(name: str, *overrides: str):
    return load_config(TINY, [f"method={name}", "optim.epochs=3", "optim.lr=0.01", *overrides])


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _key(name: str, overrides: tuple[str, ...]) -> str:
    return name + ("-three" if overrides else "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_backbone):
    """Each method trained once on the shared tiny backbone: (artifact, summary, events)."""
    root = tmp_path_factory.mktemp("lora")
    before = _snapshot(tiny_backbone.model)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOSAIC_CACHE", str(root / "cache"))
        for name, overrides in METHODS:
            events: list[tuple[str, dict]] = []
            art = root / _key(name, overrides)
            summary = method_module(name).train(
                _config(name, *overrides),
                art,
                reporter=lambda k, d, events=events: events.append((k, d)),
                backbone=tiny_backbone,
            )
            out[_key(name, overrides)] = (art, summary, events)
    out["before"] = before
    return out


@pytest.mark.parametrize("name,overrides", METHODS, ids=[_key(*m) for m in METHODS])
def test_trains_with_progress_events_and_loss_decreases(runs, name, overrides):
    art, summary, events = runs[_key(name, overrides)]
    kinds = [k for k, _ in events]
    for kind in ("stage", "budgets", "teacher", "start", "step", "epoch"):
        assert kind in kinds, kind
    steps = [d for k, d in events if k == "step"]
    assert len(steps) == summary["steps"] == next(d for k, d in events if k == "start")["total_steps"]
    assert all({"step", "epoch", "loss", "kl"} <= set(d) for d in steps)
    by_epoch: dict[int, list[float]] = {}
    for d in steps:
        by_epoch.setdefault(d["epoch"], []).append(d["loss"])
    first, last = statistics.mean(by_epoch[1]), statistics.mean(by_epoch[max(by_epoch)])
    assert last < 0.95 * first, (first, last)
    assert all(math.isfinite(d["loss"]) for d in steps)
    assert (art / "train_log.jsonl").read_text().strip()
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    assert manifest["method"] == name and manifest["options"]["lora_r"] == 8
    assert manifest["training"]["steps"] == summary["steps"]
    assert all(".lora_A." in k or ".lora_B." in k for k in manifest["tensors"])


def test_shared_backbone_is_untouched(runs, tiny_backbone):
    after = _snapshot(tiny_backbone.model)
    assert after.keys() == runs["before"].keys()  # no LoRA modules injected into the shared model
    assert all(torch.equal(after[k], runs["before"][k]) for k in after)
    assert not any("lora" in n for n, _ in tiny_backbone.model.named_modules())
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


@pytest.mark.parametrize("name,overrides", METHODS, ids=[_key(*m) for m in METHODS])
def test_reload_is_deterministic_and_base_logits_unchanged(runs, tiny_backbone, name, overrides):
    art = runs[_key(name, overrides)][0]
    base = ControlledModel(tiny_backbone)
    ref = base.next_token_logits(PROMPTS, [None] * 3)
    a = load_method(artifact=art, backbone=tiny_backbone)
    b = load_method(name, artifact=art, backbone=tiny_backbone)
    assert torch.equal(base.next_token_logits(PROMPTS, [None] * 3), ref)  # loading did not alter the base
    policies = [Policy(("alcohol",)), Policy(("alcohol", "betting")), Policy(("horror",))]
    assert torch.equal(a.first_token_logits(PROMPTS, policies), b.first_token_logits(PROMPTS, policies))
    assert a.generate(PROMPTS, policies, max_new_tokens=6) == b.generate(PROMPTS, policies, max_new_tokens=6)
    assert a.fingerprint() == b.fingerprint()
    # the adapter changes the adapted rows' logits (it learnt something), not the base model's
    adapted = a.first_token_logits(PROMPTS, policies)
    assert not torch.allclose(adapted, ref, atol=1e-4)


def test_kl_to_base_compares_with_the_model_without_the_adapter(runs, tiny_backbone):
    """`mosaic eval --kl-prompts` measures a method against the frozen model. A LoRA method's own
    backbone carries the adapter: measured against it, its KL to base came out too low."""
    from mosaic_safety.evaluation.utility import kl_to_base
    from mosaic_safety.methods.controlled_method import reference_method

    art = runs[_key("lora_sft", ())][0]
    method = load_method(artifact=art, backbone=tiny_backbone)
    reference = reference_method(method)
    frozen = ControlledModel(tiny_backbone)
    assert torch.equal(
        reference.first_token_logits(PROMPTS, [Policy(())] * 3), frozen.next_token_logits(PROMPTS, [None] * 3)
    )
    assert not torch.equal(
        reference.first_token_logits(PROMPTS, [Policy(())] * 3),
        method.model.next_token_logits(PROMPTS, [None] * 3),
    )
    assert kl_to_base(method, reference, PROMPTS, Policy(("alcohol",)), 4)["mean_per_token"] > 0


def test_reloaded_logits_match_the_trained_model(tmp_path, tiny_backbone, monkeypatch):
    from mosaic_safety.methods.lora_sft import SFTTrainer

    monkeypatch.setenv("MOSAIC_CACHE", str(tmp_path / "cache"))
    trainer = SFTTrainer(_config("lora_sft", "optim.epochs=1"), backbone=tiny_backbone)
    trainer.train(tmp_path / "art")
    method = load_method(artifact=tmp_path / "art", backbone=tiny_backbone)
    policy = Policy(("alcohol", "horror"))
    prompt = trainer.rewrite(PROMPTS[0], policy)
    want = trainer.model.next_token_logits([prompt], [None])
    assert torch.allclose(method.first_token_logits(PROMPTS[:1], [policy]), want, atol=1e-5)


@pytest.mark.parametrize("name,overrides", METHODS, ids=[_key(*m) for m in METHODS])
def test_policy_interface(runs, tiny_backbone, minors, name, overrides):
    method = load_method(artifact=runs[_key(name, overrides)][0], backbone=tiny_backbone)
    assert isinstance(method, AdapterMethod) and method.policy_dependent and method.has_logits
    # trainable parameters = LoRA r=8 on q and v of the 2 tiny layers (d=32, kv width 16)
    assert method.trainable_parameters() == 2 * (8 * (32 + 32) + 8 * (32 + 16))
    # empty policy: served by the untouched base model
    base = ControlledModel(tiny_backbone).generate(PROMPTS, [None] * 3, max_new_tokens=6)
    assert method.generate(PROMPTS, [Policy(())] * 3, max_new_tokens=6) == base
    assert method.prompt_overhead(Policy(())) == 0
    one, two = (
        method.prompt_overhead(Policy(("alcohol",))),
        method.prompt_overhead(Policy(("alcohol", "horror"))),
    )
    assert one > 0 and (two == one if overrides else two > one)  # three modes: one token for any policy
    # mixed batch: rows do not depend on their neighbours
    mixed = [Policy(()), Policy(("betting",)), Policy(("alcohol", "horror"))]
    together = method.generate(PROMPTS, mixed, max_new_tokens=6)
    alone = [method.generate([p], [q], max_new_tokens=6)[0] for p, q in zip(PROMPTS, mixed)]
    assert together == alone
    target = method.tokenizer("Sure thing", add_special_tokens=False)["input_ids"]
    rows = method.target_logits(PROMPTS[:2], mixed[1:], [target, []])
    assert rows[0].shape == (len(target) + 1, tiny_backbone.vocab_size) and rows[1].shape[0] == 1
    first = method.first_token_logits(PROMPTS[:2], mixed[1:])
    assert torch.allclose(rows[0][0], first[0], atol=1e-4) and torch.allclose(
        rows[1][-1], first[1], atol=1e-4
    )
    with pytest.raises(PolicyError, match="unknown category 'sex'"):  # trained on alcohol, betting, horror
        method.generate(PROMPTS[:1], [minors.policy("sex")])
    with pytest.raises(ValueError):
        method.generate(PROMPTS, [Policy(())])


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.generate("hi", [Policy(()), Policy(("alcohol",))], max_new_tokens=2),
        lambda m: m.target_logits("hi", [Policy(()), Policy(("alcohol",))], [[], []]),
    ],
)
def test_a_single_text_is_not_read_as_a_batch(tiny_backbone, minors, call):
    """Rows are routed to the base or the adapted model as lists: "hi" was answered as "h" and "i"."""
    model = ControlledModel(tiny_backbone)  # no adapter needed: the text is refused before any forward
    method = AdapterMethod("lora_sft", model, model, minors, lambda p, q: (p, Policy(())), {}, trainable=0)
    with pytest.raises(TypeError, match="one entry per row"):
        call(method)


def test_lora_sft_names_active_categories_in_system_prompt(runs, tiny_backbone, minors):
    method = load_method(artifact=runs["lora_sft"][0], backbone=tiny_backbone)
    (messages,), _ = method._inputs(["hi"], [Policy(("alcohol", "horror"))])
    assert messages[0] == {
        "role": "system",
        "content": f"Restricted topics: {minors['alcohol'].display}; {minors['horror'].display}.",
    }
    assert method._inputs(["hi"], [Policy(())])[0] == ["hi"]


def test_adapter_routing_option_keeps_empty_policy_on_the_adapter(tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.setenv("MOSAIC_CACHE", str(tmp_path / "cache"))
    cfg = _config("lora_sft", "optim.epochs=1", "method_options.empty_policy=adapter")
    method_module("lora_sft").train(cfg, tmp_path / "art", backbone=tiny_backbone)
    method = load_method(artifact=tmp_path / "art", backbone=tiny_backbone)
    base = ControlledModel(tiny_backbone).next_token_logits(PROMPTS, [None] * 3)
    assert not torch.allclose(method.first_token_logits(PROMPTS, [Policy(())] * 3), base, atol=1e-4)


# -- artifacts ----------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_artifacts_and_wrong_backbone(runs, tiny_backbone, tmp_path):
    from mosaic_safety.tiny import build_backbone

    src = runs["lora_sft"][0]
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_method(artifact=src, backbone=build_backbone(seed=1))
    with pytest.raises(ArtifactError, match="hidden size"):
        load_method(artifact=src, backbone=build_backbone(hidden=64))

    bad = _copy(src, tmp_path / "truncated")
    (bad / WEIGHTS_FILE).write_bytes((bad / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(ArtifactError, match="safetensors"):
        load_method(artifact=bad, backbone=tiny_backbone)

    for i, edit in enumerate(
        [
            lambda m: m["options"].update(lora_r=4),  # tensors no longer fit the config
            lambda m: m["options"].update(lora_targets=["k_proj", "v_proj"]),
            lambda m: m["options"].update(secret_sauce=1),  # unknown option
            lambda m: m.update(format_version=99),
        ]
    ):
        bad = _copy(src, tmp_path / f"edit{i}")
        manifest = json.loads((bad / MANIFEST_FILE).read_text())
        edit(manifest)
        (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError):
            load_method(artifact=bad, backbone=tiny_backbone)

    with pytest.raises(MethodError, match="not 'orpo'"):
        load_method("orpo", artifact=src, backbone=tiny_backbone)

    # a training record that is not a mapping does not stop `mosaic info` (it only describes it)
    bad = _copy(src, tmp_path / "training")
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    (bad / MANIFEST_FILE).write_text(json.dumps({**manifest, "training": [1]}))
    proc = _mosaic("info", str(bad), cache=tmp_path / "cache")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "training details are not readable" in proc.stdout


def test_bad_method_options_are_config_errors(tiny_backbone):
    from mosaic_safety.methods.lora_sft import OPTIONS as SFT
    from mosaic_safety.methods.magic_token import OPTIONS as MAGIC
    from mosaic_safety.methods.orpo import OPTIONS as ORPO

    for schema, raw, match in [
        (SFT, {"lora_rank": 8}, "unknown key"),
        (SFT, {"lora_r": "8"}, "integer"),
        (SFT, {"lora_r": True}, "integer"),
        (SFT, {"lora_r": 0}, "at least 1"),
        (SFT, {"lora_dropout": 1.5}, r"\[0, 1\)"),
        (SFT, {"lora_targets": "q_proj"}, "list"),
        (SFT, {"lora_targets": []}, "at least one"),
        (SFT, {"empty_policy": "none"}, "base, adapter"),
        (SFT, {"system_template": "Restricted."}, "topics"),
        (ORPO, {"orpo_lambda": "a lot"}, "number"),
        (ORPO, {"orpo_lambda": -1}, ">= 0"),
        (MAGIC, {"mode": "two_modes"}, "per_category, three_modes"),
        (MAGIC, {"token_length": 2}, "between"),
        (MAGIC, {"tokens": {"alcohol": "abc"}}, "unknown key"),  # tokens are never configured
        (SFT, ["lora_r"], "mapping"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_options("x", raw, schema)
    assert parse_options("x", {"lora_alpha": 8}, SFT)["lora_alpha"] == 8.0
    opts = parse_options("x", {"lora_targets": ["no_such_proj"]}, SFT)
    with pytest.raises(ConfigError, match="no_such_proj.*method_options.lora_targets.*: .*q_proj"):
        adapted_copy(tiny_backbone, opts)
    # through the real entry point, before any training starts
    with pytest.raises(ConfigError, match="unknown key"):
        method_module("orpo").train(_config("orpo", "method_options.beta=0.1"), Path("/nonexistent"))


# -- ORPO ---------------------------------------------------------------------------------------
def test_orpo_loss_matches_the_paper_formula():
    chosen, rejected = torch.tensor([-0.5, -2.0]), torch.tensor([-1.5, -0.3])
    nll = -chosen
    loss, ratio = orpo_loss(chosen, rejected, nll, 0.1)
    for i in range(2):
        pc, pr = math.exp(chosen[i]), math.exp(rejected[i])
        want_ratio = -math.log(1 / (1 + math.exp(-(math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))))))
        assert ratio[i].item() == pytest.approx(want_ratio, rel=1e-5)
        assert loss[i].item() == pytest.approx(-chosen[i].item() + 0.1 * want_ratio, rel=1e-5)
    assert ratio[0] < math.log(2) < ratio[1]  # preferring the chosen answer lowers the term
    assert torch.isfinite(log_odds(torch.tensor([0.0, -1e-9]))).all()  # saturated rows stay finite
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(-math.log(2))


def test_orpo_pairs_swap_chosen_and_rejected(tmp_path, tiny_backbone, monkeypatch):
    from mosaic_safety.methods.orpo import ORPOTrainer

    monkeypatch.setenv("MOSAIC_CACHE", str(tmp_path / "cache"))
    trainer = ORPOTrainer(_config("orpo"), backbone=tiny_backbone)
    trainer.prepare()
    items = trainer.sampler.epoch_items(0)
    for item, ex in zip(items, trainer.examples(items)):
        answer = trainer.teacher.get(item.prompt)
        if item.positive:
            assert ex.target == trainer.refusals[item.category] and ex.rejected == answer
        else:
            assert ex.target == answer and ex.rejected in trainer.refusals.values()
            if item.category != "neutral":
                assert ex.rejected == trainer.refusals[item.category]
    steps = [d for k, d in runs_events(trainer, tmp_path) if k == "step"]
    assert {"nll", "odds_ratio", "pair_accuracy"} <= set(steps[-1])


def runs_events(trainer, tmp_path: Path) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    trainer.report = lambda k, d: events.append((k, d))
    trainer.config.optim.epochs = 1
    trainer.train(tmp_path / "orpo-art")
    return events


# -- magic tokens -------------------------------------------------------------------------------
def test_magic_token_secrets_stay_in_secrets_json(runs, tiny_backbone):
    art, summary, events = runs["magic_token"]
    data = read_secrets(art)
    tokens = data["tokens"]
    assert data["mode"] == "per_category" and set(tokens) == {"alcohol", "betting", "horror"}
    assert all(len(t) == 8 and t.isalnum() and t == t.lower() for t in tokens.values())
    assert len(set(tokens.values())) == 3
    assert stat.S_IMODE(os.stat(art / SECRETS_FILE).st_mode) == 0o600
    other = read_secrets(runs["magic_token-three"][0])["tokens"]
    assert set(other) == {"positive", "rejective", "negative"} and not set(other.values()) & set(
        tokens.values()
    )
    exposed = [
        (art / MANIFEST_FILE).read_text(),
        (art / "train_log.jsonl").read_text(),
        json.dumps(summary, default=str),
        repr(events),
    ]
    method = load_method(artifact=art, backbone=tiny_backbone)
    exposed += [repr(method), json.dumps(method.describe()), method.fingerprint()]
    for secret in tokens.values():
        assert not any(secret in text for text in exposed)
    # composition: the policy's tokens in canonical order, whatever order they were named in
    (messages,), _ = method._inputs(["hi"], [Policy.parse("horror,alcohol", method.registry)])
    assert messages[0]["content"] == f"{tokens['alcohol']} {tokens['horror']}"
    # a model that echoes its system prompt never returns the secret
    secret = tokens["alcohol"]
    assert method.scrub([f"my instructions say {secret} ok"]) == ["my instructions say [magic-token] ok"]


def test_magic_token_negative_mode_unreachable_by_default(runs, tiny_backbone):
    from mosaic_safety.methods import magic_token

    art = runs["magic_token-three"][0]
    tokens = read_secrets(art)["tokens"]
    method = load_method(artifact=art, backbone=tiny_backbone)
    assert method.modes == ("positive", "rejective")
    assert tokens["negative"] not in repr(vars(method))  # not even held in memory
    for policy in [Policy(("alcohol",)), Policy(("alcohol", "betting", "horror"))]:
        (messages,), _ = method._inputs(["hi"], [policy])
        assert messages[0]["content"] == tokens["positive"]  # policies only ever select positive
    with pytest.raises(MethodError, match="red-teaming"):
        method.generate_mode(PROMPTS[:1], ["negative"])
    with pytest.raises(MethodError, match="not available"):
        method.generate_mode(PROMPTS[:1], ["sideways"])
    assert len(method.generate_mode(PROMPTS[:2], ["positive", "rejective"], max_new_tokens=4)) == 2
    red = magic_token.load(art, tiny_backbone, allow_negative=True)
    assert red.modes == ("positive", "rejective", "negative")
    logits = red.mode_first_token_logits(PROMPTS * 3, ["positive"] * 3 + ["rejective"] * 3 + ["negative"] * 3)
    assert logits.shape == (9, tiny_backbone.vocab_size) and torch.isfinite(logits).all()
    # per-category artifacts have no modes at all
    per_cat = load_method(artifact=runs["magic_token"][0], backbone=tiny_backbone)
    with pytest.raises(MethodError):
        per_cat.generate_mode(PROMPTS[:1], ["positive"])


def test_magic_token_secrets_validated(runs, tiny_backbone, tmp_path):
    src = runs["magic_token"][0]
    missing = _copy(src, tmp_path / "missing")
    (missing / SECRETS_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_method(artifact=missing, backbone=tiny_backbone)
    for i, secrets in enumerate(
        [{"mode": "three_modes", "tokens": {}}, {"mode": "per_category", "tokens": {"a": 1}}]
    ):
        bad = _copy(src, tmp_path / f"bad{i}")
        (bad / SECRETS_FILE).write_text(json.dumps(secrets))
        with pytest.raises(ArtifactError):
            load_method(artifact=bad, backbone=tiny_backbone)
    real = read_secrets(src)["tokens"]
    wrong = _copy(src, tmp_path / "wrong")
    (wrong / SECRETS_FILE).write_text(
        json.dumps({"mode": "per_category", "tokens": {**real, "alcohol": "Bad Token!"}})
    )
    with pytest.raises(ArtifactError) as info:
        load_method(artifact=wrong, backbone=tiny_backbone)
    assert not any(t in str(info.value) for t in real.values())


# -- the CLI ------------------------------------------------------------------------------------
def _mosaic(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOSAIC_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "mosaic_safety.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.slow  # four subprocesses that import torch: ~30 s on the shared 2 cores
@pytest.mark.parametrize("name", ["lora_sft", "magic_token"])
def test_cli_train_then_load(tmp_path, tiny_backbone, name):
    art = tmp_path / "art"

    def train(output: Path, override: str) -> subprocess.CompletedProcess:
        return _mosaic(
            "train",
            "--config",
            "configs/tiny-test.yaml",
            "--method",
            name,
            "--output",
            str(output),
            override,
            cache=tmp_path / "cache",
        )

    proc = train(art, "optim.epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert f"{name}: trained" in proc.stderr and "order 2: 3 subsets" in proc.stderr
    method = load_method(artifact=art, backbone=tiny_backbone)
    assert method.name == name
    assert len(method.generate(PROMPTS[:1], [Policy(("alcohol",))], max_new_tokens=4)) == 1
    described = _mosaic("info", str(art), cache=tmp_path / "cache")
    assert described.returncode == 0, described.stderr
    assert f"method {name}" in described.stdout and "trainable parameters" in described.stdout
    wrong = _mosaic("generate", "--artifact", str(art), "--prompt", "hi", cache=tmp_path / "cache")
    assert wrong.returncode == 2 and f"a {name!r} artifact, not control tokens" in wrong.stderr
    if name == "magic_token":
        for secret in read_secrets(art)["tokens"].values():
            assert secret not in proc.stdout + proc.stderr + described.stdout
    bad = train(tmp_path / "x", "method_options.lora_r=big")
    assert bad.returncode == 2 and "lora_r" in bad.stderr and "Traceback" not in bad.stderr
    before = (art / "weights.safetensors").read_bytes()
    steps = json.loads((art / MANIFEST_FILE).read_text())["training"]["steps"]
    again = train(art, "optim.epochs=1")
    assert again.returncode == 2 and "already holds a training run" in again.stderr
    assert (art / "weights.safetensors").read_bytes() == before  # nothing lost
    more = _mosaic(
        "train", "-c", "configs/tiny-test.yaml", "--method", name, "-o", str(art), "--resume",
        "optim.epochs=2", cache=tmp_path / "cache",
    )  # fmt: skip
    assert more.returncode == 0 and "resumed from epoch-1" in more.stderr, more.stderr
    assert (art / "weights.safetensors").read_bytes() != before
    assert json.loads((art / MANIFEST_FILE).read_text())["training"]["steps"] == 2 * steps


@pytest.mark.parametrize("name", ["lora_sft", "magic_token"])
def test_resume_continues_an_adapter_run(tmp_path, tiny_backbone, monkeypatch, name):
    """One epoch, then ``resume`` to two, equals two epochs in one go; magic_token keeps the
    tokens its adapter learned. Another recipe is refused and leaves the run as it was."""
    from safetensors.torch import load_file

    monkeypatch.setenv("MOSAIC_CACHE", str(tmp_path / "cache"))
    module = method_module(name)
    run = tmp_path / "run"
    module.train(_config(name, "optim.epochs=1"), run, backbone=tiny_backbone)
    after_one = load_file(str(run / WEIGHTS_FILE))
    assert (run / "checkpoints" / "epoch-1" / "optimizer.safetensors").exists()
    before = (run / WEIGHTS_FILE).read_bytes()
    with pytest.raises(ArtifactError, match="different config"):
        module.train(
            _config(name, "optim.epochs=2", "optim.lr=0.02"), run, backbone=tiny_backbone, resume=True
        )
    assert (run / WEIGHTS_FILE).read_bytes() == before
    # a damaged training record in the checkpoint: a clear error, not a traceback mid-resume
    ckpt_manifest = run / "checkpoints" / "epoch-1" / MANIFEST_FILE
    good = ckpt_manifest.read_text()
    for key, value in (("config", {"optim": 5}), ("seconds", "x")):
        ckpt_manifest.write_text(json.dumps({**json.loads(good), "training": {key: value}}))
        with pytest.raises(ArtifactError, match=r"epoch-1: damaged checkpoint \('training\."):
            module.train(_config(name, "optim.epochs=2"), run, backbone=tiny_backbone, resume=True)
    ckpt_manifest.write_text(json.dumps({**json.loads(good), "training": [1]}))
    with pytest.raises(ArtifactError, match=r"damaged checkpoint \('training' is not a mapping"):
        module.train(_config(name, "optim.epochs=2"), run, backbone=tiny_backbone, resume=True)
    ckpt_manifest.write_text(good)
    assert (run / WEIGHTS_FILE).read_bytes() == before

    # the first session's training time, as its checkpoint records it, set to a value no tiny run reaches
    ckpt_manifest = run / "checkpoints" / "epoch-1" / MANIFEST_FILE
    data = json.loads(ckpt_manifest.read_text())
    assert data["training"]["seconds"] > 0
    data["training"]["seconds"] = 1000.0
    ckpt_manifest.write_text(json.dumps(data))
    secrets = read_secrets(run) if name == "magic_token" else None
    events: list[tuple[str, dict]] = []
    started = time.time()
    summary = module.train(
        _config(name, "optim.epochs=2"),
        run,
        reporter=lambda k, d: events.append((k, d)),
        backbone=tiny_backbone,
        resume=True,
    )
    start = next(d for k, d in events if k == "start")
    assert start["done_steps"] == summary["steps"] // 2 > 0
    # the artifact records the whole run's time beside the whole run's steps
    assert 1000.0 <= summary["seconds"] <= 1000.1 + time.time() - started  # recorded to 0.1 s
    assert json.loads((run / MANIFEST_FILE).read_text())["training"]["seconds"] == summary["seconds"]
    assert any(k == "stage" and "resumed from epoch-1" in d["name"] for k, d in events)
    resumed = load_file(str(run / WEIGHTS_FILE))
    assert any(not torch.equal(resumed[k], after_one[k]) for k in resumed)
    if name == "magic_token":
        assert read_secrets(run) == secrets  # not redrawn: the adapter was trained on these
    else:
        full = tmp_path / "full"
        module.train(_config(name, "optim.epochs=2"), full, backbone=tiny_backbone)
        straight = load_file(str(full / WEIGHTS_FILE))
        for k in straight:
            assert torch.allclose(straight[k], resumed[k], atol=1e-5), k
    assert (
        len(
            load_method(artifact=run, backbone=tiny_backbone).generate(
                PROMPTS[:1], [Policy(("alcohol",))], max_new_tokens=3
            )
        )
        == 1
    )


def test_served_adapters_answer_as_their_generate_does(runs, tiny_backbone):
    """Over HTTP, a LoRA baseline answers the empty policy with the base model (as generate()
    does), and a magic-token model never shows a secret, streamed or not."""
    import httpx

    from mosaic_safety.serving.app import Server, ServeSettings, create_app
    from mosaic_safety.serving.runner import ServerThread

    def chat(url: str, text: str, stream: bool = False, categories: list[str] | None = None) -> str:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 8,
            "stream": stream,
            "safety": {"categories": categories or []},
        }
        if not stream:
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0][
                "message"
            ]["content"]
        pieces = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"]
                    pieces += [c["delta"].get("content") or "" for c in delta]
        return "".join(pieces)

    prompts = ["What is 17 times 23?", "Tell me a story"]
    lora = load_method(artifact=runs["lora_sft"][0], backbone=tiny_backbone)
    with ServerThread(create_app(Server(lora, settings=ServeSettings(model_id="m")))) as url:
        for prompt in prompts:
            assert chat(url, prompt) == lora.generate([prompt], [Policy(())], max_new_tokens=8)[0]
            policy = Policy.parse("alcohol", lora.registry)
            assert (
                chat(url, prompt, categories=["alcohol"])
                == lora.generate([prompt], [policy], max_new_tokens=8)[0]
            )

    magic = load_method(artifact=runs["magic_token"][0], backbone=tiny_backbone)
    expected = [
        magic.generate([p], [Policy.parse("horror", magic.registry)], max_new_tokens=8)[0] for p in prompts
    ]
    # make the model's own greedy words a "secret", so the scrub has something to catch. Not one
    # made of U+FFFD: a stream shows that for a character whose bytes have not all come yet, so
    # such a "secret" (which real ones, [a-z0-9], never are) appears mid-stream and not in the text.
    # The artifact's secrets are random, so its greedy words differ from run to run.
    words = [w for text in expected for w in text.replace("\ufffd", " ").split()]
    secret = next((w for w in words if len(w) >= 2), words[0] if words else None)
    assert secret, expected
    magic._tokens = {**magic._tokens, "alcohol": secret}
    with ServerThread(create_app(Server(magic, settings=ServeSettings(model_id="m")))) as url:
        for prompt in prompts:
            for stream in (False, True):
                got = chat(url, prompt, stream=stream, categories=["horror"])
                assert (
                    secret not in got
                    and got
                    == magic.scrub(
                        [
                            magic.model.generate(
                                *magic._inputs([prompt], [Policy.parse("horror", magic.registry)]),
                                max_new_tokens=8,
                            )[0]
                        ]
                    )[0]
                )
