"""load_jsonl: good files load; every kind of bad row is reported as file:line: reason."""

from __future__ import annotations

import pytest

from mosaic_safety.data import DataError, Example, load_jsonl, validate_examples


def problems_of(path, registry=None) -> list[str]:
    with pytest.raises(DataError) as info:
        load_jsonl(path, registry=registry)
    return info.value.problems


def test_loads_valid_rows_with_optional_fields(write_jsonl, make_row, minors):
    path = write_jsonl(
        [
            make_row(1),
            "",
            make_row(2, category="neutral", near="betting", subtopic="probability"),
            make_row(3, split="test", source="mine"),
        ]
    )
    examples = load_jsonl(path, registry=minors)
    assert [e.id for e in examples] == ["r-1", "r-2", "r-3"]
    assert examples[1] == Example(
        id="r-2",
        prompt=make_row(2)["prompt"],
        category="neutral",
        split="train",
        near="betting",
        subtopic="probability",
    )
    assert examples[0].source == "builtin" and examples[2].source == "mine"


def test_registry_by_name_or_path(write_jsonl, make_row):
    path = write_jsonl([make_row(1, category="violence")])
    assert len(load_jsonl(path, registry="harm")) == 1
    with pytest.raises(DataError, match="unknown category 'violence'"):
        load_jsonl(path, registry="minors")


def test_bad_json_reports_line_and_column(write_jsonl, make_row):
    path = write_jsonl([make_row(1), '{"id": "x", "prompt": "p",', make_row(3)])
    probs = problems_of(path)
    assert len(probs) == 1
    assert probs[0].startswith(f"{path}:2: invalid JSON")


def test_non_object_row(write_jsonl, make_row):
    path = write_jsonl([make_row(1), '["a", "b"]'])
    assert problems_of(path) == [f"{path}:2: a row must be a JSON object, got list"]


def test_missing_and_mistyped_fields(write_jsonl):
    path = write_jsonl(
        [
            {"id": "a", "prompt": "hello there friend"},
            {"id": "b", "prompt": 5, "category": "alcohol", "split": "train"},
        ]
    )
    probs = problems_of(path)
    assert probs == [
        f"{path}:1: missing fields category, split",
        f"{path}:2: field 'prompt' must be a string, got int",
    ]


def test_unknown_field_is_an_error(write_jsonl, make_row):
    path = write_jsonl([make_row(1, naer="alcohol")])
    assert problems_of(path) == [f"{path}:1: unknown field naer"]


def test_unknown_category_and_near_against_registry(write_jsonl, make_row, minors):
    path = write_jsonl([make_row(1, category="gambling"), make_row(2, category="neutral", near="gore")])
    probs = problems_of(path, minors)
    assert probs[0].startswith(f"{path}:1: unknown category 'gambling'")
    assert probs[1].startswith(f"{path}:2: unknown near category 'gore'")
    # without a registry any category name is accepted
    assert len(load_jsonl(path)) == 2


def test_near_only_on_neutral_rows(write_jsonl, make_row):
    path = write_jsonl([make_row(1, category="alcohol", near="betting")])
    assert "only for 'neutral'" in problems_of(path)[0]


def test_duplicate_ids_and_prompts(write_jsonl, make_row):
    a = make_row(1)
    path = write_jsonl(
        [a, {**make_row(2), "id": "r-1"}, {**make_row(3), "prompt": "  " + a["prompt"].upper()}]
    )
    probs = problems_of(path)
    assert probs == [
        f"{path}:2: duplicate id 'r-1' (first at {path}:1)",
        f"{path}:3: duplicate prompt (same as 'r-1' at {path}:1)",
    ]


def test_empty_prompt_and_bad_split(write_jsonl, make_row):
    path = write_jsonl([make_row(1, prompt="   "), make_row(2, split="dev")])
    assert problems_of(path) == [
        f"{path}:1: empty prompt",
        f"{path}:2: split 'dev' is not one of train, val, test",
    ]


def test_wrong_encoding_reports_the_line(tmp_path, make_row):
    import json

    path = tmp_path / "latin1.jsonl"
    good = json.dumps(make_row(1)).encode()
    bad = json.dumps(make_row(2, prompt="caf\u00e9 au lait"), ensure_ascii=False).encode("latin-1")
    path.write_bytes(good + b"\n" + bad + b"\n")
    probs = problems_of(path)
    assert len(probs) == 1
    assert probs[0].startswith(f"{path}:2: not valid UTF-8 (byte 0xe9")


