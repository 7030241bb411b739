"""Load test of `mosaic serve`: N concurrent clients with mixed policies against the real server.

One run measures, on the same machine and the same request stream:

1. single-policy traffic: every request under one fixed policy (``--single-policy``),
2. mixed-policy traffic: every request draws a random policy (order 0 to 3) — the main phase,
   ``--duration`` seconds, during which the server's RSS is sampled,
3. in-process generation: the same requests through ``ControlledModel.encode`` + ``decode_steps``
   in this process (the server stopped), batches of ``--max-batch-size``.

Every request asks for exactly ``--max-tokens`` tokens (``min_tokens = max_tokens``; the in-process
run counts batch rows × steps), so all three do equal work per request whatever the model answers
(a refusal is shorter than an answer). Throughput is completion tokens per second. Ratios:
mixed / single (goal ≥ 0.95) and server mixed / in-process (goal ≥ 0.9).

    OMP_NUM_THREADS=1 python bench/serve_load.py --artifact /tmp/serve-art --duration 60 --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _requests(seed: int, categories: list[str], prompts: list[str]):
    """An endless, seeded stream of (prompt, mixed policy) over the artifact's own categories."""
    rng = random.Random(seed)
    names = list(categories)
    while True:
        order = rng.choice([0, 1, 2, 3])
        yield rng.choice(prompts), sorted(rng.sample(names, order), key=names.index)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def _phase(url: str, model: str, clients: int, duration: float, stream, max_tokens: int, pid: int):
    import httpx

    latencies: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}
    rss: list[float] = []
    stop_at = time.perf_counter() + duration

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while time.perf_counter() < stop_at:
            prompt, cats = next(stream)
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "min_tokens": max_tokens,
                "safety": {"categories": cats},
            }
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async def sample_rss() -> None:
        while time.perf_counter() < stop_at:
            rss.append(_rss_mb(pid))
            await asyncio.sleep(1.0)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(sample_rss(), *(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(wall, 1),
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(latencies) / wall,
        "p50_s": _pct(latencies, 0.5),
        "p95_s": _pct(latencies, 0.95),
        "rss_mb": rss,
    }


def _in_process(artifact: Path, model: str | None, stream, duration: float, batch: int, max_tokens: int):
    import torch

    from mosaic_safety.methods import load_method
    from mosaic_safety.policy import Policy

    method = load_method(artifact=artifact, model=model)
    cm = method.model
    torch.set_grad_enabled(False)
    rows = 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        items = [next(stream) for _ in range(batch)]
        encoded = cm.encode(
            [[{"role": "user", "content": p}] for p, _ in items], [Policy(tuple(c)) for _, c in items]
        )
        steps = sum(1 for _ in cm.decode_steps(encoded, max_tokens))
        rows += steps * batch  # every row is computed at every step
    wall = time.perf_counter() - start
    return {"tokens_per_s": rows / wall, "seconds": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", required=True, type=Path)
    parser.add_argument("--model", default=None, help="backbone override (default: the artifact's)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of mixed-policy traffic")
    parser.add_argument(
        "--compare-duration",
        type=float,
        default=None,
        help="seconds for the single-policy and in-process phases (default: min(duration, 60))",
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--single-policy", default="alcohol,betting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    compare = args.compare_duration or min(args.duration, 60.0)

    from mosaic_safety.data import load_suite
    from mosaic_safety.tokens import read_manifest

    manifest = read_manifest(args.artifact)
    # the suite the run trained on (a directory, or a built-in name); older manifests name its registry
    data = ((manifest.get("training") or {}).get("config") or {}).get("data") or {}
    suite = load_suite(data.get("suite") or manifest["registry"]["name"])
    categories = list(manifest.get("composition_order") or [c["name"] for c in manifest["categories"]])
    test = suite.split("test")
    prompts = [ex.prompt for ex in test]
    single = [c for c in args.single_policy.split(",") if c]
    if set(single) - set(categories):
        raise SystemExit(f"--single-policy {args.single_policy}: the artifact has {', '.join(categories)}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "mosaic_safety.cli",
        "serve",
        "--artifact",
        str(args.artifact),
        "--port",
        str(port),
        "--model-name",
        "bench",
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-concurrency",
        str(args.clients * 2),
        "--request-timeout",
        "600",
    ]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOSAIC_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "prompts": len(prompts)}
    try:
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)

        def fixed(policy):
            rng = random.Random(args.seed)
            while True:
                yield rng.choice(prompts), policy

        print(f"server up (pid {proc.pid}); warm-up", flush=True)
        asyncio.run(_phase(url, "bench", args.clients, 5, fixed(single), args.max_tokens, proc.pid))
        print(f"single-policy traffic ({','.join(single)}) for {compare:.0f}s", flush=True)
        results["single"] = asyncio.run(
            _phase(url, "bench", args.clients, compare, fixed(single), args.max_tokens, proc.pid)
        )
        print(f"mixed-policy traffic for {args.duration:.0f}s", flush=True)
        results["mixed"] = asyncio.run(
            _phase(
                url,
                "bench",
                args.clients,
                args.duration,
                _requests(args.seed, categories, prompts),
                args.max_tokens,
                proc.pid,
            )
        )
        metrics = httpx.get(f"{url}/metrics").text
        results["batch_size_mean"] = _hist_mean(metrics, "mosaic_batch_size")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"in-process generation for {compare:.0f}s", flush=True)
    results["in_process"] = _in_process(
        args.artifact,
        args.model,
        _requests(args.seed, categories, prompts),
        compare,
        args.max_batch_size,
        args.max_tokens,
    )
    mixed, single_r, local = results["mixed"], results["single"], results["in_process"]
    rss = mixed.pop("rss_mb")
    single_r.pop("rss_mb")
    results["rss_start_mb"], results["rss_end_mb"] = rss[0], rss[-1]
    results["rss_growth"] = rss[-1] / rss[0] - 1
    results["ratio_mixed_vs_single"] = mixed["tokens_per_s"] / single_r["tokens_per_s"]
    results["ratio_server_vs_in_process"] = mixed["tokens_per_s"] / local["tokens_per_s"]
    print(
        f"\nclients {args.clients}, max_tokens {args.max_tokens}, batch ≤ {args.max_batch_size} "
        f"(mean {results['batch_size_mean']:.2f})\n"
        f"single-policy : {single_r['requests']} req, {single_r['tokens_per_s']:.1f} tok/s, "
        f"p50 {single_r['p50_s']:.2f}s p95 {single_r['p95_s']:.2f}s, errors {single_r['errors'] or 0}\n"
        f"mixed-policy  : {mixed['requests']} req in {mixed['seconds']}s, {mixed['tokens_per_s']:.1f} tok/s, "
        f"{mixed['requests_per_s']:.2f} req/s, p50 {mixed['p50_s']:.2f}s p95 {mixed['p95_s']:.2f}s, "
        f"errors {mixed['errors'] or 0}\n"
        f"in-process    : {local['tokens_per_s']:.1f} tok/s\n"
        f"ratio mixed/single           = {results['ratio_mixed_vs_single']:.3f} (goal ≥ 0.95)\n"
        f"ratio server/in-process      = {results['ratio_server_vs_in_process']:.3f} (goal ≥ 0.9)\n"
        f"server RSS {rss[0]:.0f} MB -> {rss[-1]:.0f} MB during mixed traffic "
        f"({results['rss_growth']:+.1%}, goal < 10%)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _hist_mean(metrics: str, name: str) -> float:
    values = {}
    for line in metrics.splitlines():
        for part in ("_sum", "_count"):
            if line.startswith(name + part + " "):
                values[part] = float(line.split()[-1])
    return values.get("_sum", 0.0) / max(values.get("_count", 1.0), 1.0)


if __name__ == "__main__":
    main()
