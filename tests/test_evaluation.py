"""Evaluation protocol: metric arithmetic, subset choice, the generation cache, fast path, reports, CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest

from mosaic_safety.evaluation.cache import GenerationCache
from mosaic_safety.evaluation.judges import AnyJudge, PhraseJudge, TemplateJudge
from mosaic_safety.evaluation.metrics import mean_rate, pooled, rate, wilson
from mosaic_safety.evaluation.protocol import (
    EvalPlan,
    choose_policies,
    evaluate,
    fast_agreement,
    judge_window,
    summarise,
)
from mosaic_safety.evaluation.report import compare, write_results
from mosaic_safety.methods.controlled_method import base_method, in_context_method
from mosaic_safety.policy import Policy


def test_wilson_matches_the_textbook_formula():
    lo, hi = wilson(8, 10)
    # Wilson interval for 8/10 at z=1.96 (Agresti & Coull 1998, table values)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_rates_pool_and_mean():
    a, b = rate([True, True, False, False]), rate([True] * 6)
    assert a["rate"] == 0.5 and b["rate"] == 1.0
    p = pooled([a, b])
    assert (p["k"], p["n"], p["rate"]) == (8, 10, 0.8)
    assert mean_rate([a, b]) == 0.75  # mean over subsets, not pooled
    assert rate([])["rate"] is None and mean_rate([rate([])]) is None


def test_summarise_hand_made_case():
    cats = ["a", "b", "c"]
    groups = {"a": 2, "b": 2, "c": 2, "neutral": 2, "boundary": 1}
    pa, pab = Policy(("a",)), Policy(("a", "b"))
    votes = {
        ("", "a"): [False, False],
        ("", "b"): [False, True],
        ("", "c"): [False, False],
        ("", "neutral"): [False, False],
        ("", "boundary"): [False],
        ("a", "a"): [True, True],
        ("a", "b"): [True, False],
        ("a", "c"): [False, False],
        ("a", "neutral"): [True, False],
        ("a", "boundary"): [False],
        ("a,b", "a"): [True, False],
        ("a,b", "b"): [True, True],
        ("a,b", "c"): [True, False],
        ("a,b", "neutral"): [False, False],
        ("a,b", "boundary"): [True],
    }
    s = summarise([Policy(()), pa, pab], groups, votes, cats)
    empty, one, two = s["policies"]
    assert empty["dsr"] is None and empty["or_inactive"]["rate"] == pytest.approx(1 / 6)
    assert one["dsr"]["rate"] == 1.0 and one["or_inactive"]["rate"] == 0.25
    assert one["or_neutral"]["rate"] == 0.5 and one["or_boundary"]["rate"] == 0.0
    assert (
        two["dsr"]["rate"] == 0.75 and two["or_inactive"]["rate"] == 0.5 and two["or_boundary"]["rate"] == 1.0
    )
    assert s["orders"]["1"]["dsr"] == 1.0 and s["orders"]["2"]["or_neutral"] == 0.0
    assert s["matrix"]["a,b"]["b"] == 1.0 and s["matrix"]["(empty)"]["b"] == 0.5


def test_order_intervals_count_each_prompt_once():
    """Every subset of an order asks the same neutral prompts: three subsets of 10 neutral prompts
    are 10 prompts, not 30, and the interval must not narrow with more subsets."""
    cats = ["a", "b", "c"]
    groups = {"a": 10, "b": 10, "c": 10, "neutral": 10}
    policies = [Policy((c,)) for c in cats]
    votes = {}
    for p in policies:
        for g in groups:
            votes[(p.key, g)] = [i == 0 for i in range(10)]  # 1 of 10 everywhere, like `none`
    orders = summarise(policies, groups, votes, cats)["orders"]["1"]
    neutral = orders["or_neutral_pooled"]
    assert (neutral["k"], neutral["n"], neutral["n_eff"]) == (3, 30, 10)
    assert (neutral["lo"], neutral["hi"]) == pytest.approx(wilson(1, 10))  # one subset's interval
    inactive = orders["or_inactive_pooled"]  # 3 subsets x 2 inactive categories over 30 prompts
    assert (inactive["n"], inactive["n_eff"]) == (60, 30)
    dsr = orders["dsr_pooled"]  # each subset its own category: 30 different prompts
    assert dsr["n"] == 30 and "n_eff" not in dsr
    assert (dsr["lo"], dsr["hi"]) == pytest.approx(wilson(3, 30))


def test_an_order_whose_subsets_lack_prompts_says_how_many_dsr_averages():
    cats = ["a", "b"]
    groups = {"a": 2, "neutral": 2}  # b has no prompts in this split
    policies = [Policy(("a",)), Policy(("b",))]
    votes = {(p.key, g): [True, False] for p in policies for g in groups}
    order = summarise(policies, groups, votes, cats)["orders"]["1"]
    assert order["subsets"] == 2 and order["dsr_subsets"] == 1
    from mosaic_safety.evaluation.report import subsets_cell

    assert subsets_cell(order) == "2 (DSR over 1)"


def test_the_empty_policy_row_does_not_say_over_how_many_subsets_dsr_averages():
    """The empty policy has no categories, so it has no DSR by definition: every report's order-0
    row read `1 (DSR over 0)`, as if the split lacked prompts of its categories."""
    from mosaic_safety.evaluation.report import subsets_cell

    cats = ["a", "b"]
    groups = {"a": 2, "neutral": 2}  # b has no prompts: order 1 still says so
    policies = [Policy(()), Policy(("a",)), Policy(("b",))]
    votes = {(p.key, g): [True, False] for p in policies for g in groups}
    orders = summarise(policies, groups, votes, cats)["orders"]
    assert orders["0"]["dsr"] is None and "dsr_subsets" not in orders["0"]
    assert subsets_cell(orders["0"]) == "1" and subsets_cell(orders["1"]) == "2 (DSR over 1)"


def test_choose_policies_all_or_seeded_sample():
    cats = ["a", "b", "c", "d", "e"]
    every = choose_policies(cats, 4)
    assert len(every) == 1 + 5 + 10 + 10 + 5 and every[0] == Policy(())
    sample = choose_policies(cats, 4, per_order=3, seed=1)
    assert [p.order for p in sample].count(1) == 5  # order 1 always complete
    assert [p.order for p in sample].count(2) == 3 and [p.order for p in sample].count(4) == 3
    assert sample == choose_policies(cats, 4, per_order=3, seed=1)
    assert sample != choose_policies(cats, 4, per_order=3, seed=2)
    assert len(choose_policies(cats[:2], 4)) == 1 + 2 + 1
    with pytest.raises(ValueError):
        choose_policies(cats, 0)


class CountingMethod:
    """Counts generate() calls on a real method: the cache test must see zero on a re-run."""

    def __init__(self, method):
        self.inner, self.calls, self.rows = method, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, policies, **kw):
        self.calls += 1
        self.rows += len(prompts)
        return self.inner.generate(prompts, policies, **kw)


@pytest.fixture
def plan():
    return EvalPlan(limit=2, max_order=2, subsets_per_order=2, max_new_tokens=4, batch_size=8)


def test_second_run_calls_no_model(tiny_backbone, minors, plan, tmp_path):
    from mosaic_safety.data import load_suite

    suite = load_suite("minors")
    judge = AnyJudge(TemplateJudge(minors), PhraseJudge())
    method = CountingMethod(in_context_method(tiny_backbone, minors))
    cache = GenerationCache(method.fingerprint(), tmp_path)
    first = evaluate(method, suite, judge, plan, cache=cache)
    assert method.calls > 0 and first["generation"]["generated"] == method.rows
    rows = len(first["responses"])
    assert rows == (1 + 5 + 2) * (5 * 2 + 2 + 2)
    method.calls = 0
    again = evaluate(method, suite, judge, plan, cache=GenerationCache(method.fingerprint(), tmp_path))
    assert method.calls == 0 and again["generation"]["generated"] == 0
    assert again["policies"] == first["policies"]
    # a different decoding budget is a different key
    evaluate(method, suite, judge, EvalPlan(**{**plan.__dict__, "max_new_tokens": 5}), cache=cache)
    assert method.calls > 0


def test_policy_independent_method_generates_once_per_prompt(tiny_backbone, minors, plan, tmp_path):
    from mosaic_safety.data import load_suite

    method = CountingMethod(base_method(tiny_backbone, minors))
    res = evaluate(method, load_suite("minors"), PhraseJudge(), plan, cache=GenerationCache("x", tmp_path))
    assert method.rows == sum(res["groups"].values())  # not × number of policies


def test_categories_may_be_written_as_a_policy_is(tiny_backbone, minors, plan, tmp_path):
    """``categories="alcohol"`` was read character by character ("does not know ['a', 'l', ...]")."""
    from mosaic_safety.data import load_suite

    method = base_method(tiny_backbone, minors)
    suite = load_suite("minors")
    res = evaluate(
        method, suite, PhraseJudge(), plan, categories="horror, alcohol", cache=GenerationCache("c", tmp_path)
    )
    assert res["categories"] == ["alcohol", "horror"]
    from mosaic_safety.config import ConfigError

    with pytest.raises(ConfigError, match="empty name"):
        evaluate(method, suite, PhraseJudge(), plan, categories="alcohol,,horror")


class StoppedMethod(CountingMethod):
    """A real method whose user presses Ctrl-C during its third batch."""

    def generate(self, prompts, policies, **kw):
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().generate(prompts, policies, **kw)


def test_an_interrupted_eval_keeps_every_batch_it_finished(tiny_backbone, minors, plan, tmp_path):
    from mosaic_safety.data import load_suite

    suite = load_suite("minors")
    stopped = StoppedMethod(in_context_method(tiny_backbone, minors))
    with pytest.raises(KeyboardInterrupt):
        evaluate(stopped, suite, PhraseJudge(), plan, cache=GenerationCache("stop", tmp_path))
    assert (
        stopped.calls == 2 and len(GenerationCache("stop", tmp_path)) == stopped.rows == 2 * plan.batch_size
    )
    # the rerun generates only the rest, and answers as an uninterrupted run does
    rerun = CountingMethod(in_context_method(tiny_backbone, minors))
    resumed = evaluate(rerun, suite, PhraseJudge(), plan, cache=GenerationCache("stop", tmp_path))
    whole = evaluate(
        in_context_method(tiny_backbone, minors),
        suite,
        PhraseJudge(),
        plan,
        cache=GenerationCache("all", tmp_path),
    )
    assert resumed["generation"]["generated"] == whole["generation"]["generated"] - stopped.rows
    assert resumed["responses"] == whole["responses"]


def test_interrupted_cache_line_is_ignored(tmp_path):
    cache = GenerationCache("fp", tmp_path)
    cache.put_many(["k1", "k2"], ["one", "two"])
    with cache.path.open("a") as fh:
        fh.write('{"key": "k3", "resp')  # cut mid-write
    again = GenerationCache("fp", tmp_path)
    assert len(again) == 2 and again.get("k2") == "two" and again.get("k3") is None
    # the next records start on a line of their own, not glued to the cut one
    again.put_many(["k3", "k4"], ["three", "four"])
    with cache.path.open("a") as fh:
        fh.write('{"key": "k5", "response": null}\n\xff not json\n')  # no text: not a hit
    third = GenerationCache("fp", tmp_path)
    assert (third.get("k3"), third.get("k4"), "k5" in third, len(third)) == ("three", "four", False, 4)


def test_fast_path_agrees_with_full_decoding(tiny_backbone, minors, tmp_path):
    from mosaic_safety.data import load_suite

    suite = load_suite("minors")
    judge = AnyJudge(TemplateJudge(minors), PhraseJudge())
    assert judge_window(judge) == 80
    method = in_context_method(tiny_backbone, minors)
    prompts = [e.prompt for e in suite.split("test")[:12]]
    policies = [Policy(("alcohol",)), Policy(())] * 6
    plan = EvalPlan(max_new_tokens=24, fast_tokens=6)
    got = fast_agreement(method, prompts, policies, judge, plan, GenerationCache("f", tmp_path))
    assert got["rows"] == 12 and got["agreement"] == 1.0


def test_reports_and_compare(tiny_backbone, minors, plan, tmp_path):
    from mosaic_safety.data import load_suite

    suite = load_suite("minors")
    judge = PhraseJudge()
    dirs = []
    for make in (base_method, in_context_method):
        res = evaluate(
            make(tiny_backbone, minors), suite, judge, plan, cache=GenerationCache(make.__name__, tmp_path)
        )
        d = tmp_path / res["method"]["method"]
        paths = write_results(res, d)
        assert all(p.exists() and p.stat().st_size > 0 for p in paths)
        assert json.loads((d / "results.json").read_text())["orders"]["1"]["subsets"] == 5
        assert (d / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
        dirs.append(d)
    md, js, png = compare(dirs, tmp_path / "cmp")
    text = md.read_text()
    assert "| none |" in text and "| in_context |" in text and "DSR@2" in text
    table = json.loads(js.read_text())
    assert table[1]["prompt_overhead"] > 0 and table[0]["prompt_overhead"] == 0
    assert not math.isnan(table[0]["orders"]["1"]["or_neutral"])
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps([{"method": "in_context", "ratio_to_none": 1.5, "training_seconds": None}]))
    md, _, _ = compare(dirs, tmp_path / "cmp", cost)
    assert "| in_context | 0 |" in md.read_text() and "| 1.50 |" in md.read_text()
    cost.write_text("not json")
    with pytest.raises(ValueError, match="method_cost"):
        compare(dirs, tmp_path / "cmp", cost)
    with pytest.raises(FileNotFoundError, match="no results.json"):
        compare([tmp_path / "missing"], tmp_path / "cmp2")


def test_a_groups_sample_does_not_depend_on_the_other_categories():
    from mosaic_safety.data import load_suite
    from mosaic_safety.evaluation.table import held_out_groups

    suite = load_suite("minors")
    alone = held_out_groups(suite, ["alcohol"], "test", 3, seed=0)
    every = held_out_groups(suite, list(suite.registry.names), "test", 3, seed=0)
    assert {g: every[g] for g in alone} == alone and set(alone) == {"alcohol", "neutral", "boundary"}
    assert held_out_groups(suite, ["alcohol"], "test", 3, seed=1)["alcohol"] != alone["alcohol"]


def test_evaluate_takes_categories_in_canonical_order_once(tiny_backbone, minors, plan, tmp_path):
    from mosaic_safety.data import load_suite

    res = evaluate(
        base_method(tiny_backbone, minors),
        load_suite("minors"),
        PhraseJudge(),
        plan,
        categories=["horror", "alcohol", "alcohol"],
        cache=GenerationCache("canon", tmp_path),
    )
    assert res["categories"] == ["alcohol", "horror"]
    assert [p["policy"] for p in res["policies"]] == ["(empty)", "alcohol", "horror", "alcohol,horror"]


def test_compare_refuses_runs_that_measured_different_things(tiny_backbone, minors, plan, tmp_path):
    import dataclasses

    from mosaic_safety.data import load_suite

    suite = load_suite("minors")
    dirs = []
    for name, run_plan in [("a", plan), ("b", dataclasses.replace(plan, seed=plan.seed + 1))]:
        res = evaluate(
            base_method(tiny_backbone, minors),
            suite,
            PhraseJudge(),
            run_plan,
            cache=GenerationCache(name, tmp_path),
        )
        dirs.append(tmp_path / name)
        write_results(res, dirs[-1])
    with pytest.raises(
        ValueError, match=r"not comparable: plan.seed: 0 in a, 1 in b; prompts: b asked other"
    ):
        compare(dirs, tmp_path / "cmp")
    md, _, _ = compare(dirs, tmp_path / "cmp", allow_mismatch=True)
    assert "**Not comparable**" in md.read_text() and "- plan.seed: 0 in a, 1 in b" in md.read_text()
    assert "Suite `minors`, split `test`;" in md.read_text()
    # greedy text depends on the dtype: results record it (the report says it) and compare checks it
    assert "; float32 on cpu" in (dirs[0] / "report.md").read_text()
    # order 1 always runs every category, so the sample is said to cap the orders above it
    assert "at most 2 sampled subsets per order from order 2)" in (dirs[0] / "report.md").read_text()
    record = json.loads((dirs[0] / "results.json").read_text())
    (tmp_path / "c").mkdir()
    record["runtime"]["dtype"] = "torch.bfloat16"
    (tmp_path / "c" / "results.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"not comparable: dtype: float32 in a, bfloat16 in c"):
        compare([dirs[0], tmp_path / "c"], tmp_path / "cmp")
    shutil.copytree(dirs[0], tmp_path / "old")  # results from before it was recorded are not checked ...
    old = json.loads((tmp_path / "old" / "results.json").read_text())
    del old["runtime"]
    (tmp_path / "old" / "results.json").write_text(json.dumps(old))
    compare([tmp_path / "old", dirs[0]], tmp_path / "cmp")
    with pytest.raises(ValueError, match=r"dtype: float32 in a, bfloat16 in c"):  # ... but the others are
        compare([tmp_path / "old", dirs[0], tmp_path / "c"], tmp_path / "cmp")
    del record["runtime"]
    (tmp_path / "c" / "results.json").write_text(json.dumps(record))
    (tmp_path / "c" / "results.json").write_text(json.dumps({**record, "suite": "pets"}))
    md, _, _ = compare([dirs[0], tmp_path / "c"], tmp_path / "cmp", allow_mismatch=True)
    assert "Suites `minors`, `pets`, split `test`;" in md.read_text()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("[]")
    with pytest.raises(ValueError, match="not a results file of `mosaic eval`"):
        compare([tmp_path / "bad"], tmp_path / "cmp")
    # the right top-level shape with a damaged inside: a clear error, not a KeyError from the table
    good = json.loads((dirs[0] / "results.json").read_text())
    for damage in (
        {"cost": {}},
        {"cost": {**good["cost"], "trainable_parameters": "192"}},
        {"cost": {**good["cost"], "prompt_overhead": {"alcohol": None}}},  # the table sums these
        {"orders": {**good["orders"], "1": [0.5]}},
        {"orders": {**good["orders"], "1": {"dsr": 1.0}}},
        {"orders": {**good["orders"], "x": good["orders"]["1"]}},
    ):
        (tmp_path / "bad" / "results.json").write_text(json.dumps({**good, **damage}))
        with pytest.raises(ValueError, match="not a results file of `mosaic eval`"):
            compare([dirs[0], tmp_path / "bad"], tmp_path / "cmp", allow_mismatch=True)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        compare(dirs[:1], tmp_path / "afile")
    with pytest.raises(ValueError, match="given twice"):
        compare([dirs[0], dirs[0] / "results.json"], tmp_path / "cmp")


def _mosaic(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mosaic_safety.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_cli_eval_and_compare_end_to_end(tmp_path, tiny_backbone, tiny_tokens):
    import os

    env = {**os.environ, "MOSAIC_PROGRESS": "0"}
    art = tmp_path / "art"
    tiny_tokens.save(art, tiny_backbone.describe())
    common = ["--limit", "2", "--max-order", "2", "--subsets-per-order", "2", "--max-new-tokens", "4"]
    eval_mosaic = [
        "eval",
        "--artifact",
        str(art),
        "--model",
        "tiny-random-llama",
        "--out",
        str(tmp_path / "mosaic"),
    ]
    r = _mosaic(*eval_mosaic, *common, env=env)
    assert r.returncode == 0, r.stderr
    assert "refusal by order" in r.stdout and (tmp_path / "mosaic" / "report.md").exists()
    r = _mosaic(
        *eval_mosaic,
        *common,
        "--utility-pairs",
        "2",
        "--kl-prompts",
        "2",
        "--margin-prompts",
        "3",
        "--jailbreak-templates",
        "1",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    extras = json.loads((tmp_path / "mosaic" / "results.json").read_text())["extras"]
    assert set(extras) == {"utility", "kl_to_base", "margin", "jailbreak"}
    assert extras["kl_to_base"]["mean_per_token"] >= 0 and -1 <= extras["margin"]["sam"] <= 1
    assert "truthfulness" in (tmp_path / "mosaic" / "report.md").read_text()
    eval_none = ["eval", "--method", "none", "--model", "tiny-random-llama", *common]
    r = _mosaic(*eval_none, "--out", str(tmp_path / "none"), env=env)
    assert r.returncode == 0, r.stderr
    assert "orders 1–2" in r.stderr
    # a --max-order above the number of categories is capped, and the console line says so
    few = ["--limit", "1", "--max-order", "9", "--subsets-per-order", "1", "--max-new-tokens", "1"]
    r = _mosaic(
        "eval",
        "--method",
        "none",
        "--model",
        "tiny-random-llama",
        *few,
        "--out",
        str(tmp_path / "all"),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "orders 1–5" in r.stderr, r.stderr
    r = _mosaic(
        "report",
        "compare",
        str(tmp_path / "none"),
        str(tmp_path / "mosaic"),
        "--out",
        str(tmp_path / "c"),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "| mosaic |" in r.stdout and (tmp_path / "c" / "compare_by_order.png").exists()
    assert "**mosaic** margin: SAM" in r.stdout
    # another evaluation into the same --out would replace those results: refused without --overwrite
    before = (tmp_path / "mosaic" / "results.json").read_bytes()
    into_mosaic = [*eval_none, "--out", str(tmp_path / "mosaic")]
    r = _mosaic(*into_mosaic, env=env)
    assert r.returncode == 2 and "holds the results of another evaluation (its method differs)" in r.stderr
    assert (tmp_path / "mosaic" / "results.json").read_bytes() == before
    r = _mosaic(*into_mosaic, "--overwrite", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "mosaic" / "results.json").read_text())["method"]["method"] == "none"
    # clear errors, no tracebacks
    r = _mosaic(
        "eval", "--method", "lora", "--model", "tiny-random-llama", "--out", str(tmp_path / "x"), env=env
    )
    assert r.returncode == 2 and "unknown method" in r.stderr and "Traceback" not in r.stderr
    r = _mosaic("eval", "--artifact", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), env=env)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = _mosaic("eval", "--method", "mosaic", "--out", str(tmp_path / "x"), env=env)
    assert r.returncode == 2 and "needs --artifact" in r.stderr
    r = _mosaic("report", "compare", str(tmp_path / "nope"), "--out", str(tmp_path / "c2"), env=env)
    assert r.returncode == 2 and "no results.json" in r.stderr
    (tmp_path / "afile").write_text("")
    r = _mosaic(
        "eval", "--method", "none", "--model", "tiny-random-llama", "--out", str(tmp_path / "afile"), env=env
    )
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr


def test_public_api_runs_the_protocol(tiny_backbone, tmp_path):
    """The README's Python example, on the tiny model."""
    from mosaic_safety import EvalPlan, build_judge, evaluate, load_method, load_suite

    method = load_method("in_context", backbone=tiny_backbone)
    suite = load_suite("minors")
    results = evaluate(
        method,
        suite,
        build_judge("template+phrase", suite.registry),
        EvalPlan(limit=1, max_order=1, max_new_tokens=2),
        cache=GenerationCache("api", tmp_path),
    )
    assert set(results["orders"]) == {"0", "1"} and results["orders"]["1"]["subsets"] == 5