def test_a_prompt_of_invisible_characters_only_is_empty(write_jsonl, make_row):
    """A prompt of zero-width spaces or a stray byte-order mark passed the empty-prompt check (they
    are not whitespace), though the duplicate check already read it as empty text."""
    path = write_jsonl([make_row(1, prompt="\u200b\u2060"), make_row(2)])
    assert problems_of(path) == [
        f"{path}:1: empty prompt (only invisible characters such as zero-width spaces)"
    ]
    path = write_jsonl([make_row(1, prompt="\ufeff hello")])  # visible text after them: fine
    assert load_jsonl(path)[0].prompt == "\ufeff hello"


def test_half_an_emoji_from_a_json_escape_is_a_row_problem(tmp_path, make_row):
    """JSON accepts "\\ud83d" alone, which decodes to a lone surrogate: the file validated, and the
    evaluation on it failed at generation time instead (no tokenizer takes such text)."""
    import json

    path = tmp_path / "cut.jsonl"
    rows = [make_row(1), make_row(2, prompt="a cat \ud83d"), make_row(3, subtopic="\udc00")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # ASCII escapes
    assert problems_of(path) == [
        f"{path}:2: field 'prompt' is not valid Unicode text (lone surrogate '\\ud83d' at character 7)",
        f"{path}:3: field 'subtopic' is not valid Unicode text (lone surrogate '\\udc00' at character 1)",
    ]
    whole = make_row(4, prompt="a cat \ud83d\udc31")  # the escaped pair is one emoji: fine
    path.write_text(json.dumps(whole) + "\n", encoding="utf-8")
    assert load_jsonl(path)[0].prompt == "a cat \U0001f431"


def test_utf8_bom_and_crlf_are_accepted(tmp_path, make_row):
    import json

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(make_row(1)).encode() + b"\r\n")
    assert load_jsonl(path)[0].id == "r-1"


def test_every_problem_reported_and_nothing_half_loaded(write_jsonl, make_row, minors):
    path = write_jsonl(
        [
            make_row(1),
            "not json",
            make_row(3, category="gambling"),
            make_row(4, prompt=""),
            make_row(5),
            {**make_row(6), "id": "r-5"},
        ]
    )
    with pytest.raises(DataError) as info:
        load_jsonl(path, registry=minors)
    lines = [p.split(": ", 1)[0] for p in info.value.problems]
    assert lines == [f"{path}:2", f"{path}:4", f"{path}:3", f"{path}:6"]
    assert str(info.value).count(str(path)) >= 4


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_validate_examples_on_objects(minors):
    exs = [Example("a", "p one two", "alcohol", "train"), Example("a", "p three four", "wine", "train")]
    probs = validate_examples(exs, minors)
    assert probs[0].startswith("<a>: unknown category 'wine'")
    assert probs[1] == "<a>: duplicate id 'a' (first at <a>)"
    assert validate_examples(exs[:1], minors) == []


def test_a_field_given_twice_is_a_problem(tmp_path):
    """json.loads keeps the last of two equal keys: a second "split" would move the row silently."""
    path = tmp_path / "twice.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "p q r", "category": "neutral", "split": "test", "split": "train"}\n'
    )
    assert problems_of(path) == [f"{path}:1: field 'split' given twice"]


def test_copies_differing_only_in_unicode_form_or_invisible_characters_are_duplicates(write_jsonl, make_row):
    """A train/test leak survives a copy-paste that decomposed an accent or slipped in a zero-width
    space: the reader sees one prompt, so the check must too."""
    rows = [
        {**make_row(1), "prompt": "Where can I buy a café au lait kit?"},
        {**make_row(2), "prompt": "Where can I buy a cafe\u0301 au lait kit?"},  # decomposed é
        {
            **make_row(3),
            "prompt": "Where can I buy\u200b a café au\u00ad lait kit\ufeff?",
        },  # zero-width, soft hyphen, BOM
        {**make_row(4), "prompt": "Ｗｈｅｒｅ can I buy a café au lait kit?"},  # full-width letters
        {**make_row(5), "prompt": "Where can I buy a cafe au lait kit?"},  # another word: not a copy
    ]
    path = write_jsonl(rows)
    assert problems_of(path) == [
        f"{path}:{n}: duplicate prompt (same as 'r-1' at {path}:1)" for n in (2, 3, 4)
    ]
