"""The diagnostic scripts under scripts/: the numbers they report on small, hand-checked inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_controlled import perturb

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(verdicts: dict[str, dict[str, bool]]) -> dict:
    """A results.json holding one prompt per category: verdicts[group][policy]."""
    rows = [
        {"group": g, "prompt": f"{g} prompt", "policy": p, "refused": v}
        for g, by_policy in verdicts.items()
        for p, v in by_policy.items()
    ]
    rows.append({"group": "a", "prompt": "a prompt", "policy": "a,b", "refused": True})  # order 2: ignored
    rows.append({"group": "neutral", "prompt": "hi", "policy": "a", "refused": True})  # not a category prompt
    return {"categories": ["a", "b", "c"], "responses": rows}


def test_refusal_agreement_counts_other_policies_per_prompt():
    agreement = _script("refusal_agreement").agreement
    a = agreement(
        _results(
            {
                "a": {"(empty)": False, "a": True, "b": False, "c": False},  # refused by 0 others
                "b": {"(empty)": True, "a": True, "b": True, "c": True},  # by both others
                "c": {"(empty)": False, "a": True, "b": False, "c": False},  # by 1, not by its own
            }
        )
    )
    assert a["prompts"] == 3 and a["observed"] == [1, 1, 1]
    assert a["other_rate"] == pytest.approx(3 / 6)
    assert a["own_refused"] == [1, 0, 1] and a["base_refused"] == [0, 0, 1]
    assert a["independent"] == pytest.approx([0.75, 1.5, 0.75])  # 3 × binomial(2, 0.5)


def test_refusal_agreement_names_a_missing_policy():
    agreement = _script("refusal_agreement").agreement
    partial = _results({"a": {"(empty)": False, "a": True, "b": False}, "b": {"(empty)": False}})
    with pytest.raises(ValueError, match="no verdict under c"):
        agreement(partial)
    with pytest.raises(ValueError, match="category prompts"):
        agreement({"categories": ["a", "b"], "responses": []})


def test_token_controls_keep_norms_or_remove_the_shared_direction(tiny_backbone, tiny_tokens):
    controls = _script("token_controls")
    unit = controls.shared_direction(tiny_tokens)
    assert float(unit.norm()) == pytest.approx(1.0)
    norms = {n: b.detach().norm(dim=-1).clone() for n, b in tiny_tokens.blocks.items()}
    embedding = tiny_backbone.model.get_input_embeddings().weight.detach().float()
    controls.randomise(tiny_tokens, embedding, seed=0)
    for name, block in tiny_tokens.blocks.items():
        assert torch.allclose(block.norm(dim=-1), norms[name], atol=1e-5)
    controls.remove_direction(tiny_tokens, unit)
    for block in tiny_tokens.blocks.values():
        assert torch.allclose(block @ unit, torch.zeros(block.shape[0]), atol=1e-5)


def test_decision_kl_separates_the_first_answer_token(tiny_backbone, tiny_tokens, minors):
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.policy import Policy

    drift = _script("decision_kl").decision_drift
    perturb(tiny_tokens, seed=0)  # make the control tokens matter
    model = ControlledModel(tiny_backbone, tiny_tokens)
    prompts, answers = ["hello there", "bake bread"], [[5, 6, 7], [9, 10]]
    assert all(r["first"] == r["mean"] == 0 for r in drift(model, prompts, answers, Policy(())))
    rows = drift(model, prompts, answers, minors.policy("alcohol"))
    with torch.no_grad():
        ctrl, _ = model.response_logits(prompts[1:], [minors.policy("alcohol")], answers[1:])
        base, _ = model.response_logits(prompts[1:], [Policy(())], answers[1:])
    p, q = torch.softmax(base[0, :2], -1), torch.softmax(ctrl[0, :2], -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    assert rows[1]["first"] == pytest.approx(float(kl[0]), rel=1e-4)
    assert rows[1]["mean"] == pytest.approx(float(kl.mean()), rel=1e-4)


def test_decision_kl_runs_on_a_suite_directory_with_its_trained_wording(tmp_path):
    """The run's suite is reloaded from its recipe (a directory, not the suite's name), and replies
    are judged against the refusal the tokens were trained to say."""
    import shutil
    import subprocess
    import sys

    from mosaic_safety.config import load_config
    from mosaic_safety.data.suites import BUILTIN_DIR
    from mosaic_safety.training.trainer import Trainer

    suite = tmp_path / "my-suite"
    shutil.copytree(BUILTIN_DIR / "minors", suite)
    art = tmp_path / "art"
    overrides = [f"data.suite={suite}", "data.refusal=Not here: {display}.", "optim.epochs=1"]
    Trainer(load_config("configs/tiny-test.yaml", overrides)).train(art)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "decision_kl.py"), str(art), "--policy", "alcohol"]
        + ["--group", "alcohol", "--split", "test", "-n", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "first" in proc.stdout
    judge = _script("decision_kl").build_judge
    from mosaic_safety.config import DataConfig
    from mosaic_safety.training.trainer import load_training_suite

    trained = load_training_suite(DataConfig(suite=str(suite), refusal="Not here: {display}."))
    assert judge("template", trained.registry)(["q"], ["Not here: alcohol."]) == [True]


def test_decision_kl_picks_pool_or_test_prompts():
    from mosaic_safety.data import load_suite
    from mosaic_safety.training.trainer import training_pools

    pick = _script("decision_kl").pick_prompts
    suite = load_suite("minors")
    manifest = {"training": {"config": {"data": {"limit_per_category": 30}, "optim": {"seed": 3}}}}
    pools = training_pools(suite, list(suite.registry.names), 30, 3)
    assert pick(manifest, suite, "pool", "neutral", 5) == pools["neutral"][:5]
    assert pick(manifest, suite, "pool", "horror", 4) == pools["prompts"]["horror"][:4]
    assert pick(manifest, suite, "test", "horror", 3) == [
        e.prompt for e in suite.by_category("test")["horror"][:3]
    ]
    subset = {
        "training": {
            "config": {
                "data": {"limit_per_category": 30, "categories": ["sex", "horror"]},
                "optim": {"seed": 3},
            }
        }
    }
    own = training_pools(suite, ["horror", "sex"], 30, 3)  # a subset run samples its pools differently
    assert pick(subset, suite, "pool", "neutral", 5) == own["neutral"][:5] != pools["neutral"][:5]
    with pytest.raises(ValueError, match="no prompts in group 'cooking'"):
        pick(manifest, suite, "test", "cooking", 3)


def _order1_results(rates: dict[tuple[str, str], list[bool]]) -> dict:
    """The policy rows of a results.json (``mosaic eval``'s own rates) from verdicts per cell."""
    by_policy: dict[str, dict] = {}
    for (p, g), verdicts in rates.items():
        by_policy.setdefault(p, {})[g] = {
            "k": sum(verdicts),
            "n": len(verdicts),
            "rate": sum(verdicts) / len(verdicts),
        }
    rows = [{"policy": p, "order": 0 if p == "(empty)" else 1, "rates": r} for p, r in by_policy.items()]
    rows.append({"policy": "a,b", "order": 2, "rates": {"a": {"rate": 0.0}}})  # order 2: ignored
    return {"categories": ["a", "b"], "policies": rows}


def test_recipe_sweep_summary_counts_own_other_excess_and_neutral():
    summarize = _script("recipe_sweep").summarize_results
    s = summarize(
        _order1_results(
            {
                ("(empty)", "a"): [False, False],
                ("(empty)", "b"): [True, False],  # the base model refuses half of b
                ("a", "a"): [True, True],
                ("a", "b"): [True, True],  # 100% other, 50 points over the base model
                ("b", "b"): [True, False],
                ("b", "a"): [False, False],
                ("a", "neutral"): [False, False, False, True],
                ("b", "neutral"): [False, False, False, False],
            }
        )
    )
    assert (s["own_mean"], s["own_min"]) == (75.0, 50.0)
    assert (s["other_mean"], s["other_max"]) == (50.0, 100.0)
    assert s["excess"] == 25.0  # (100 - 50 + 0 - 0) / 2
    assert s["neutral_max"] == 25.0
    assert s["own"] == {"a": 100.0, "b": 50.0}


def test_recipe_sweep_summary_names_a_missing_cell():
    summarize = _script("recipe_sweep").summarize_results
    with pytest.raises(ValueError, match="policy 'a' on 'b'"):
        summarize(_order1_results({("(empty)", "a"): [False], ("a", "a"): [True], ("b", "b"): [True]}))


def test_recipe_sweep_end_to_end_on_the_tiny_recipe(tmp_path):
    """Two variants, one seed, through the real trainer and evaluator; every epoch is summarised."""
    import os
    import subprocess
    import sys

    env = {"MOSAIC_CACHE": str(tmp_path / "base-cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, str(ROOT / "scripts" / "recipe_sweep.py"), "--config", "configs/tiny-test.yaml",
        "--out", str(tmp_path / "sweep"), "--variant", "plain=", "--variant", "fast=optim.lr=0.05",
        "--seeds", "0", "--epochs", "1", "2", "--eval", "val:2", "--workers", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plain seed 0: done" in proc.stdout and "fast seed 0: done" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "sweep" / "summary.jsonl").read_text().splitlines()]
    assert sorted((x["variant"], x["epoch"]) for x in lines) == [
        ("fast", "1"), ("fast", "2"), ("plain", "1"), ("plain", "2"),
    ]  # fmt: skip
    assert all(x["split"] == "val" and x["limit"] == 2 for x in lines)
    assert "plain | 2 | val | 1 |" in proc.stdout  # the closing table
    for extra, message in (
        (["--variant", "noequals"], "NAME=OVERRIDES"),
        (["--eval", "val"], "SPLIT:PROMPTS"),
    ):
        bad = subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr


def test_recipe_sweep_table_keeps_the_latest_line_of_a_rerun(tmp_path, capsys):
    sweep = _script("recipe_sweep")
    line = {"variant": "v", "seed": 0, "epoch": "3", "split": "test", "own_mean": 50.0, "own_min": 40.0}
    line |= {"other_mean": 20.0, "excess": 5.0, "neutral_max": 10.0}
    rerun = {**line, "own_mean": 90.0}
    (tmp_path / "summary.jsonl").write_text("\n".join(json.dumps(x) for x in (line, rerun)) + "\n")
    sweep.print_table(tmp_path / "summary.jsonl")
    out = capsys.readouterr().out
    assert "v | 3 | test | 1 | 90.0 (40)" in out and "s0:90/20/10" in out


def test_separability_states_follow_generation_and_ignore_batch_mates(tiny_backbone, tiny_tokens, minors):
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.policy import Policy

    states = _script("separability").prompt_states
    perturb(tiny_tokens, seed=0)  # make the control tokens matter
    model = ControlledModel(tiny_backbone, tiny_tokens)
    layers = tiny_backbone.model.config.num_hidden_layers + 1
    alone = states(model, ["hello there"])
    assert alone.shape == (1, layers, 2 * tiny_backbone.hidden_size)
    padded = states(model, ["hello there", "a much longer prompt about baking bread at home"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)  # left padding changes nothing
    batch = model.encode(["hello there"], [Policy(())])
    with torch.no_grad():
        final = tiny_backbone.model.get_decoder()(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask
        ).last_hidden_state
    hidden = tiny_backbone.hidden_size
    assert torch.allclose(alone[0, -1, :hidden], final[0, -1], atol=1e-5)  # the decision position
    assert torch.allclose(alone[0, -1, hidden:], final[0].mean(0), atol=1e-5)
    steered = states(model, ["hello there"], minors.policy("alcohol"))
    assert not torch.allclose(steered[0, -1, :hidden], alone[0, -1, :hidden], atol=1e-3)


def test_separability_detector_fires_on_the_asked_recall():
    sep = _script("separability")
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0]])
    y_train, y_test = torch.arange(3).repeat_interleave(40), torch.arange(3).repeat_interleave(20)
    x_train = centres[y_train] + torch.randn(120, 2, generator=gen)
    x_test = centres[y_test] + torch.randn(60, 2, generator=gen)
    fires = sep.detector_fires(x_train, y_train, x_test, y_test, target=0, recall=0.9)
    assert int(fires[y_test == 0].sum()) == 18  # 90% of the 20 own rows, by the threshold
    assert int(fires[y_test != 0].sum()) == 0  # separable groups: nothing else
    # the same distribution for every group: the detector fires on others about as often
    noise_train, noise_test = torch.randn(120, 2, generator=gen), torch.randn(60, 2, generator=gen)
    fires = sep.detector_fires(noise_train, y_train, noise_test, y_test, target=0, recall=0.9)
    assert int(fires[y_test != 0].sum()) >= 10


def test_separability_table_ors_the_base_models_refusals():
    sep = _script("separability")
    groups = ["a", "b", "c", "neutral"]
    y = torch.arange(4).repeat_interleave(10)
    x = torch.nn.functional.one_hot(y, 4).float()[:, None, :] * 5  # (n, 1 layer, features)
    refused = torch.zeros(40, dtype=torch.bool)
    refused[[10, 11, 30]] = True  # the base model refuses two b prompts and one neutral prompt
    table = sep.detector_table(x, y, x, y, groups, 0, slice(0, 4), recall=1.0, refused=refused, only="a")
    alone, with_base = table[""][0], table["+base"][0]
    assert alone["own"] == 1.0 and alone["other"] == 0.0 and alone["rates"][-1] == 0.0
    assert with_base["other"] == pytest.approx((0.2 + 0.0) / 2) and with_base["rates"][-1] == pytest.approx(
        0.1
    )


def test_separability_samples_every_subtopic_and_keeps_its_cache_honest(tmp_path):
    sep = _script("separability")
    labels = torch.tensor([0] * 30 + [1] * 5)
    keep = sep.sample_rows(labels, 10)
    assert torch.equal(keep, sep.sample_rows(labels, 10))  # seeded
    assert (labels[keep] == 0).sum() == 10 and (labels[keep] == 1).sum() == 5
    assert int(keep[labels[keep] == 0].max()) >= 10  # not just the first rows of the file
    path = tmp_path / "states.pt"
    assert sep.cached(path, {"policy": None}, lambda: torch.ones(2)).sum() == 2
    assert sep.cached(path, {"policy": None}, lambda: torch.zeros(2)).sum() == 2  # read back
    with pytest.raises(SystemExit, match="not {'policy': 'alcohol'}"):
        sep.cached(path, {"policy": "alcohol"}, lambda: torch.zeros(2))


def test_separability_end_to_end_on_the_tiny_model(tmp_path, capsys):
    from mosaic_safety.backbone import TINY_MODEL

    sep = _script("separability")
    with pytest.raises(SystemExit):
        sep.main(["--model", TINY_MODEL, "--artifact", str(tmp_path)])  # --policy missing
    assert "--artifact and --policy go together" in capsys.readouterr().err
    args = ["--model", TINY_MODEL, "--train-limit", "8", "--layers", "1", "--base-tokens", "2"]
    sep.main([*args, "--cache", str(tmp_path / "s.pt")])
    out = capsys.readouterr().out
    assert (
        "48 train and 600 test prompts" in out
    )  # 8 per group, neutral too and "the base model refuses" in out
    assert "addiction+base" in out and "(own 90%)" in out
    assert (tmp_path / "s.pt").exists() and (tmp_path / "s.base2.pt").exists()


def test_separability_head_margin_is_positive_exactly_where_greedy_picks_the_token(tiny_backbone):
    from mosaic_safety.controlled import ControlledModel

    sep = _script("separability")
    model = ControlledModel(tiny_backbone)
    final = torch.randn(64, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        greedy = model.states_to_logits(final).argmax(-1)
    token = int(greedy.mode().values)
    margin = sep.head_margin(model, final, token)
    assert torch.equal(margin > 0, greedy == token) and bool((greedy == token).any())
    own = torch.zeros(64, dtype=torch.bool)
    own[:10] = True
    assert int(sep.fires_at_recall(margin, own, 0.9)[own].sum()) == 9


def test_separability_reads_states_under_a_trained_policy(tmp_path, capsys, tiny_backbone, tiny_tokens):
    from mosaic_safety.backbone import TINY_MODEL

    sep = _script("separability")
    tiny_tokens.save(tmp_path / "artifact", tiny_backbone.describe())
    args = ["--model", TINY_MODEL, "--artifact", str(tmp_path / "artifact"), "--policy", "alcohol"]
    args += ["--train-limit", "8", "--layers", "1", "--base-tokens", "2", "--refusal-token", "hello"]
    sep.main([*args, "--cache", str(tmp_path / "p.pt")])
    out = capsys.readouterr().out
    assert "under the trained alcohol policy itself" in out and "the LM head's margin for 'hello'" in out
    assert "alcohol+base" in out and "addiction+base" not in out  # only the policy's own detector
    with pytest.raises(SystemExit, match="not"):  # the same cache for another policy is refused
        sep.main([*args[:5], "sex", *args[6:], "--cache", str(tmp_path / "p.pt")])


def test_compete_gate_answers_as_the_base_model_where_another_category_wins():
    gate = _script("compete_gate")
    margins = torch.tensor([[2.0, 2.0, -1.0], [3.0, 1.5, 5.0]])  # categories a, b over three prompts
    under = [torch.tensor([True, True, True]), torch.tensor([True, False, True])]
    base = torch.tensor([False, False, True])
    # a fires on prompts 0 and 1; b's margin beats a's on 0 by 1 (kept with delta 1) and on 2
    assert gate.compete(margins, under, base, 0, delta=0.0).tolist() == [False, True, True]
    assert gate.compete(margins, under, base, 0, delta=1.0).tolist() == [True, True, True]
    assert gate.compete(margins, under, base, 1, delta=0.0).tolist() == [True, False, True]


def test_compete_gate_rates_are_exact_and_pass_at_the_targets():
    gate = _script("compete_gate")
    labels = ["a"] * 10 + ["b"] * 10 + ["neutral"] * 10
    own_9 = [True] * 9 + [False]  # 9 of 10: exactly the 90% target
    a = torch.tensor(own_9 + [True] + [False] * 9 + [True] + [False] * 9)
    b = torch.tensor([True, True] + [False] * 8 + own_9[:8] + [False] * 2 + [False] * 10)
    table = gate.policy_rates([a, b], ["a", "b"], labels)
    assert table["rates"]["a"] == {"a": 0.9, "b": 0.1, "neutral": 0.1}
    assert table["rates"]["b"] == {"a": 0.2, "b": 0.8, "neutral": 0.0}
    assert table["checks"]["target_mean"] == pytest.approx(0.85)
    assert table["checks"]["other_mean"] == pytest.approx(0.15)
    assert gate.passing(table["rates"], ["a", "b"]) == ["a"]  # b: 80% own, 20% other


def test_compete_gate_end_to_end_on_a_tiny_artifact(tmp_path, capsys):
    from mosaic_safety.config import load_config
    from mosaic_safety.training.trainer import Trainer

    config = load_config("configs/tiny-test.yaml", [f"output={tmp_path}", "optim.epochs=1"])
    Trainer(config).train(tmp_path)
    _script("compete_gate").main(
        [str(tmp_path), "--per-group", "3", "--deltas", "0", "--max-new-tokens", "2"]
    )
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if ": own" in line] == [
        "plain",
        "compete d=0",
        "gate only",
    ]
    assert out.count("  alcohol ") == 3  # one row per rule for each of the artifact's categories


def test_compete_gate_margins_follow_the_policys_greedy_first_token(tiny_backbone, tiny_tokens):
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.policy import Policy

    gate = _script("compete_gate")
    model = ControlledModel(tiny_backbone, tiny_tokens)
    prompts = [f"question number {i} about the weather" for i in range(12)]
    policy = Policy(("alcohol",))
    with torch.no_grad():
        greedy = model.next_token_logits(prompts, [policy] * len(prompts)).argmax(-1).cpu()
    token = int(greedy.mode().values)
    margins = gate.refusal_margins(model, prompts, policy, token, batch_size=5)  # batches of 5, 5, 2
    assert margins.shape == (12,) and torch.equal(margins > 0, greedy == token)
