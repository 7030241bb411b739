"""Read examples from JSONL, CSV or Hugging Face ``datasets`` and check them.

Every loader works in two passes: parse all rows, collecting every problem with its ``file:line``,
then validate the whole set (registry membership, duplicate ids and prompts). Only when nothing is
wrong are examples returned, so a caller never trains on a half-loaded file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..policy import NEUTRAL, CategoryRegistry
from .schema import FIELDS, REQUIRED_FIELDS, SPLITS, DataError, Example

RegistryLike = CategoryRegistry | str | Path | None

# HF datasets name their validation split "validation"; ours is "val".
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


@dataclass
class Parsed:
    """Rows read from one source before validation: examples, where each came from, and problems."""

    examples: list[Example] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def extend(self, other: Parsed) -> None:
        self.examples += other.examples
        self.locations += other.locations
        self.problems += other.problems


def _registry(registry: RegistryLike) -> CategoryRegistry | None:
    if registry is None or isinstance(registry, CategoryRegistry):
        return registry
    return CategoryRegistry.load(registry)


def _lone_surrogate(text: str) -> str | None:
    """Where ``text`` holds half a UTF-16 pair (a JSON ``"\\ud83d"``, an emoji cut in two), if it
    does. JSON accepts the escape, but no tokenizer or UTF-8 file takes the result: a row that
    passed validation would fail at generation time instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate {text[exc.start]!r} at character {exc.start + 1}"
    return None


