"""Suites: built-ins, user directories, explicit files, and the split/category views."""

from __future__ import annotations

import json

import pytest

from mosaic_safety.data import DataError, Suite, list_suites, load_suite
from mosaic_safety.policy import CategoryRegistry

REGISTRY_YAML = """
name: tiny
categories:
  - name: cats
    display: cats
    description: requests about cats
    refusal: "I'm sorry, but I can't help with requests about {display} on this platform."
  - name: dogs
    display: dogs
    description: requests about dogs
    refusal: "I'm sorry, but I can't help with requests about {display} on this platform."
"""


def make_dir(tmp_path, files: dict[str, list[dict]]):
    d = tmp_path / "mysuite"
    d.mkdir()
    (d / "registry.yaml").write_text(REGISTRY_YAML, encoding="utf-8")
    for name, rows in files.items():
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return d


ROWS = [
    {"id": "c1", "prompt": "how do cats purr so loudly", "category": "cats", "split": "train"},
    {"id": "c2", "prompt": "best food for an old cat", "category": "cats", "split": "test"},
    {"id": "d1", "prompt": "teach a puppy to sit quietly", "category": "dogs", "split": "train"},
    {"id": "n1", "prompt": "capital of portugal please", "category": "neutral", "split": "train"},
    {
        "id": "b1",
        "prompt": "are cat allergies genetic",
        "category": "neutral",
        "split": "train",
        "near": "cats",
    },
]


def test_list_suites():
    assert list_suites() == ["minors", "harm"]


def test_directory_suite_and_views(tmp_path):
    suite = load_suite(make_dir(tmp_path, {"a.jsonl": ROWS[:3], "b.jsonl": ROWS[3:]}))
    assert isinstance(suite, Suite) and suite.name == "mysuite" and len(suite) == 5
    assert [e.id for e in suite.split("train")] == ["c1", "d1", "n1", "b1"]
    by = suite.by_category("train")
    assert list(by) == ["cats", "dogs", "neutral"]
    assert [e.id for e in by["neutral"]] == ["n1", "b1"]  # boundary rows stay neutral
    assert [e.id for e in suite.neutral("train")] == ["n1"]
    assert [e.id for e in suite.boundary("train")] == ["b1"]
    assert suite.boundary(near="dogs") == []
    assert [e.id for e in suite.by_category()["cats"]] == ["c1", "c2"]
    with pytest.raises(DataError, match="unknown split 'dev'"):
        suite.split("dev")


def test_duplicates_across_files_are_reported_with_both_locations(tmp_path):
    dup = dict(ROWS[0], prompt="a different prompt entirely")
    d = make_dir(tmp_path, {"a.jsonl": ROWS[:2], "b.jsonl": [dup]})
    with pytest.raises(DataError) as info:
        load_suite(d)
    assert info.value.problems == [f"{d / 'b.jsonl'}:1: duplicate id 'c1' (first at {d / 'a.jsonl'}:1)"]


def test_problems_from_all_files_are_collected(tmp_path):
    d = make_dir(
        tmp_path, {"a.jsonl": [dict(ROWS[0], category="birds")], "b.jsonl": [dict(ROWS[2], prompt="")]}
    )
    with pytest.raises(DataError) as info:
        load_suite(d)
    assert [p.split(": ")[0] for p in info.value.problems] == [f"{d / 'b.jsonl'}:1", f"{d / 'a.jsonl'}:1"]


def test_explicit_paths_need_a_registry(tmp_path):
    d = make_dir(tmp_path, {"a.jsonl": ROWS})
    with pytest.raises(DataError, match="needs a registry"):
        load_suite([d / "a.jsonl"])
    suite = load_suite([d / "a.jsonl"], registry=d / "registry.yaml")
    assert suite.registry.names == ("cats", "dogs") and len(suite) == 5
    single = load_suite(d / "a.jsonl", registry=CategoryRegistry.load(d / "registry.yaml"))
    assert single.name == "a" and len(single) == 5


def test_bad_directories_and_names(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="needs a registry.yaml"):
        load_suite(empty)
    (empty / "registry.yaml").write_text(REGISTRY_YAML, encoding="utf-8")
    with pytest.raises(DataError, match="no data files"):
        load_suite(empty)
    with pytest.raises(DataError, match="suite 'nonesuch' not found"):
        load_suite("nonesuch")


def test_builtin_minors_loads_with_its_registry():
    suite = load_suite("minors")  # fails with DataError listing bad rows if the files are invalid
    assert suite.name == "minors" and suite.registry.name == "minors"
    assert {e.source for e in suite.examples} == {"builtin"}


def test_a_local_folder_named_like_a_builtin_does_not_replace_it(tmp_path, monkeypatch):
    """`data.suite: minors` beside a folder called minors (a user's copy, a run output) still trains
    on the built-in suite; the folder is `./minors`. Shadowing would swap the data unannounced."""
    local = make_dir(tmp_path, {"data.jsonl": ROWS})
    local.rename(tmp_path / "minors")
    (tmp_path / "harm").mkdir()  # not even a suite
    (tmp_path / "cats.yaml").write_text(REGISTRY_YAML, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_suite("minors").registry.names == ("addiction", "alcohol", "betting", "horror", "sex")
    assert load_suite("./minors").registry.names == ("cats", "dogs")
    assert load_suite(tmp_path / "minors").registry.names == ("cats", "dogs")
    assert CategoryRegistry.load("minors").names == ("addiction", "alcohol", "betting", "horror", "sex")
    assert len(CategoryRegistry.load("harm").names) == 6
    (tmp_path / "minors.yaml").write_text(REGISTRY_YAML, encoding="utf-8")
    assert CategoryRegistry.load("./minors.yaml").names == ("cats", "dogs")


def test_suite_repr_is_a_summary_not_every_example():
    """The generated repr printed all 3,250 examples (835,000 characters) at a notebook prompt."""
    suite = load_suite("minors")
    text = repr(suite)
    assert len(text) < 200
    assert "minors" in text and "alcohol" in text and f"examples={len(suite)}" in text