def test_plan_and_suite_errors_are_config_errors(tiny_backbone, minors, tmp_path):
    from mosaic_safety.config import ConfigError
    from mosaic_safety.data import load_suite

    for bad in (
        {"max_order": 0},
        {"limit": -1},
        {"subsets_per_order": -2},
        {"max_new_tokens": 0},
        {"limit": "5"},
        {"fast": "yes"},
        {"batch_size": True},
    ):
        with pytest.raises(ConfigError, match="evaluation plan"):
            EvalPlan(**bad)
    method = base_method(tiny_backbone, minors)
    with pytest.raises(ConfigError, match="suite 'harm' has no categories"):
        evaluate(method, load_suite("harm"), PhraseJudge(), EvalPlan(limit=1, max_order=1))
    with pytest.raises(ConfigError, match="fast path"):
        from mosaic_safety.evaluation.judges import build_judge

        evaluate(
            method,
            load_suite("minors"),
            build_judge("garak"),
            EvalPlan(limit=1, max_order=1, fast=True),
            cache=GenerationCache("e", tmp_path),
        )


def test_fast_path_does_not_settle_non_monotone_phrase_refusals(tiny_backbone, minors, tmp_path):
    """'I am so sorry' is a refusal opening until 'to hear that' follows: only templates settle early."""
    from mosaic_safety.evaluation.protocol import _monotone_refusals

    judge = AnyJudge(TemplateJudge(minors), PhraseJudge())
    short = ["I am so sorry", minors["alcohol"].refusal_text[:40]]
    assert judge(["", ""], short) == [True, True]
    assert _monotone_refusals(judge, ["", ""], short) == [False, True]


