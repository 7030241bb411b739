"""A suite is a category registry plus the examples labelled with it.

Training, evaluation and the CLI all start from a suite, so "which data" is one name (`minors`,
`harm`) or one directory (``registry.yaml`` + ``*.jsonl``/``*.csv``) instead of loose file lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..policy import NEUTRAL, CategoryRegistry
from .loaders import Parsed, finish, parse_file
from .schema import SPLITS, DataError, Example

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_SUITES: tuple[str, ...] = ("minors", "harm")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".csv")


@dataclass(repr=False)
class Suite:
    """A named registry and its examples, with the views training and evaluation need."""

    name: str
    registry: CategoryRegistry
    examples: list[Example]

    def __repr__(self) -> str:
        # the generated repr printed every example: 835,000 characters for ``minors`` in a notebook
        return f"Suite(name={self.name!r}, categories={self.registry.names!r}, examples={len(self.examples)})"

    def split(self, name: str) -> list[Example]:
        """Examples of one split (train, val or test)."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        return [ex for ex in self.examples if ex.split == name]

    def _rows(self, split: str | None) -> list[Example]:
        return self.examples if split is None else self.split(split)

    def by_category(self, split: str | None = None) -> dict[str, list[Example]]:
        """Examples per category in registry order, then ``neutral`` (boundary rows included)."""
        out: dict[str, list[Example]] = {name: [] for name in (*self.registry.names, NEUTRAL)}
        for ex in self._rows(split):
            out.setdefault(ex.category, []).append(ex)
        return out

    def neutral(self, split: str | None = None) -> list[Example]:
        """Pure neutral rows: unrelated to every category."""
        return [ex for ex in self._rows(split) if ex.category == NEUTRAL and ex.near is None]

    def boundary(self, split: str | None = None, near: str | None = None) -> list[Example]:
        """Neutral rows that resemble a category (``near``); they must be answered, not refused."""
        return [ex for ex in self._rows(split) if ex.is_boundary and (near is None or ex.near == near)]

    def __len__(self) -> int:
        return len(self.examples)


def list_suites() -> list[str]:
    """Names of the built-in suites."""
    return list(BUILTIN_SUITES)


def load_files(
    paths: Sequence[str | Path], registry: CategoryRegistry | str | Path, name: str | None = None
) -> Suite:
    """A suite from explicit data files; ids and prompts must be unique across all of them."""
    reg = registry if isinstance(registry, CategoryRegistry) else CategoryRegistry.load(registry)
    parsed = Parsed()
    for path in paths:
        parsed.extend(parse_file(path))
    examples = finish(parsed, reg)
    return Suite(name=name or reg.name, registry=reg, examples=examples)


def data_files(directory: Path) -> list[Path]:
    """The data files of a suite directory, sorted so loading order (and ids' first sight) is stable."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


def load_directory(directory: str | Path, name: str | None = None) -> Suite:
    """A suite from a directory holding ``registry.yaml`` and its data files."""
    directory = Path(directory)
    registry_path = directory / "registry.yaml"
    if not registry_path.is_file():
        raise DataError(f"{directory}: a suite directory needs a registry.yaml")
    files = data_files(directory)
    if not files:
        raise DataError(f"{directory}: no data files (*.jsonl or *.csv)")
    return load_files(files, registry_path, name=name or directory.name)


def load_suite(
    name_or_path: str | Path | Sequence[str | Path], registry: CategoryRegistry | str | Path | None = None
) -> Suite:
    """Load a suite: a built-in name, a suite directory, or data file path(s) with ``registry``.

    A local directory named like a built-in suite is loaded as ``./minors`` (or a ``Path``).

    ``harm`` is assembled from installed PyPI packages (see `external`); a missing package is an error
    that names the pip command.
    """
    if isinstance(name_or_path, (list, tuple)):
        if registry is None:
            raise DataError("loading explicit files needs a registry (a built-in name or a YAML path)")
        return load_files(list(name_or_path), registry)
    # A bare built-in name is always the built-in suite, even beside a folder of that name (a run
    # output, a user's copy): that folder is `./minors`. Training on it by accident would change
    # the data with no sign in the config.
    builtin = isinstance(name_or_path, str) and name_or_path in BUILTIN_SUITES
    spec = str(name_or_path)
    if builtin and spec == "harm":
        from .external import harm_examples  # reads installed packages; only when asked for

        return Suite(name="harm", registry=CategoryRegistry.load("harm"), examples=harm_examples())
    if builtin:
        return load_directory(BUILTIN_DIR / spec, name=spec)
    path = Path(spec)
    if path.is_dir():
        return load_directory(path)
    if path.is_file():
        if registry is None:
            raise DataError(
                f"{path}: a data file is not a suite without a registry: put it in a directory with a "
                "registry.yaml (or, to check the file alone, `mosaic data validate FILE --registry NAME`)"
            )
        return load_files([path], registry, name=path.stem)
    raise DataError(
        f"suite {spec!r} not found: give one of {', '.join(BUILTIN_SUITES)}, a directory with registry.yaml, "
        "or a data file with a registry"
    )
