"""`mosaic data`: list suites, print their statistics, validate data files.

Mounted by the top-level CLI as ``mosaic data``; also runnable as ``python -m mosaic_safety.data.cli``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from ..policy import NEUTRAL, CategoryRegistry, PolicyError
from .loaders import DATA_FILE_SUFFIXES, load_file
from .schema import SPLITS, DataError, Example
from .suites import BUILTIN_SUITES, list_suites, load_suite

data_app = typer.Typer(
    help="Inspect and validate safety datasets (suites, JSONL and CSV files).", no_args_is_help=True
)
console = Console()


def _pairs(items: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise typer.BadParameter(f"expected FIELD=VALUE, got {item!r}", param_hint=option)
        out[key.strip()] = value.strip()
    return out


def _load_target(
    target: str, registry: str | None, columns: dict[str, str], defaults: dict[str, str]
) -> tuple[str, tuple[str, ...], list[Example]]:
    """Name, category names and examples of a suite name, a suite directory or a single file.

    A file without a registry is checked for form only, and its categories are the ones it uses.
    """
    path = Path(target)
    if path.suffix.lower() in DATA_FILE_SUFFIXES and not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_file():
        reg = CategoryRegistry.load(registry) if registry else None
        examples = load_file(path, reg, columns or None, defaults or None)
        if reg is not None:
            return path.name, reg.names, examples
        used = {ex.category for ex in examples if ex.category != NEUTRAL} | {
            ex.near for ex in examples if ex.near
        }
        return path.name, tuple(sorted(used)), examples
    if registry:  # a suite brings its own registry: a second one would be silently ignored
        raise DataError(f"{target}: --registry applies to single data files; a suite has its registry.yaml")
    suite = load_suite(target)
    return suite.name, suite.registry.names, suite.examples


def _fail(problems: list[str]) -> NoReturn:
    for problem in problems:  # one problem, one line, whatever the width: grep and editors read them
        console.print(problem, markup=False, highlight=False, soft_wrap=True)
    console.print(f"[red]{len(problems)} problem{'s' if len(problems) != 1 else ''}[/red]")
    raise typer.Exit(code=1)


def stats_table(title: str, categories: tuple[str, ...], examples: list[Example]) -> Table:
    """Counts per category (then neutral, and boundary rows by the category they resemble) and split."""
    table = Table(title=f"{title}: {len(examples)} examples")
    table.add_column("category", no_wrap=True)
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    counts = Counter((f"boundary:{ex.near}" if ex.is_boundary else ex.category, ex.split) for ex in examples)
    rows = [*categories, NEUTRAL, *(f"boundary:{n}" for n in categories)]
    rows += sorted({key for key, _ in counts} - set(rows))
    for row in rows:
        per = [counts[(row, s)] for s in SPLITS]
        if sum(per) or not row.startswith("boundary:"):
            table.add_row(row, *map(str, per), str(sum(per)))
    totals = [sum(1 for ex in examples if ex.split == s) for s in SPLITS]
    table.add_row("[bold]total[/bold]", *map(str, totals), str(sum(totals)), end_section=True)
    return table


def harm_tables() -> list[Table]:
    """Per-source counts and what was left out (unmapped categories, duplicates) for the harm suite."""
    from .external import build_harm

    build = build_harm()
    by_source = Table(title="harm: rows per source")
    for col in ("source", "read", "unmapped", "duplicates dropped", "kept", *SPLITS):
        by_source.add_column(col, justify="left" if col == "source" else "right", no_wrap=col == "source")
    splits = Counter((ex.source, ex.split) for ex in build.examples)
    for src, rep in build.reports.items():
        per = [str(splits[(src, s)]) for s in SPLITS]
        by_source.add_row(
            src, str(rep.read), str(sum(rep.unmapped.values())), str(len(rep.duplicates)), str(rep.kept), *per
        )
    unmapped = Table(title="harm: unmapped source categories (not in the suite)")
    for col in ("source", "source category", "rows"):
        unmapped.add_column(col, justify="right" if col == "rows" else "left")
    for src, rep in build.reports.items():
        for label, n in sorted(rep.unmapped.items()):
            unmapped.add_row(src, label, str(n))
    return [by_source, unmapped]


@data_app.command("list")
def list_command() -> None:
    """List the built-in suites with their categories and size."""
    table = Table(title="built-in suites")
    for col in ("suite", "categories", "examples", "status"):
        table.add_column(col)
    for name in list_suites():
        registry = CategoryRegistry.load(name)
        try:
            n, status = str(len(load_suite(name))), "ok"
        except DataError as exc:
            n, status = (
                "-",
                exc.problems[0] if len(exc.problems) == 1 else f"{len(exc.problems)} data problems",
            )
        table.add_row(name, ", ".join(registry.names), n, status)
    console.print(table)


@data_app.command("stats")
def stats_command(
    target: str = typer.Argument(
        ..., help=f"a suite ({', '.join(BUILTIN_SUITES)}), a suite directory, or a file"
    ),
    registry: str | None = typer.Option(None, "--registry", "-r", help="registry for a single file"),
    column: list[str] | None = typer.Option(None, "--column", help="CSV: FIELD=COLUMN, e.g. prompt=Goal"),
    default: list[str] | None = typer.Option(None, "--default", help="CSV: FIELD=VALUE, e.g. split=test"),
) -> None:
    """Print a table of examples per category and split."""
    try:
        name, categories, examples = _load_target(
            target, registry, _pairs(column, "--column"), _pairs(default, "--default")
        )
        console.print(stats_table(name, categories, examples))
        if target == "harm" and not Path(target).exists():
            for table in harm_tables():
                console.print(table)
    except (DataError, PolicyError) as exc:
        _fail(getattr(exc, "problems", [str(exc)]))


@data_app.command("validate")
def validate_command(
    target: str = typer.Argument(..., help="a .jsonl/.csv file or a suite directory"),
    registry: str | None = typer.Option(
        None, "--registry", "-r", help="check categories against this registry"
    ),
    column: list[str] | None = typer.Option(None, "--column", help="CSV: FIELD=COLUMN, e.g. prompt=Goal"),
    default: list[str] | None = typer.Option(None, "--default", help="CSV: FIELD=VALUE, e.g. split=test"),
) -> None:
    """Check a data file; every bad row is reported as file:line: reason (exit code 1 on errors)."""
    try:
        _, _, examples = _load_target(
            target, registry, _pairs(column, "--column"), _pairs(default, "--default")
        )
    except (DataError, PolicyError) as exc:
        _fail(getattr(exc, "problems", [str(exc)]))
    console.print(f"[green]ok[/green]: {len(examples)} examples in {target}", highlight=False)


if __name__ == "__main__":
    data_app()
