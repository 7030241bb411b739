"""``mosaic judges``: measure refusal judges against the packaged human-labelled sets.

Imports stay light (typer, rich); judges and their models load only when a command runs.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..cli_args import check_output_file, nonempty_path

judges_app = typer.Typer(help="Refusal judges: validate them against human labels.", no_args_is_help=True)
_err = Console(stderr=True)
_out = Console()
if not _out.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
    _out.width = 160


def _pct(block: dict[str, Any] | None, key: str) -> str:
    if not block or key not in block:
        return "-"
    r = block[key]
    if isinstance(r, dict):
        if r["n"] == 0 or math.isnan(r["rate"]):
            return "-"
        return f"{r['rate']:.1%} {r['k']}/{r['n']}"
    return "-" if math.isnan(r) else f"{r:.1%}"


def results_table(results: list[dict[str, Any]]) -> Table:
    """The accuracy table: one row per judge, JBB agreement and the UncensorBench rates."""
    table = Table(
        title="Refusal judges vs human labels (JBB 0.1.3 classifier_comparison; UncensorBench 0.3.7)"
    )
    for col in (
        "judge",
        "JBB agreement",
        "JBB jailbroken caught",
        "UB refusal recall",
        "UB false positives",
        "UB balanced acc.",
        "seconds",
    ):
        table.add_column(col, justify="left" if col == "judge" else "right", no_wrap=col == "judge")
    for r in results:
        jbb, ub = r.get("jbb"), r.get("uncensorbench")
        table.add_row(
            r["judge"],
            _pct(jbb, "agreement"),
            _pct(jbb, "jailbroken_caught"),
            _pct(ub, "refusal_recall"),
            _pct(ub, "false_positive_rate"),
            _pct(ub, "balanced_accuracy"),
            f"{r['seconds']:.1f}",
        )
    return table


def _finite(value: Any) -> Any:
    """NaN (a rate over zero rows) as JSON null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@judges_app.command()
def validate(
    judge: list[str] = typer.Option(
        ["phrase"],
        "--judge",
        "-j",
        help="phrase, phrase-v1, template, garak, llm[:MODEL], hf[:MODEL] or a+b; repeat",
    ),
    out: Path | None = typer.Option(
        None, "--out", parser=nonempty_path, help="write the results as JSON to this file"
    ),
    limit: int | None = typer.Option(None, min=1, help="only the first N rows of each set (quick runs)"),
    sets: list[str] = typer.Option(
        ["jbb", "uncensorbench"], "--set", help="validation sets: jbb, uncensorbench"
    ),
    registry: str = typer.Option(
        "minors", help="category registry whose refusal templates `template` matches"
    ),
    model: str | None = typer.Option(
        None, help="llm: model name (default $MOSAIC_JUDGE_MODEL or gpt-4o-mini)"
    ),
    base_url: str | None = typer.Option(
        None,
        help="llm: endpoint ending in /v1 (default $MOSAIC_JUDGE_BASE_URL, else http://127.0.0.1:8000/v1)",
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="llm: environment variable holding the API key"),
    timeout: float = typer.Option(60.0, min=0.001, max=86400.0, help="llm: seconds per request"),
    retries: int = typer.Option(2, min=0, help="llm: retries on connection errors, timeouts, 429 and 5xx"),
    workers: int = typer.Option(4, min=1, help="llm: parallel requests"),
    unparseable: str = typer.Option(
        "error", help="llm: a reply neither yes nor no counts as error|refused|answered"
    ),
    batch_size: int = typer.Option(8, min=1, help="hf: prompts per forward pass"),
    device: str = typer.Option("cpu", help="hf: torch device"),
) -> None:
    """Accuracy of each judge on JailbreakBench's human labels and UncensorBench's reply pairs."""
    from ..cli import friendly_errors
    from ..policy import CategoryRegistry
    from .judge_validation import validate_judge
    from .judges import JudgeError, build_judge

    results = []
    with friendly_errors():
        if out is not None:
            check_output_file(out)  # before minutes of validation, not after
        unknown = sorted(set(sets) - {"jbb", "uncensorbench"})
        if unknown:
            raise JudgeError(f"unknown validation set(s) {', '.join(unknown)}: use jbb, uncensorbench")
        reg = CategoryRegistry.load(registry)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_err,
            transient=True,
            disable=os.environ.get("MOSAIC_PROGRESS") == "0",  # as every other command's bars
        ) as bar:
            for spec in judge:
                task = bar.add_task(f"{spec}: loading", total=None)

                def tick(done: int, total: int, task: Any = task) -> None:
                    bar.update(task, completed=done, total=total)

                llm = dict(
                    model=model,
                    base_url=base_url,
                    api_key_env=api_key_env,
                    timeout=timeout,
                    retries=retries,
                    workers=workers,
                    unparseable=unparseable,
                    progress=tick,
                )
                hf = dict(batch_size=batch_size, device=device, progress=tick)
                j = build_judge(spec, reg, llm_options=llm, hf_options=hf)
                start = time.perf_counter()

                def stage(name: str, task: Any = task, spec: str = spec) -> None:
                    bar.update(task, description=f"{spec}: {name}", completed=0, total=None)

                result = validate_judge(j, limit=limit, sets=sets, progress=stage)
                result["spec"] = spec
                result["seconds"] = time.perf_counter() - start
                results.append(result)
                bar.remove_task(task)
    _out.print(results_table(results))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"limit": limit, "sets": sets, "registry": registry, "judges": results}
        out.write_text(json.dumps(_finite(payload), indent=2) + "\n", encoding="utf-8")
        _err.print(f"wrote {out}")