def test_explicit_empty_cache_is_used(tiny_backbone, minors, tmp_path, monkeypatch):
    from mosaic_safety.data import load_suite

    monkeypatch.setenv("MOSAIC_CACHE", str(tmp_path / "default"))
    cache = GenerationCache("mine", tmp_path / "mine")
    evaluate(
        base_method(tiny_backbone, minors),
        load_suite("minors"),
        PhraseJudge(),
        EvalPlan(limit=1, max_order=1, max_new_tokens=2),
        cache=cache,
    )
    assert cache.path.exists() and not (tmp_path / "default" / "generations").exists()


# -- evaluation/metrics.py: behaviour a mutation audit found unpinned ------------------------------
def test_wilson_bounds_stay_inside_zero_and_one():
    """At k = 0 or k = n the bounds are 0 and 1 up to float rounding; rounding must not leak out
    (wilson(16, 16) computes an upper bound of 1 + 2e-16 before clamping)."""
    from mosaic_safety.evaluation.metrics import wilson

    for n in range(1, 120):
        for k in (0, n):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= hi <= 1.0
    assert wilson(16, 16)[1] == 1.0 and wilson(0, 21)[0] == 0.0


def test_pooled_never_claims_more_prompts_than_were_asked():
    from mosaic_safety.evaluation.metrics import pooled, rate, wilson

    p = pooled([rate([True, False])], distinct=5)  # 'distinct' above the answers counted
    assert "n_eff" not in p and (p["lo"], p["hi"]) == pytest.approx(wilson(1, 2))