# -- one record -> Example -------------------------------------------------------------------------
def record_to_example(record: Mapping[str, Any], loc: str) -> tuple[Example | None, list[str]]:
    """Turn one mapping with our field names into an Example, or return why it cannot be one."""
    problems: list[str] = []
    missing = [k for k in REQUIRED_FIELDS if record.get(k) is None]
    if missing:
        problems.append(f"{loc}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    values: dict[str, Any] = {}
    for key in FIELDS:
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            problems.append(f"{loc}: field {key!r} must be a string, got {type(value).__name__}")
            continue
        surrogate = _lone_surrogate(value)
        if surrogate:
            problems.append(f"{loc}: field {key!r} is not valid Unicode text ({surrogate})")
            continue
        values[key] = value
    if problems:
        return None, problems
    if not values["prompt"].strip():
        problems.append(f"{loc}: empty prompt")
    elif not visible_text(values["prompt"]).strip():  # as the duplicate check reads it: nothing
        problems.append(f"{loc}: empty prompt (only invisible characters such as zero-width spaces)")
    for key in ("id", "category", "source", "near"):
        if key in values and not values[key].strip():
            problems.append(f"{loc}: empty {key}")
    if values["id"] != values["id"].strip():
        problems.append(f"{loc}: id {values['id']!r} has surrounding whitespace")
    split = values["split"]
    if split not in SPLITS:
        problems.append(f"{loc}: split {split!r} is not one of {', '.join(SPLITS)}")
    if values.get("near") is not None and values["category"] != NEUTRAL:
        problems.append(
            f"{loc}: 'near' is only for {NEUTRAL!r} (boundary) rows, category is {values['category']!r}"
        )
    if problems:
        return None, problems
    return Example(**values), []


# -- file reading ----------------------------------------------------------------------------------
def _read_lines(path: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """Decode a file line by line so an encoding error can be reported with its line number."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], [f"{path}: file not found"]
    except OSError as exc:
        return [], [f"{path}: cannot read ({exc.strerror or exc})"]
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines: list[tuple[int, str]] = []
    problems: list[str] = []
    for i, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append((i, chunk.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as exc:
            bad = chunk[exc.start]
            problems.append(
                f"{path}:{i}: not valid UTF-8 (byte 0x{bad:02x} at column {exc.start + 1}); "
                "save the file as UTF-8"
            )
    return lines, problems


class _RepeatedKey(ValueError):
    """A JSON object that names a field twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen[key] = value
    return seen


def parse_jsonl(path: str | Path) -> Parsed:
    """Parse a JSONL file without validating it as a set (see `load_jsonl`)."""
    path = Path(path)
    out = Parsed()
    lines, out.problems = _read_lines(path)
    for lineno, text in lines:
        if not text.strip():
            continue
        loc = f"{path}:{lineno}"
        try:
            record = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            out.problems.append(f"{loc}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        except _RepeatedKey as exc:  # json.loads keeps the last: a second "split" would move the row
            out.problems.append(f"{loc}: field {exc.args[0]!r} given twice")
            continue
        if not isinstance(record, dict):
            out.problems.append(f"{loc}: a row must be a JSON object, got {type(record).__name__}")
            continue
        unknown = sorted(set(record) - set(FIELDS))
        if unknown:
            out.problems.append(f"{loc}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
            continue
        example, problems = record_to_example(record, loc)
        out.problems += problems
        if example is not None:
            out.examples.append(example)
            out.locations.append(loc)
    if not out.examples and not out.problems:
        out.problems.append(f"{path}: empty file (no rows)")
    return out


def _field_sources(
    header: Sequence[str], columns: Mapping[str, str] | None, defaults: Mapping[str, str] | None, origin: str
) -> tuple[dict[str, str], list[str]]:
    """Resolve which column feeds each field; report fields with neither a column nor a default."""
    columns = dict(columns or {})
    defaults = dict(defaults or {})
    unknown = sorted(set(columns) - set(FIELDS)) + sorted(set(defaults) - set(FIELDS))
    if unknown:
        return {}, [f"{origin}: unknown field name(s) in column mapping: {', '.join(unknown)}"]
    resolved: dict[str, str] = {}
    problems = []
    for key in FIELDS:
        column = columns.get(key, key)
        if column in header:
            resolved[key] = column
        elif key in columns:
            problems.append(
                f"{origin}: column {column!r} (for {key!r}) not found; columns are {', '.join(header)}"
            )
        elif key in REQUIRED_FIELDS and key != "id" and key not in defaults:
            problems.append(
                f"{origin}: no column for required field {key!r} "
                "(map one with columns= / --column, or give a default / --default)"
            )
    return resolved, problems


def examples_from_records(
    records: Iterable[tuple[str, Mapping[str, Any]]],
    header: Sequence[str],
    origin: str,
    columns: Mapping[str, str] | None = None,
    defaults: Mapping[str, str] | None = None,
    id_prefix: str = "row",
) -> Parsed:
    """Map tabular records (location, row) onto Examples through a column mapping.

    ``columns`` maps our field names to the source's column names (``{"prompt": "Goal"}``); fields
    without a column take ``defaults``; a missing id becomes ``<id_prefix>-<row number>``. Empty
    cells of optional fields count as unset.
    """
    out = Parsed()
    sources, out.problems = _field_sources(header, columns, defaults, origin)
    if out.problems:
        return out
    for n, (loc, row) in enumerate(records, start=1):
        record: dict[str, Any] = dict(defaults or {})
        for key, column in sources.items():
            value = row.get(column)
            if value is None or (key not in REQUIRED_FIELDS and value == ""):
                continue
            record[key] = value
        record.setdefault("id", f"{id_prefix}-{n:05d}")
        if isinstance(record.get("split"), str):
            record["split"] = _SPLIT_ALIASES.get(record["split"], record["split"])
        example, problems = record_to_example(record, loc)
        out.problems += problems
        if example is not None:
            out.examples.append(example)
            out.locations.append(loc)
    return out


def parse_csv(
    path: str | Path, columns: Mapping[str, str] | None = None, defaults: Mapping[str, str] | None = None
) -> Parsed:
    """Parse a CSV file (header row required) without validating it as a set (see `load_csv`)."""
    path = Path(path)
    lines, problems = _read_lines(path)
    if problems:
        return Parsed(problems=problems)
    reader = csv.reader(io.StringIO("\n".join(text for _, text in lines), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return Parsed(problems=[f"{path}: empty file"])
    except csv.Error as exc:
        return Parsed(problems=[f"{path}:1: bad CSV header ({exc})"])
    header = [h.strip() for h in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        return Parsed(problems=[f"{path}:1: header names {', '.join(map(repr, repeated))} more than once"])
    rows: list[tuple[str, dict[str, str]]] = []
    bad: list[str] = []
    previous = reader.line_num
    try:
        for cells in reader:
            start, previous = previous + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                bad.append(f"{path}:{start}: {len(cells)} cells, the header has {len(header)}")
                continue
            rows.append((f"{path}:{start}", dict(zip(header, cells, strict=True))))
    except csv.Error as exc:
        bad.append(f"{path}:{reader.line_num}: bad CSV ({exc})")
    out = examples_from_records(rows, header, str(path), columns, defaults, id_prefix=path.stem)
    out.problems = bad + out.problems
    if not out.examples and not out.problems:
        out.problems.append(f"{path}: no rows after the header")
    return out


JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATA_FILE_SUFFIXES = (*JSONL_SUFFIXES, ".csv")


def parse_file(
    path: str | Path, columns: Mapping[str, str] | None = None, defaults: Mapping[str, str] | None = None
) -> Parsed:
    """Parse a .jsonl or .csv file by its suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        if columns or defaults:
            return Parsed(problems=[f"{path}: column mappings apply to CSV and HF data, not JSONL"])
        return parse_jsonl(path)
    if suffix == ".csv":
        return parse_csv(path, columns, defaults)
    return Parsed(problems=[f"{path}: unsupported file type {suffix or '(none)'!r}; use .jsonl or .csv"])


# -- validation of a set ---------------------------------------------------------------------------
def visible_text(text: str) -> str:
    """``text`` as a reader sees it: NFKC-normalised (a composed and a decomposed "é", full-width
    letters) and without invisible format characters (zero-width spaces and joiners, soft hyphens,
    BOMs), so that copies differing only there count as copies."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def prompt_key(prompt: str) -> str:
    """Normalised prompt used to find exact duplicates (case, whitespace, Unicode normal form and
    invisible characters do not count)."""
    return " ".join(visible_text(prompt).casefold().split())


def validate_examples(
    examples: Sequence[Example], registry: RegistryLike = None, locations: Sequence[str] | None = None
) -> list[str]:
    """Problems of a set of examples as ``location: reason`` lines (empty when all is well).

    With a registry, a category must be a registry name or ``neutral`` and ``near`` a registry name.
    Ids must be unique and no prompt may appear twice: a repeated prompt is either a label conflict or
    a train/test leak.
    """
    reg = _registry(registry)
    locs = list(locations) if locations is not None else [f"<{ex.id}>" for ex in examples]
    problems: list[str] = []
    first_id: dict[str, str] = {}
    first_prompt: dict[str, tuple[str, str]] = {}
    for ex, loc in zip(examples, locs, strict=True):
        if reg is not None:
            if ex.category != NEUTRAL and ex.category not in reg:
                problems.append(
                    f"{loc}: unknown category {ex.category!r}; valid: {', '.join(reg.names)}, {NEUTRAL}"
                )
            if ex.near is not None and ex.near not in reg:
                problems.append(f"{loc}: unknown near category {ex.near!r}; valid: {', '.join(reg.names)}")
        if ex.id in first_id:
            problems.append(f"{loc}: duplicate id {ex.id!r} (first at {first_id[ex.id]})")
        else:
            first_id[ex.id] = loc
        key = prompt_key(ex.prompt)
        if key in first_prompt:
            other_id, other_loc = first_prompt[key]
            problems.append(f"{loc}: duplicate prompt (same as {other_id!r} at {other_loc})")
        else:
            first_prompt[key] = (ex.id, loc)
    return problems


def finish(parsed: Parsed, registry: RegistryLike = None) -> list[Example]:
    """Validate parsed rows as a set; return them only if the whole source is clean."""
    problems = list(parsed.problems)
    problems += validate_examples(parsed.examples, registry, parsed.locations)
    if problems:
        raise DataError(problems)
    return list(parsed.examples)


# -- public loaders --------------------------------------------------------------------------------
def load_jsonl(path: str | Path, registry: RegistryLike = None) -> list[Example]:
    """Load a JSONL file of examples; raise DataError listing every bad row."""
    return finish(parse_jsonl(path), registry)


def load_csv(
    path: str | Path,
    columns: Mapping[str, str] | None = None,
    registry: RegistryLike = None,
    *,
    defaults: Mapping[str, str] | None = None,
) -> list[Example]:
    """Load a CSV file; ``columns`` maps our field names to its headers, ``defaults`` fills the rest."""
    return finish(parse_csv(path, columns, defaults), registry)


def load_file(
    path: str | Path,
    registry: RegistryLike = None,
    columns: Mapping[str, str] | None = None,
    defaults: Mapping[str, str] | None = None,
) -> list[Example]:
    """Load a .jsonl or .csv file by its suffix."""
    return finish(parse_file(path, columns, defaults), registry)


HFDataFiles = str | Path | Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]]


def _hf_data_files(data_files: HFDataFiles, split: str) -> str | list[str] | dict[str, Any]:
    """``data_files`` as ``datasets`` takes it: paths as strings, a bare file or list under ``split``."""

    def strs(files: str | Path | Sequence[str | Path]) -> str | list[str]:
        return str(files) if isinstance(files, str | Path) else [str(f) for f in files]

    if isinstance(data_files, Mapping):
        return {name: strs(files) for name, files in data_files.items()}
    return {split: strs(data_files)}


def load_hf(
    name_or_path: str | Path,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    registry: RegistryLike = None,
    *,
    defaults: Mapping[str, str] | None = None,
    data_files: HFDataFiles | None = None,
) -> list[Example]:
    """Load a Hugging Face dataset: a hub name, a directory saved with ``save_to_disk``, or data files.

    - a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` is read with
      ``datasets.load_from_disk`` (for a ``DatasetDict``, ``split`` picks the split);
    - with ``data_files``, ``name_or_path`` is a ``datasets`` builder such as ``"json"`` or ``"csv"``
      and the call is ``datasets.load_dataset(name_or_path, data_files=..., split=split)``. A single
      file or a list of files is filed under ``split`` (so ``split="validation"`` works on one file);
      a mapping ``{split name: file(s)}`` is passed as it is. Row locations and default ids then name
      the file, e.g. ``val.jsonl[validation]:3`` and ``val-00003``;
    - anything else goes to ``datasets.load_dataset(name_or_path, split=split)`` (the hub or its
      cache; with ``HF_HUB_OFFLINE=1`` only cached or local datasets load).

    ``datasets`` is imported here, not at module import, because it is an optional dependency
    (``pip install 'mosaic-safety[hf]'``). When the dataset has no split column, its rows take the
    split they were loaded from (``validation`` -> ``val``).
    """
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(
            f"{name_or_path}: loading Hugging Face datasets needs the optional 'datasets' package: "
            "pip install datasets"
        ) from None
    files = None if data_files is None else _hf_data_files(data_files, split)
    chosen = files.get(split) if isinstance(files, dict) else None
    single = Path(chosen) if isinstance(chosen, str) else None
    origin = f"{single if single is not None else name_or_path}[{split}]"
    local = Path(name_or_path)
    try:
        if files is not None:
            dataset = datasets.load_dataset(str(name_or_path), data_files=files, split=split)
        elif local.is_dir() and (local / "dataset_dict.json").exists():
            splits = datasets.load_from_disk(str(local))
            if split not in splits:
                raise DataError(f"{origin}: no split {split!r}; the saved dataset has {', '.join(splits)}")
            dataset = splits[split]
        elif local.is_dir() and (local / "dataset_info.json").exists():
            dataset = datasets.load_from_disk(str(local))
        else:
            dataset = datasets.load_dataset(str(name_or_path), split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (offline, missing split, bad path)
        raise DataError(
            f"{origin}: cannot load dataset ({type(exc).__name__}: {exc}); with HF_HUB_OFFLINE=1 only "
            "cached or local datasets load"
        ) from exc
    header = list(dataset.column_names)
    merged = dict(defaults or {})
    if (columns or {}).get("split", "split") not in header and "split" not in merged:
        merged["split"] = _SPLIT_ALIASES.get(split, split)
    records = ((f"{origin}:{i}", row) for i, row in enumerate(dataset, start=1))
    # the split is in default ids unless a file of its own holds it: one dataset's splits together
    # in a suite would otherwise repeat name-00001, name-00002, ...
    id_prefix = single.stem if single is not None else f"{Path(str(name_or_path)).name}-{split}"
    parsed = examples_from_records(records, header, origin, columns, merged, id_prefix=id_prefix)
    return finish(parsed, registry)


# -- near-duplicates -------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def word_trigrams(text: str) -> frozenset[tuple[str, ...]]:
    """Lower-cased word trigrams; a text of fewer than three words is one shingle of all its words."""
    words = _WORD.findall(visible_text(text).casefold())
    if len(words) < 3:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(zip(words, words[1:], words[2:], strict=False))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """All pairs (i < j) whose word-trigram Jaccard similarity is at least ``threshold``.

    Exact, not sampled: prefix filtering (index each text's rarest trigrams only) keeps the candidate
    set small, and every candidate is verified with the true Jaccard. A pair with Jaccard >= t must
    share a trigram within the first ``|A| - ceil(t*|A|) + 1`` trigrams of each set under one global
    order, so no qualifying pair is missed.
    """
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    shingles = [word_trigrams(t) for t in texts]
    df = Counter(s for sh in shingles for s in sh)
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    pairs: list[tuple[int, int, float]] = []
    for j, sh in enumerate(shingles):
        if not sh:
            continue
        ordered = sorted(sh, key=lambda s: (df[s], s))
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1]
        candidates = {i for s in prefix for i in index[s]}
        for i in sorted(candidates):
            score = jaccard(shingles[i], sh)
            if score >= threshold:
                pairs.append((i, j, score))
        for s in prefix:
            index[s].append(j)
    return pairs
