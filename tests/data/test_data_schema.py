from mosaic_safety.data import SPLITS, DataError, Example


def test_to_dict_omits_unset_optional_fields_and_round_trips():
    ex = Example(id="a", prompt="p", category="alcohol", split="train")
    assert ex.to_dict() == {
        "id": "a",
        "prompt": "p",
        "category": "alcohol",
        "split": "train",
        "source": "builtin",
    }
    b = Example(id="b", prompt="q", category="neutral", split="val", near="alcohol", subtopic="mocktails")
    assert Example(**b.to_dict()) == b
    assert b.is_boundary and not ex.is_boundary


def test_splits_are_fixed():
    assert SPLITS == ("train", "val", "test")


def test_data_error_lists_every_problem():
    err = DataError(["f.jsonl:2: empty prompt", "f.jsonl:5: invalid JSON"])
    assert err.problems == ["f.jsonl:2: empty prompt", "f.jsonl:5: invalid JSON"]
    assert "f.jsonl:2: empty prompt" in str(err) and "f.jsonl:5: invalid JSON" in str(err)
    assert str(err).startswith("2 data problems")
    assert isinstance(err, ValueError)
