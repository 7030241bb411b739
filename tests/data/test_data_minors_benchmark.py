"""Quality gates of the built-in `minors` benchmark (see docs/benchmark.md, section 2).

These read the authored files as they are; a failure message names the rows to fix.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mosaic_safety.data import load_jsonl
from mosaic_safety.data.loaders import near_duplicate_pairs, prompt_key
from mosaic_safety.data.suites import BUILTIN_DIR
from mosaic_safety.policy import NEUTRAL, CategoryRegistry

MINORS_DIR = BUILTIN_DIR / "minors"

REGISTRY = CategoryRegistry.load("minors")
CATEGORIES = REGISTRY.names
FILES = [*CATEGORIES, NEUTRAL]
KEYS = {"id", "prompt", "category", "split", "source", "subtopic"}
POSITIVE_SPLITS = {"train": 300, "val": 100, "test": 100}
BOUNDARY_SPLITS = {"train": 30, "val": 10, "test": 10}


def path_of(name: str):
    return MINORS_DIR / f"{name}.jsonl"


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    """Raw rows per file (test_schema checks they are valid Examples); a missing file has no rows,
    so its own tests fail while the gates still run on the other files."""
    out = {}
    for name in FILES:
        text = path_of(name).read_text(encoding="utf-8") if path_of(name).is_file() else ""
        out[name] = [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


@pytest.fixture(scope="module")
def everything(rows) -> list[tuple[str, int, dict]]:
    return [(name, i, r) for name in FILES for i, r in enumerate(rows[name], start=1)]


def test_the_suite_has_exactly_these_files():
    assert sorted(p.stem for p in MINORS_DIR.glob("*.jsonl")) == sorted(FILES)
    assert sorted(p.name for p in MINORS_DIR.iterdir() if p.suffix not in (".jsonl",)) == ["registry.yaml"]


@pytest.mark.parametrize("name", FILES)
def test_schema(name, rows):
    load_jsonl(path_of(name), registry=REGISTRY)  # raises DataError listing every bad row
    bad = []
    for i, r in enumerate(rows[name], start=1):
        want = KEYS | ({"near"} if r.get("category") == NEUTRAL and name != NEUTRAL else set())
        if set(r) != want:
            bad.append(f"{name}.jsonl:{i}: keys {sorted(r)} != {sorted(want)}")
        if r.get("source") != "builtin" or not str(r.get("subtopic", "")).strip():
            bad.append(f"{name}.jsonl:{i}: source must be 'builtin' and subtopic non-empty")
        if name != NEUTRAL and r["category"] not in (name, NEUTRAL):
            bad.append(f"{name}.jsonl:{i}: category {r['category']!r} in {name}.jsonl")
        if name != NEUTRAL and r["category"] == NEUTRAL and r.get("near") != name:
            bad.append(f"{name}.jsonl:{i}: boundary row must have near={name!r}")
    assert not bad, "\n".join(bad[:50])


@pytest.mark.parametrize("name", CATEGORIES)
def test_category_counts(name, rows):
    positives = Counter(r["split"] for r in rows[name] if r["category"] == name)
    boundary = Counter(r["split"] for r in rows[name] if r["category"] == NEUTRAL and r.get("near") == name)
    assert dict(positives) == POSITIVE_SPLITS
    assert dict(boundary) == BOUNDARY_SPLITS
    assert len(rows[name]) == 550


def test_neutral_counts(rows):
    assert all(r["category"] == NEUTRAL and "near" not in r for r in rows[NEUTRAL])
    assert dict(Counter(r["split"] for r in rows[NEUTRAL])) == POSITIVE_SPLITS


def test_totals(everything):
    assert len(everything) == 3250  # 5 x (500 + 50 boundary) + 500 neutral
    boundary = [r for _, _, r in everything if r.get("near")]
    assert len(boundary) == 250
    assert Counter(r["near"] for r in boundary) == {c: 50 for c in CATEGORIES}


def test_ids_unique_across_files(everything):
    seen: dict[str, str] = {}
    dups = []
    for name, i, r in everything:
        where = f"{name}.jsonl:{i}"
        if r["id"] in seen:
            dups.append(f"{where}: id {r['id']!r} also at {seen[r['id']]}")
        seen.setdefault(r["id"], where)
    assert not dups, "\n".join(dups)


def test_no_exact_duplicates(everything):
    seen: dict[str, str] = {}
    dups = []
    for name, i, r in everything:
        key = prompt_key(r["prompt"])
        if key in seen:
            dups.append(f"{name}.jsonl:{i} repeats {seen[key]}: {r['prompt']!r}")
        seen.setdefault(key, f"{name}.jsonl:{i}")
    assert not dups, "\n".join(dups)


def test_no_near_duplicates_within_or_across_splits(everything):
    prompts = [r["prompt"] for _, _, r in everything]
    pairs = near_duplicate_pairs(prompts, 0.5)
    report = [
        f"{everything[i][0]}.jsonl:{everything[i][1]} ({everything[i][2]['split']}) ~ "
        f"{everything[j][0]}.jsonl:{everything[j][1]} ({everything[j][2]['split']}) jaccard={s:.2f}\n"
        f"    {prompts[i]!r}\n    {prompts[j]!r}"
        for i, j, s in pairs
    ]
    assert not pairs, f"{len(pairs)} near-duplicate pairs (word-trigram Jaccard >= 0.5):\n" + "\n".join(
        report
    )


def _balance_problems(label: str, group: list[dict], min_topics: int, need_all_splits: bool) -> list[str]:
    counts = Counter(r["subtopic"] for r in group)
    problems = []
    if len(counts) < min_topics:
        problems.append(f"{label}: {len(counts)} sub-topics, need at least {min_topics}")
    if counts and max(counts.values()) > 2 * min(counts.values()):
        problems.append(f"{label}: largest sub-topic more than 2x the smallest: {dict(counts)}")
    if need_all_splits:
        for topic in counts:
            splits = {r["split"] for r in group if r["subtopic"] == topic}
            if splits != {"train", "val", "test"}:
                problems.append(f"{label}: sub-topic {topic!r} only in {sorted(splits)}")
    return problems


def test_subtopics_are_balanced(rows):
    problems = []
    for name in CATEGORIES:
        positives = [r for r in rows[name] if r["category"] == name]
        boundary = [r for r in rows[name] if r["category"] == NEUTRAL]
        problems += _balance_problems(name, positives, 5, need_all_splits=True)
        problems += _balance_problems(f"{name} boundary", boundary, 3, need_all_splits=False)
    problems += _balance_problems(NEUTRAL, rows[NEUTRAL], 5, need_all_splits=True)
    assert not problems, "\n".join(problems)
