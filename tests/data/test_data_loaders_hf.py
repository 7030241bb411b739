"""load_hf: optional dependency handling and column mapping over Hugging Face rows.

`datasets` is not a dependency of this project and is not installed in CI. The first test checks the
real missing-package path; the others put a minimal stand-in for the `datasets` module in
``sys.modules`` (a list of rows with ``column_names``), so the code under test - our column mapping,
split naming and validation - runs for real.
"""

from __future__ import annotations

import sys
import types

import pytest

from mosaic_safety.data import DataError, load_hf


class Rows(list):
    def __init__(self, rows: list[dict]):
        super().__init__(rows)
        self.column_names = list(rows[0]) if rows else []


def fake_datasets(tables: dict[tuple[str, str], list[dict]]) -> types.ModuleType:
    mod = types.ModuleType("datasets")

    def load_dataset(name: str, split: str):
        if (name, split) not in tables:
            raise FileNotFoundError(f"Couldn't find a dataset script or data file for {name!r}")
        return Rows(tables[(name, split)])

    mod.load_dataset = load_dataset
    mod.load_from_disk = lambda path: {"train": Rows(tables[("disk", "train")])}
    return mod


def test_missing_datasets_package_names_pip(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_hf("org/set")


def test_column_mapping_and_split_from_the_loaded_split(monkeypatch, minors):
    rows = [{"text": "mix a negroni", "label": "alcohol"}, {"text": "two dice odds", "label": "neutral"}]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({("org/set", "validation"): rows}))
    exs = load_hf(
        "org/set",
        split="validation",
        columns={"prompt": "text", "category": "label"},
        registry=minors,
        defaults={"source": "org"},
    )
    assert [(e.id, e.prompt, e.category, e.split, e.source) for e in exs] == [
        ("set-00001", "mix a negroni", "alcohol", "val", "org"),
        ("set-00002", "two dice odds", "neutral", "val", "org"),
    ]


def test_bad_rows_reported_with_row_numbers(monkeypatch, minors):
    rows = [
        {"prompt": "ok one", "category": "alcohol", "split": "train"},
        {"prompt": "", "category": "alcohol", "split": "train"},
        {"prompt": "third", "category": "wine", "split": "test"},
    ]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({("org/set", "train"): rows}))
    with pytest.raises(DataError) as info:
        load_hf("org/set", registry=minors)
    assert info.value.problems[0] == "org/set[train]:2: empty prompt"
    assert info.value.problems[1].startswith("org/set[train]:3: unknown category 'wine'")


def test_load_failure_is_a_data_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({}))
    with pytest.raises(DataError, match=r"org/none\[train\]: cannot load dataset \(FileNotFoundError"):
        load_hf("org/none")


def test_saved_dataset_directory(monkeypatch, tmp_path):
    (tmp_path / "dataset_dict.json").write_text("{}", encoding="utf-8")
    rows = [{"prompt": "hello world again", "category": "neutral", "split": "test", "id": "x1"}]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({("disk", "train"): rows}))
    exs = load_hf(tmp_path, split="train")
    assert [(e.id, e.split) for e in exs] == [("x1", "test")]  # the split column wins over the loaded split