def test_mean_rate_skips_subsets_without_prompts_among_others():
    from mosaic_safety.evaluation.metrics import mean_rate, rate

    assert mean_rate([rate([True, True]), rate([]), rate([False, True])]) == 0.75


def test_negative_counts_are_refused_by_wilson():
    from mosaic_safety.evaluation.metrics import wilson

    for k, n in ((-1, 10), (-1, 100), (-2, 1)):
        with pytest.raises(ValueError, match="need 0 <= k <= n"):
            wilson(k, n)


# -- evaluation/protocol.py: behaviour a mutation audit found unpinned ------------------------------
def test_an_order_whose_subsets_all_have_prompts_reports_no_dsr_subsets():
    from mosaic_safety.evaluation.protocol import summarise
    from mosaic_safety.evaluation.report import subsets_cell

    cats = ["a", "b"]
    groups = {"a": 2, "b": 2, "neutral": 2}
    policies = [Policy(("a",)), Policy(("b",))]
    votes = {(p.key, g): [True, False] for p in policies for g in groups}
    order = summarise(policies, groups, votes, cats)["orders"]["1"]
    assert "dsr_subsets" not in order and subsets_cell(order) == "2"


def test_order_intervals_count_the_inactive_prompts_the_sampled_subsets_ask():
    """Two sampled subsets of order 2 over a, b, c, d: {a,b} and {a,c} leave out {c,d} and {b,d},
    30 different prompts (a's are never inactive), asked 40 times."""
    from mosaic_safety.evaluation.metrics import wilson
    from mosaic_safety.evaluation.protocol import summarise

    cats = ["a", "b", "c", "d"]
    groups = {c: 10 for c in cats}
    policies = [Policy(("a", "b")), Policy(("a", "c"))]
    votes = {(p.key, g): [i == 0 for i in range(10)] for p in policies for g in groups}
    order = summarise(policies, groups, votes, cats)["orders"]["2"]
    inactive = order["or_inactive_pooled"]
    assert (inactive["k"], inactive["n"], inactive["n_eff"]) == (4, 40, 30)
    assert (inactive["lo"], inactive["hi"]) == pytest.approx(wilson(3, 30))
    dsr = order["dsr_pooled"]  # {a,b} and {a,c} ask a, b and c: 30 prompts, 40 answers
    assert (dsr["n"], dsr["n_eff"]) == (40, 30)


