"""load_hf against the real Hugging Face `datasets` library, offline.

`datasets` is in the `dev` extra (and the optional `hf` extra). Every test but the first builds real
datasets with ``Dataset.from_list`` saved with ``save_to_disk``, or writes real JSON/CSV data files for
``load_dataset("json"|"csv", data_files=...)``, under tmp_path, with HF_HUB_OFFLINE=1 and
HF_DATASETS_OFFLINE=1. The first test hides the package to check our own missing-package error.
"""

from __future__ import annotations

import json
import sys

import pytest

from mosaic_safety.data import DataError, load_hf

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """HF offline, and the datasets cache under tmp_path (not the user's home)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read these variables once, when imported; give them the values the variables say.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def save_dict(path, splits: dict[str, list[dict]]):
    parts = {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return path


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_missing_datasets_package_names_pip(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_hf("org/set")


def test_column_mapping_and_split_from_the_loaded_split(tmp_path, minors):
    rows = [{"text": "mix a negroni", "label": "alcohol"}, {"text": "two dice odds", "label": "neutral"}]
    path = save_dict(tmp_path / "set", {"validation": rows, "train": [{"text": "other", "label": "x"}]})
    exs = load_hf(
        path,
        split="validation",
        columns={"prompt": "text", "category": "label"},
        registry=minors,
        defaults={"source": "org"},
    )
    assert [(e.id, e.prompt, e.category, e.split, e.source) for e in exs] == [
        ("set-validation-00001", "mix a negroni", "alcohol", "val", "org"),
        ("set-validation-00002", "two dice odds", "neutral", "val", "org"),
    ]


def test_default_ids_differ_between_the_splits_of_one_dataset(tmp_path):
    from mosaic_safety.data.loaders import validate_examples

    rows = [{"prompt": f"question {i}", "category": "neutral"} for i in range(2)]
    other = [{"prompt": f"another {i}", "category": "neutral"} for i in range(2)]
    path = save_dict(tmp_path / "set", {"train": rows, "validation": other})
    both = load_hf(path, split="train") + load_hf(path, split="validation")
    assert len({e.id for e in both}) == 4 and validate_examples(both) == []


def test_bad_rows_reported_with_row_numbers(tmp_path, minors):
    rows = [
        {"prompt": "ok one", "category": "alcohol", "split": "train"},
        {"prompt": "", "category": "alcohol", "split": "train"},
        {"prompt": "third", "category": "wine", "split": "test"},
    ]
    path = save_dict(tmp_path / "set", {"train": rows})
    with pytest.raises(DataError) as info:
        load_hf(path, registry=minors)
    assert info.value.problems[0] == f"{path}[train]:2: empty prompt"
    assert info.value.problems[1].startswith(f"{path}[train]:3: unknown category 'wine'")


def test_load_failure_is_a_data_error():
    # Offline, a hub name that is not cached cannot load: the real library's error is wrapped.
    pattern = r"org/none\[train\]: cannot load dataset \(\w+Error: .*HF_HUB_OFFLINE=1"
    with pytest.raises(DataError, match=pattern):
        load_hf("org/none")


def test_missing_split_of_a_saved_dataset_dict(tmp_path):
    path = save_dict(tmp_path / "set", {"validation": [{"prompt": "p", "category": "neutral"}]})
    with pytest.raises(DataError, match=r"\[train\]: no split 'train'; the saved dataset has validation"):
        load_hf(path)


def test_saved_dataset_directory(tmp_path):
    rows = [{"prompt": "hello world again", "category": "neutral", "split": "test", "id": "x1"}]
    path = save_dict(tmp_path / "disk", {"train": rows})
    exs = load_hf(path, split="train")
    assert [(e.id, e.split) for e in exs] == [("x1", "test")]  # the split column wins over the loaded split


def test_saved_single_dataset_directory(tmp_path):
    rows = [{"prompt": "hello world again", "category": "neutral"}, {"prompt": "bye", "category": "neutral"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    exs = load_hf(tmp_path / "one", split="test")
    assert [(e.id, e.prompt, e.split) for e in exs] == [
        ("one-test-00001", "hello world again", "test"),
        ("one-test-00002", "bye", "test"),
    ]


def test_json_data_file_takes_the_requested_split(tmp_path, minors):
    rows = [
        {"text": "mix a negroni", "label": "alcohol", "extra": 1},
        {"text": "two dice odds", "label": "neutral"},
    ]
    path = write_jsonl(tmp_path / "val.jsonl", rows)
    columns = {"prompt": "text", "category": "label"}
    exs = load_hf("json", split="validation", data_files=path, columns=columns, registry=minors)
    assert [(e.id, e.prompt, e.category, e.split) for e in exs] == [
        ("val-00001", "mix a negroni", "alcohol", "val"),
        ("val-00002", "two dice odds", "neutral", "val"),
    ]


def test_json_data_file_bad_rows_name_the_file_and_row(tmp_path, minors):
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"prompt": "ok one", "category": "alcohol"},
            {"prompt": "   ", "category": "alcohol"},
            {"prompt": "third", "category": "wine"},
        ],
    )
    with pytest.raises(DataError) as info:
        load_hf("json", data_files=str(path), registry=minors)
    assert info.value.problems[0] == f"{path}[train]:2: empty prompt"
    assert info.value.problems[1].startswith(f"{path}[train]:3: unknown category 'wine'")


def test_csv_data_files_mapping_of_splits(tmp_path):
    train = tmp_path / "tr.csv"
    train.write_text("Goal,Category\nhow do dice work,neutral\n", encoding="utf-8")
    test = tmp_path / "te.csv"
    test.write_text("Goal,Category\nwhat is a negroni,neutral\nshuffle cards,neutral\n", encoding="utf-8")
    files = {"train": train, "test": [test]}
    exs = load_hf("csv", split="test", data_files=files, columns={"prompt": "Goal", "category": "Category"})
    assert [(e.id, e.prompt, e.split) for e in exs] == [
        ("csv-test-00001", "what is a negroni", "test"),
        ("csv-test-00002", "shuffle cards", "test"),
    ]


def test_missing_data_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl\[train\]: cannot load dataset"):
        load_hf("json", data_files=tmp_path / "nope.jsonl")
