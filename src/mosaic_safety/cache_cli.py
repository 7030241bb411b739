"""`mosaic cache`: see what the cache directory holds, and free what no run will read again."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from . import cache_usage
from .cache_usage import AREAS, TEMPORARY, clear, entries

cache_app = typer.Typer(
    help="Inspect and trim the cache (converted models, base answers, evaluation responses).",
    no_args_is_help=True,
)
console = Console()


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


@cache_app.command("info")
def info() -> None:
    """Size of each area; for converted models, whether each copy is still used."""
    from .backbone import cache_root  # imports torch: not when `mosaic` starts

    root = cache_root()
    table = Table(title=f"cache: {root} (MOSAIC_CACHE moves it)")
    for col in ("area", "items", "size", "holds"):
        table.add_column(col, justify="right" if col in ("items", "size") else "left")
    by_area = {area: entries(area, root) for area in AREAS}  # sizes walk every file: once
    for area, what in AREAS.items():
        items = by_area[area]
        table.add_row(area, str(len(items)), _mb(sum(e.bytes for e in items)), what)
    console.print(table)
    copies = by_area["models"]
    if copies:
        models = Table(title="converted models")
        for col in ("folder", "size", "state"):
            models.add_column(col)
        for entry in copies:
            models.add_row(entry.path.name, _mb(entry.bytes), entry.state)
        console.print(models)
    temporary = [e for items in by_area.values() for e in items if e.state == TEMPORARY]
    if temporary:
        console.print(
            f"{len(temporary)} temporary items ({_mb(sum(e.bytes for e in temporary))}): writes in "
            "progress, or left by killed jobs",
            highlight=False,
        )
    if any(e.state not in ("current", TEMPORARY) for e in copies) or any(e.stale() for e in temporary):
        console.print(
            "`mosaic cache prune` removes the copies that are not current and stale temporary items."
        )


@cache_app.command("prune")
def prune_command() -> None:
    """Remove converted models whose GGUF file was replaced or removed (and older unrecorded ones),
    and temporary items killed jobs left (older than an hour)."""
    removed = cache_usage.prune()
    freed = sum(e.bytes for e in removed)
    copies = sum(1 for e in removed if e.state != TEMPORARY)
    console.print(
        f"removed {copies} converted model copies and {len(removed) - copies} temporary items, {_mb(freed)} freed",
        highlight=False,
    )


@cache_app.command("clear")
def clear_command(
    areas: list[str] = typer.Argument(..., help=f"Areas to empty: {', '.join(AREAS)}, or all."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Empty whole areas. Their contents are rebuilt when next needed (base answers take minutes)."""
    from .backbone import cache_root  # imports torch: not when `mosaic` starts

    chosen = list(AREAS) if "all" in areas else areas
    unknown = [a for a in chosen if a not in AREAS]
    if unknown:
        raise typer.BadParameter(
            f"unknown area {unknown[0]!r}; valid: {', '.join(AREAS)}, all", param_hint="AREAS"
        )
    root = cache_root()
    size = sum(e.bytes for a in chosen for e in entries(a, root))
    if not yes and not typer.confirm(f"remove {', '.join(chosen)} under {root} ({_mb(size)})?"):
        raise typer.Exit(1)
    freed = clear(chosen, root)
    console.print(f"{_mb(freed)} freed", highlight=False)