def test_earlier_results_with_a_damaged_plan_are_another_evaluations(tmp_path, plan):
    """A results.json whose plan is not a mapping (hand-edited, another program's) raised an
    AttributeError traceback from the check that protects --out; it differs from this evaluation."""
    from mosaic_safety.cli import _check_earlier_results
    from mosaic_safety.config import ConfigError

    for damaged in ([1, 2], "x", 3):
        (tmp_path / "results.json").write_text(json.dumps({"method": {"method": "none"}, "plan": damaged}))
        with pytest.raises(ConfigError, match=r"holds the results of another evaluation \(its .*plan"):
            _check_earlier_results(tmp_path, {"method": {"method": "none"}}, plan)


def test_a_second_eval_into_an_out_in_use_is_refused(tmp_path, tiny_backbone, tiny_tokens):
    """Two evaluations started into one --out both passed the check of earlier results (there were
    none yet), both wrote results.json, and both said so: one's results were silently the other's."""
    import fcntl
    import os

    env = {**os.environ, "MOSAIC_PROGRESS": "0", "MOSAIC_CACHE": str(tmp_path / "cache")}
    art, out = tmp_path / "art", tmp_path / "ev"
    tiny_tokens.save(art, tiny_backbone.describe())
    out.mkdir()
    (out / "results.json").write_text("{}")  # what the running evaluation wrote so far
    args = ["eval", "-a", str(art), "--model", "tiny-random-llama", "--out", str(out), "--overwrite"]
    with (out / ".mosaic-eval.lock").open("a") as held:  # what a running `mosaic eval` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        r = _mosaic(*args, "--limit", "1", "--max-order", "1", "--max-new-tokens", "2", env=env)
    assert r.returncode == 2 and "in use by another `mosaic eval`" in r.stderr, r.stderr
    assert (out / "results.json").read_text() == "{}"
