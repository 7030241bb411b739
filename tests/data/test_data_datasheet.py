"""The datasheets state numbers measured from the data: docs must match the files they describe."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mosaic_safety.data import external
from mosaic_safety.data.suites import BUILTIN_DIR

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "docs" / "benchmark.md"
DATA = REPO / "docs" / "data.md"


def block(doc: Path, name: str) -> list[list[str]]:
    """Rows (cells) of the markdown table inside a GENERATED block, header row included."""
    text = doc.read_text(encoding="utf-8")
    m = re.search(rf"<!-- BEGIN GENERATED: {name} -->\n(.*?)<!-- END GENERATED: {name} -->", text, re.S)
    assert m, f"{doc.name}: no generated block {name!r}"
    lines = [line for line in m.group(1).splitlines() if line.startswith("|")]
    assert lines, (
        f"{doc.name}: generated block {name!r} is empty: run python scripts/datasheet_stats.py --write"
    )
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [rows[0], *rows[2:]]  # drop the |---| separator


def minors_rows() -> list[dict]:
    rows = []
    for path in sorted((BUILTIN_DIR / "minors").glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def test_generated_blocks_are_up_to_date():
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "datasheet_stats.py"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_minors_counts_in_datasheet_match_the_files():
    rows = minors_rows()
    table = block(BENCHMARK, "minors-counts")
    assert table[0] == [
        "category",
        "train",
        "val",
        "test",
        "total",
        "boundary train",
        "boundary val",
        "boundary test",
        "boundary total",
    ]
    for cells in table[1:]:
        name = cells[0].strip("*")
        if name == "all":
            pos, bnd = rows, [r for r in rows if r.get("near")]
        elif name == "neutral":
            pos, bnd = [r for r in rows if r["category"] == "neutral" and not r.get("near")], []
        else:
            pos, bnd = [r for r in rows if r["category"] == name], [r for r in rows if r.get("near") == name]
        want = [
            Counter(r["split"] for r in group)[s] for group in (pos, bnd) for s in ("train", "val", "test")
        ]
        want = want[:3] + [len(pos)] + want[3:] + [len(bnd)]
        assert [int(c) for c in cells[1:]] == want, name


def test_minors_lengths_in_datasheet_match_the_files():
    rows = minors_rows()
    table = block(BENCHMARK, "minors-lengths")
    by_name = {cells[0]: cells[1:] for cells in table[1:]}
    for category in ("addiction", "alcohol", "betting", "horror", "sex"):
        words = [len(r["prompt"].split()) for r in rows if r["category"] == category]
        if not words:
            continue
        n, lo, med, mean, hi, _ = by_name[category]
        assert (int(n), int(lo), float(med), float(mean), int(hi)) == (
            len(words),
            min(words),
            statistics.median(words),
            round(statistics.mean(words), 1),
            max(words),
        )


def test_minors_datasheet_states_definitions_and_gates():
    text = BENCHMARK.read_text(encoding="utf-8")
    for heading in ("## 1. Definitions", "## 2. Composition", "## 3. Construction", "## 5. Known limits"):
        assert heading in text
    for phrase in (
        "Jaccard similarity >= 0.5",
        "300 / 100 / 100",
        "30 / 10 / 10",
        "3,250 rows",
        "at most 2x the smallest",
    ):
        assert phrase in text
    quality = {cells[0]: cells[1] for cells in block(BENCHMARK, "minors-quality")[1:]}
    assert quality["examples"] == str(len(minors_rows()))


def test_harm_sources_in_docs_match_the_build():
    build = external.build_harm()
    table = block(DATA, "harm-sources")
    got = {cells[0]: tuple(int(c) for c in cells[1:]) for cells in table[1:]}
    want = {
        s: (r.read, sum(r.unmapped.values()), len(r.duplicates), r.kept) for s, r in build.reports.items()
    }
    assert got == want
    total = [cells for cells in block(DATA, "harm-counts") if cells[0] == "**all**"][0]
    assert [int(c) for c in total[2:]] == [
        *(sum(e.split == s for e in build.examples) for s in ("train", "val", "test")),
        len(build.examples),
    ]
