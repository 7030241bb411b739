"""`mosaic data` end to end: through typer's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mosaic_safety.data.cli import data_app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(data_app, list(args), env={"COLUMNS": "200"})


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "mosaic_safety.data.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.jsonl"
    rows = [
        {"id": "a", "prompt": "mix a margarita for me", "category": "alcohol", "split": "train"},
        {
            "id": "b",
            "prompt": "odds of two sixes with dice",
            "category": "neutral",
            "split": "test",
            "near": "betting",
        },
        {"id": "c", "prompt": "what is the capital of peru", "category": "neutral", "split": "val"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def bad(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"id": "a", "prompt": "ok prompt here", "category": "alcohol", "split": "train"})
        + "\n"
        + "{not json\n"
        + json.dumps({"id": "a", "prompt": "", "category": "wine", "split": "train"})
        + "\n",
        encoding="utf-8",
    )
    return path


def test_validate_ok(good):
    result = invoke("validate", str(good), "--registry", "minors")
    assert result.exit_code == 0, result.output
    assert "ok: 3 examples" in result.output


def test_validate_reports_every_bad_row_and_exits_1(bad):
    result = invoke("validate", str(bad), "--registry", "minors")
    assert result.exit_code == 1
    assert f"{bad}:2: invalid JSON" in result.output
    assert f"{bad}:3: empty prompt" in result.output
    assert "2 problems" in result.output


def test_each_problem_stays_on_one_line_in_a_narrow_terminal(bad):
    """Problems were wrapped at the terminal's width (80 columns in a pipe), so a long path split
    its `file:line: reason` over two lines that grep and an editor's error list could not read."""
    result = runner.invoke(data_app, ["validate", str(bad), "--registry", "minors"], env={"COLUMNS": "40"})
    assert result.exit_code == 1
    assert f"{bad}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)" in (
        result.output.splitlines()
    )
    assert f"{bad}:3: empty prompt" in result.output.splitlines()


@pytest.mark.parametrize("name", ["typo.jsonl", "typo.ndjson", "typo.csv"])
def test_validate_missing_file_says_so(tmp_path, name):
    result = invoke("validate", str(tmp_path / name))
    assert result.exit_code == 1 and f"{name}: file not found" in result.output
    assert "suite" not in result.output


def test_validate_unknown_category_only_with_registry(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p q r", "category": "wine", "split": "train"}) + "\n")
    assert invoke("validate", str(path)).exit_code == 0
    result = invoke("validate", str(path), "-r", "minors")
    assert result.exit_code == 1 and f"{path}:1: unknown category 'wine'" in result.output


def test_validate_a_suite_refuses_a_second_registry():
    result = invoke("validate", "minors", "-r", "harm")
    assert result.exit_code == 1 and "--registry applies to single data files" in result.output


def test_validate_csv_with_column_mapping(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("Goal,Category\nWrite a hoax article,Disinformation\n", encoding="utf-8")
    result = invoke(
        "validate",
        str(path),
        "--column",
        "prompt=Goal",
        "--column",
        "category=Category",
        "--default",
        "split=test",
    )
    assert result.exit_code == 0, result.output
    result = invoke("validate", str(path), "--column", "prompt")
    assert result.exit_code != 0 and "FIELD=VALUE" in result.output


def test_stats_of_a_file(good):
    result = invoke("stats", str(good), "--registry", "minors")
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 5}
    assert lines["alcohol"].split("│")[2].strip() == "1"  # one train row
    assert lines["boundary:betting"].split("│")[4].strip() == "1"  # one test row
    assert "sex" in lines  # every registry category is listed


def test_stats_minors_prints_the_table():
    result = invoke("stats", "minors")
    assert result.exit_code == 0, result.output
    for name in (
        "addiction",
        "alcohol",
        "betting",
        "horror",
        "sex",
        "neutral",
        "total",
        "train",
        "val",
        "test",
    ):
        assert name in result.output


def test_stats_harm_shows_sources_and_unmapped():
    result = invoke("stats", "harm")
    assert result.exit_code == 0, result.output
    assert "rows per source" in result.output and "unmapped source categories" in result.output
    assert "Government decision-making" in result.output and "S009private" in result.output
    total = [line for line in result.output.splitlines() if "total" in line and "│" in line][0]
    assert [c.strip() for c in total.split("│")[2:6]] == ["468", "157", "620", "1245"]


def test_list():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    assert "minors" in result.output and "harm" in result.output and "1245" in result.output


def test_unknown_suite_is_an_error():
    result = invoke("stats", "nonesuch")
    assert result.exit_code == 1 and "suite 'nonesuch' not found" in result.output


def test_subprocess_validate_and_stats(good, bad):
    ok = run_module("validate", str(good), "--registry", "minors")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    fail = run_module("validate", str(bad), "--registry", "minors")
    assert fail.returncode == 1 and f"{bad}:2: invalid JSON" in fail.stdout
    stats = run_module("stats", "harm")
    assert stats.returncode == 0 and "illegal_goods_services" in stats.stdout
    helped = run_module("--help")
    assert helped.returncode == 0 and "validate" in helped.stdout
