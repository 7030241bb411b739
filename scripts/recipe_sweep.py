"""Train recipe variants over several seeds side by side, evaluate chosen epochs, within a deadline.

Why: on SmolLM2-135M one run of a recipe says little. A reseed alone moves own-category refusal
by up to 15 points (docs/experiments.md, "One run is not enough to rank recipes"), so ranking
recipes takes several seeds each. A run is small, so on a GPU many fit side by side.

Each job trains one (variant, seed) to the largest epoch asked for. With a constant learning rate
the epoch-N checkpoint is exactly what an N-epoch run ends with, so one job yields every epoch in
``--epochs``. Each of those checkpoints is evaluated at order 1 (empty and single-category
policies) on every ``--eval split:limit``. One summary line per (job, epoch, split) is appended to
``summary.jsonl`` as soon as it exists. Jobs are started in seed-major order, so when time runs
out every variant has as many seeds as possible. A job still running at the deadline is stopped;
what finished before it is kept.

    python scripts/recipe_sweep.py --config configs/smollm2-minors.yaml --out runs/sweep \\
        --variant shipped= --variant kl2="optim.kl_weight=2" --seeds 0 1 2 --epochs 3 4 5 \\
        --eval val:50 --eval test:20 --workers 4 --device cuda --dtype float32 --deadline 900
    python scripts/recipe_sweep.py summarize runs/sweep     # the table again, from summary.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean


def summarize_results(results: dict) -> dict[str, float]:
    """Own, other, excess-over-base and neutral refusal (in %) from the policy rows of a results.json."""
    categories = list(results["categories"])
    rows = {row["policy"]: row["rates"] for row in results["policies"] if row["order"] <= 1}

    def rate(policy: str, group: str) -> float:
        cell = rows.get(policy, {}).get(group)
        if cell is None:
            raise ValueError(f"results have no responses for policy {policy!r} on {group!r} prompts")
        return 100.0 * cell["rate"]

    own = {c: rate(c, c) for c in categories}
    pairs = [(p, g) for p in categories for g in categories if p != g]
    other = [rate(p, g) for p, g in pairs]
    return {
        "own_mean": mean(own.values()),
        "own_min": min(own.values()),
        "other_mean": mean(other),
        "other_max": max(other),
        "excess": mean(rate(p, g) - rate("(empty)", g) for p, g in pairs),
        "neutral_max": max(rate(c, "neutral") for c in categories),
        "own": own,
    }


def run_job(args: argparse.Namespace) -> None:
    """Train one (variant, seed) and evaluate its checkpoints; runs in its own process."""
    from mosaic_safety.config import load_config
    from mosaic_safety.data.suites import load_suite
    from mosaic_safety.evaluation.judges import build_judge
    from mosaic_safety.evaluation.protocol import EvalPlan, evaluate
    from mosaic_safety.evaluation.report import write_results
    from mosaic_safety.methods import load_method
    from mosaic_safety.training.trainer import Trainer

    epochs = sorted(args.epochs)
    overrides = [
        *args.overrides.split(),
        f"optim.seed={args.seed}",
        f"optim.epochs={epochs[-1]}",
        "eval.max_new_tokens=0",
        f"model.device={args.device}",
        f"model.dtype={args.dtype}",
        *([f"model.name={args.model}"] if args.model else []),
    ]
    cfg = load_config(args.config, overrides)
    run = Path(args.run)
    started = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.train(run, overwrite=True)
    train_s = time.perf_counter() - started
    data = load_suite(cfg.data.suite)
    targets = [(str(e), run / "checkpoints" / f"epoch-{e}") for e in epochs]
    if cfg.select.mode != "last":  # the shipped artifact mixes epochs: evaluate it too, as "sel"
        targets.append(("sel", run))
    for epoch, artifact in targets:
        method = load_method(
            None, artifact=artifact, backbone=trainer.backbone, registry=data.registry, device=args.device
        )
        judge = build_judge("template+phrase", [data.registry, method.registry])
        for spec in args.eval:
            split, limit = spec.split(":")
            plan = EvalPlan(split=split, max_order=1, limit=int(limit), max_new_tokens=24, batch_size=64)
            results = evaluate(method, data, judge, plan)
            write_results(results, run / "eval" / f"epoch-{epoch}-{split}", plots=False)
            line = {
                "variant": args.variant,
                "seed": args.seed,
                "epoch": epoch,
                "split": split,
                "limit": int(limit),
                "steps": result.steps,
                "train_s": round(train_s, 1),
                **summarize_results(results),
            }
            with Path(args.summary).open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {spec!r}: write NAME=OVERRIDES (OVERRIDES may be empty)")
    return name, rest.split()


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.deadline
    variants = [parse_variant(v) for v in args.variant]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("variant names must be distinct")
    if min(args.epochs) < 1:
        raise SystemExit("--epochs: epochs count from 1")
    for spec in args.eval:
        split, sep, limit = spec.partition(":")
        if not (split and sep and limit.isdigit()):
            raise SystemExit(f"--eval {spec!r}: write SPLIT:PROMPTS_PER_GROUP, e.g. test:20")
    jobs = [(name, ovr, seed) for seed in args.seeds for name, ovr in variants]
    summary = out / "summary.jsonl"
    # One cache per worker slot: the teacher's JSONL cache is appended to without a lock. Converted
    # models are shared (written once, atomically, below), base answers copied from --cache if given.
    shared = out / "cache"
    _warm_model(args, shared)
    slots: queue.Queue[int] = queue.Queue()
    for i in range(args.workers):
        slot = out / f"cache-{i}"
        slot.mkdir(exist_ok=True)
        if not (slot / "models").exists():
            (slot / "models").symlink_to((shared / "models").resolve(), target_is_directory=True)
        if args.cache and (Path(args.cache) / "responses").is_dir() and not (slot / "responses").exists():
            shutil.copytree(Path(args.cache) / "responses", slot / "responses")
        slots.put(i)

    def one(job: tuple[str, list[str], int]) -> tuple[bool, str]:
        """Run one job; returns (failed, what happened)."""
        name, ovr, seed = job
        left = deadline - time.monotonic()
        if left < args.min_job_s:
            return False, f"{name} seed {seed}: skipped ({left:.0f}s left)"
        slot = slots.get()
        run = out / "runs" / f"{name}-s{seed}"
        cmd = [
            sys.executable, __file__, "job", "--config", args.config, "--run", str(run),
            "--variant", name, "--seed", str(seed), "--summary", str(summary),
            "--device", args.device, "--dtype", args.dtype,
            "--epochs", *map(str, args.epochs), "--eval", *args.eval,
            *(["--model", args.model] if args.model else []),
            "--overrides", " ".join(ovr),
        ]  # fmt: skip
        env = {**os.environ, "MOSAIC_CACHE": str(out / f"cache-{slot}"), "OMP_NUM_THREADS": "2"}
        run.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            with (run / "job.log").open("w") as log:
                proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=left)
            status = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode}, {run}/job.log)"
        except subprocess.TimeoutExpired:
            status = "stopped at the deadline"
        finally:
            slots.put(slot)
        message = f"{name} seed {seed}: {status} in {time.monotonic() - started:.0f}s"
        return status.startswith("failed"), message

    failed = 0
    with ThreadPoolExecutor(args.workers) as pool:
        for job_failed, message in pool.map(one, jobs):
            print(message, flush=True)
            failed += job_failed
    print_table(summary)
    if failed:
        raise SystemExit(f"{failed} job(s) failed: see their job.log")


def _warm_model(args: argparse.Namespace, cache: Path) -> None:
    """Convert the backbone once, before the workers race to do it."""
    env = {**os.environ, "MOSAIC_CACHE": str(cache)}
    model = args.model or _config_model(args.config)
    code = "import sys; from mosaic_safety.backbone import load_backbone; load_backbone(sys.argv[1], device='cpu')"
    subprocess.run([sys.executable, "-c", code, model], env=env, check=True)


def _config_model(config: str) -> str:
    from mosaic_safety.config import load_config

    return load_config(config, []).model.name


def print_table(summary: Path) -> None:
    """Per (variant, epoch, split): the mean over seeds, then each seed's own/other/neutral."""
    if not summary.exists():
        print("no results")
        return
    latest = {}  # a job run again into the same directory replaces its earlier lines
    for line in summary.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["variant"], r["seed"], r["epoch"], r["split"])] = r
    rows = list(latest.values())
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["epoch"], r["split"])].append(r)
    print(
        "variant | epoch | split | seeds | own mean (min) | other | excess | neutral max "
        "| per seed own/other/neutral"
    )
    for (variant, epoch, split), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][2], kv[0][0], str(kv[0][1]))
    ):
        rs.sort(key=lambda r: r["seed"])
        seeds = " ".join(
            f"s{r['seed']}:{r['own_mean']:.0f}/{r['other_mean']:.0f}/{r['neutral_max']:.0f}" for r in rs
        )
        print(
            f"{variant} | {epoch} | {split} | {len(rs)} | {mean(r['own_mean'] for r in rs):.1f} "
            f"({mean(r['own_min'] for r in rs):.0f}) | {mean(r['other_mean'] for r in rs):.1f} | "
            f"{mean(r['excess'] for r in rs):.1f} | {mean(r['neutral_max'] for r in rs):.1f} | {seeds}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "summarize":
        print_table(Path(sys.argv[2]) / "summary.jsonl")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "job":
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        for flag in ("--config", "--run", "--variant", "--summary", "--device", "--dtype", "--model"):
            p.add_argument(flag)
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--epochs", type=int, nargs="+", required=True)
        p.add_argument("--eval", nargs="+", required=True)
        p.add_argument("--overrides", default="")
        run_job(p.parse_args())
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML recipe every variant starts from")
    p.add_argument("--out", required=True, help="directory for runs, caches and summary.jsonl")
    p.add_argument("--variant", action="append", required=True, help='NAME="key=value ..." (may be empty)')
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, nargs="+", default=[3], help="checkpoints to evaluate")
    p.add_argument("--eval", nargs="+", default=["val:50"], help="split:prompts-per-group, e.g. test:20")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", help="backbone instead of the config's (e.g. a GGUF path)")
    p.add_argument("--cache", help="an existing cache directory whose base answers to reuse")
    p.add_argument("--deadline", type=float, default=86400.0, help="seconds from now")
    p.add_argument("--min-job-s", type=float, default=30.0, help="do not start a job with less time left")
    sweep(p.parse_args())


if __name__ == "__main__":
    main()
