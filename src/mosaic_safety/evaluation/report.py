"""Reports of evaluation results: ``results.json``, ``report.md`` and PNG plots; the method comparison.

Everything here reads the results dict produced by ``protocol.evaluate`` (plus optional extras such
as utility and margin), so a report can be rebuilt from ``results.json`` alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import prompt_set

METRICS = (
    ("dsr", "DSR ↑"),
    ("or_inactive", "OR inactive ↓"),
    ("or_neutral", "OR neutral ↓"),
    ("or_boundary", "OR boundary ↓"),
)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def subsets_cell(order: dict[str, Any]) -> str:
    """Subsets at an order; where some have no prompts of their categories, how many DSR averages."""
    n = order["subsets"]
    return f"{n} (DSR over {order['dsr_subsets']})" if "dsr_subsets" in order else str(n)


def _mean_and_interval(mean: float | None, pooled: dict[str, Any] | None) -> str:
    """Order cell: the mean over subsets, then the pooled interval."""
    if mean is None or pooled is None:
        return "–"
    return f"{pct(mean)} [{pct(pooled['lo'])}, {pct(pooled['hi'])}]"


def write_results(results: dict[str, Any], out: str | Path, plots: bool = True) -> list[Path]:
    """Write results.json, report.md and (optionally) the plots into ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "report.md"]
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    tmp.replace(paths[0])
    images: list[Path] = []
    if plots:
        images = [
            plot_orders([results], out / "dsr_or_by_order.png"),
            plot_heatmap(results, out / "heatmap.png"),
        ]
        paths.extend(images)
    paths[1].write_text(markdown(results, [p.name for p in images]), encoding="utf-8")
    return paths


def _runtime_note(runtime: Any) -> str:
    """``; float32 on cpu`` where the results recorded it (older ones did not)."""
    if isinstance(runtime, dict) and runtime.get("dtype"):
        return f"; {str(runtime['dtype']).removeprefix('torch.')} on {runtime.get('device')}"
    return ""


def markdown(results: dict[str, Any], images: Sequence[str] = ()) -> str:
    m = results["method"]
    plan = results["plan"]
    lines = [
        f"# Evaluation: `{m['method']}` on `{results['suite']}` ({plan['split']} split)",
        "",
        f"- judge: `{results['judge']}`; greedy decoding, {plan['max_new_tokens']} new tokens"
        + (f" (fast path from {plan['fast_tokens']})" if plan.get("fast") else ""),
        f"- prompts per group: {', '.join(f'{g} {n}' for g, n in results['groups'].items())}",
        f"- policies: {len(results['policies'])} (orders 0–{max(int(k) for k in results['orders'])}"
        + (f", {_sampled_subsets(plan['subsets_per_order'])}" if plan["subsets_per_order"] else "")
        + ")",
        f"- trainable parameters: {results['cost']['trainable_parameters']:,}; fingerprint `{m['fingerprint']}`",
        f"- generation: {results['generation'].get('generated', 0)} new responses in "
        f"{results['generation']['seconds']:.0f}s ({results['generation']['rows']} rows)"
        + _runtime_note(results.get("runtime")),
        "",
        "## By order (mean over subsets; pooled 95% Wilson interval)",
        "",
        "| order | subsets | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for k, s in results["orders"].items():
        cells = [_mean_and_interval(s[key], s[key + "_pooled"]) for key, _ in METRICS]
        lines.append(f"| {k} | {subsets_cell(s)} | " + " | ".join(cells) + " |")
    groups = list(results["groups"])
    lines += [
        "",
        "## Refusal rate by active set × prompt group",
        "",
        "| policy | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for row in results["policies"]:
        cells = []
        for g in groups:
            v = row["rates"][g]["rate"]
            cells.append(f"**{pct(v)}**" if g in row["categories"] else pct(v))
        lines.append(f"| {row['policy']} | " + " | ".join(cells) + " |")
    summary = extras_summary(results.get("extras", {}))
    if summary:
        lines += ["", "## Utility, margin and robustness (details in results.json)", ""]
        lines += [f"- **{k}**: {v}" for k, v in summary.items()]
    if images:
        lines += ["", "## Plots", ""] + [f"![{i}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def extras_summary(extras: dict[str, Any]) -> dict[str, str]:
    """One readable line per extra measurement (the full numbers stay in results.json)."""
    out: dict[str, str] = {}
    for name, e in extras.items():
        if "skipped" in e:
            out[name] = f"skipped ({e['skipped']})"
        elif name == "utility":
            out[name] = (
                f"truthfulness {pct(e['policy_active']['accuracy'])} with policy `{e['policy']}` vs "
                f"{pct(e['base']['accuracy'])} base (Δ {100 * e['delta']:+.1f} pts, {e['pairs']} pairs)"
            )
        elif name == "kl_to_base":
            out[name] = (
                f"{e['mean_per_token']:.3f} nats/token on {e['prompts']} neutral prompts under `{e['policy']}` "
                f"(worst prompt {e['max_row']['kl']:.3f})"
            )
        elif name == "margin":
            out[name] = f"SAM {e['sam']:+.3f} ({e['metric']} silhouette of first-token {e['space']}, "
            out[name] += f"{e['prompts']} prompts × {len(e['policies'])} policies)"
        elif name == "jailbreak":
            out[name] = (
                f"DSR plain {pct(e['plain']['rate'])} → wrapped {pct(e['wrapped']['rate'])} "
                f"({e['n_templates']} templates, {e['plain']['n']} requests)"
            )
    return out


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_orders(
    all_results: Sequence[dict[str, Any]], path: Path, labels: Sequence[str] | None = None
) -> Path:
    """DSR and OR (inactive, neutral, boundary) against order, one line per method."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4), sharey=True)
    labels = labels or [r["method"]["method"] for r in all_results]
    for results, label in zip(all_results, labels):
        orders = [k for k in results["orders"] if k != "0"]
        for ax, (key, title) in zip(axes, METRICS):
            ys = [results["orders"][k][key] for k in orders]
            xs = [int(k) for k, y in zip(orders, ys) if y is not None]
            ax.plot(xs, [100 * y for y in ys if y is not None], marker="o", label=label)
            ax.set_title(title)
            ax.set_xlabel("order")
            ax.set_xticks(range(1, 1 + max((int(k) for k in orders), default=1)))
            ax.grid(alpha=0.3)
    axes[0].set_ylabel("refusal rate (%)")
    axes[0].set_ylim(-3, 103)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(results: dict[str, Any], path: Path) -> Path:
    """Refusal rate for every evaluated policy (rows) and prompt group (columns)."""
    plt = _plt()
    groups = list(results["groups"])
    rows = results["policies"]
    data = [[100 * (r["rates"][g]["rate"] or 0) for g in groups] for r in rows]
    fig, ax = plt.subplots(figsize=(1.1 * len(groups) + 3, 0.32 * len(rows) + 1.4))
    im = ax.imshow(data, cmap="RdYlGn_r", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r["policy"] for r in rows], fontsize=7)
    for i, r in enumerate(rows):
        for j, g in enumerate(groups):
            bold = g in r["categories"]
            ax.text(
                j,
                i,
                f"{data[i][j]:.0f}",
                ha="center",
                va="center",
                fontsize=6,
                fontweight="bold" if bold else "normal",
            )
    ax.set_title(f"{results['method']['method']}: refusal rate (%) by active set × prompt group")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# what the rows of a comparison must share to be read side by side (besides the prompts themselves)
_SAME_PLAN = ("split", "max_order", "subsets_per_order", "limit", "seed", "max_new_tokens")


def _read_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt results file ({exc})") from exc
    shape_ok = (
        isinstance(results, dict)
        and isinstance(results.get("method"), dict)
        and isinstance(results["method"].get("method"), str)
        and all(isinstance(results.get(k), dict) for k in ("orders", "plan", "cost", "groups"))
        and isinstance(results.get("suite"), str)
        and isinstance(results.get("judge"), str)
        and isinstance(results.get("categories"), list)
        # what the comparison reads of each run: every order's metrics, and the cost
        and all(
            isinstance(o, dict) and all(m in o and _rate(o[m]) for m, _ in METRICS)
            for o in results["orders"].values()
        )
        and all(isinstance(k, str) and k.isdigit() for k in results["orders"])
        and type(results["cost"].get("trainable_parameters")) is int
        and isinstance(results["cost"].get("prompt_overhead"), dict)
        and all(v is not None and _rate(v) for v in results["cost"]["prompt_overhead"].values())
    )
    if not shape_ok:
        raise ValueError(f"{path}: not a results file of `mosaic eval` (or one from an older version)")
    return results


def _rate(value: Any) -> bool:
    """A number results.json may hold for a metric (``None``: not measured)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def differences(loaded: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """Where evaluation results differ in what they measured: suite, categories, prompts, judge or
    plan. Rows that differ there are not comparable, however alike their columns look."""
    first, ref = loaded[0], names[0]
    out = []
    for r, name in zip(loaded[1:], names[1:]):
        for label, a, b in [
            ("suite", first["suite"], r["suite"]),
            ("categories", first["categories"], r["categories"]),
            ("judge", first["judge"], r["judge"]),
            *((f"plan.{k}", first["plan"].get(k), r["plan"].get(k)) for k in _SAME_PLAN),
        ]:
            if a != b:
                out.append(f"{label}: {a!r} in {ref}, {b!r} in {name}")
        asked, other = _asked(first), _asked(r)
        if first["groups"] != r["groups"] or (asked and other and asked != other):
            out.append(f"prompts: {name} asked other prompts than {ref}")
    # bf16 and float32 decode different greedy text; runs from before `runtime` was recorded have none
    dtypes = {
        n: str((r.get("runtime") or {}).get("dtype", "")).removeprefix("torch.")
        for r, n in zip(loaded, names)
    }
    recorded = {n: d for n, d in dtypes.items() if d}
    if len(set(recorded.values())) > 1:
        out.append("dtype: " + ", ".join(f"{d} in {n}" for n, d in recorded.items()))
    return out


def _asked(results: dict[str, Any]) -> str | None:
    """The digest of the prompts a run asked (results from before it was recorded: from their
    responses, if kept; else unknown)."""
    if isinstance(results.get("prompt_set"), str):
        return results["prompt_set"]
    rows = results.get("responses")
    if isinstance(rows, list) and rows and all(isinstance(x, dict) for x in rows):
        return prompt_set((x.get("group"), x.get("prompt")) for x in rows)
    return None


def _each(label: str, values: Sequence[Any]) -> str:
    """``Suite `minors``` when the runs agree, ``Suites `minors`, `pets``` when they do not."""
    distinct = list(dict.fromkeys(values))
    return f"{label}{'s' if len(distinct) > 1 else ''} " + ", ".join(f"`{v}`" for v in distinct)


def compare(
    result_dirs: Sequence[str | Path],
    out: str | Path,
    cost: str | Path | None = None,
    allow_mismatch: bool = False,
) -> list[Path]:
    """A Table-1-style comparison of several evaluation directories: methods × orders, DSR / OR, cost.

    ``cost`` is the JSON written by ``bench/method_cost.py`` (inference time as a ratio to the base
    model, measured side by side in one run, and training seconds); rows are matched by method name
    or by the evaluation directory's name. Runs that measured different things (:func:`differences`)
    are refused unless ``allow_mismatch``; the report then lists the differences.
    """
    loaded = []
    seen: dict[Path, str | Path] = {}
    for d in result_dirs:
        path = Path(d) / "results.json" if Path(d).is_dir() else Path(d)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no results.json (run `mosaic eval ... --out {d}` first)")
        if path.resolve() in seen:  # one run twice would print as two methods that agree exactly
            raise ValueError(f"{d} is given twice (as {seen[path.resolve()]})")
        seen[path.resolve()] = d
        loaded.append(_read_results(path))
    if not loaded:
        raise ValueError("nothing to compare")
    names = [Path(d).name if Path(d).is_dir() else Path(d).parent.name for d in result_dirs]
    mismatch = differences(loaded, names)
    if mismatch and not allow_mismatch:
        raise ValueError(
            "these runs did not measure the same thing, so their rows are not comparable: "
            + "; ".join(mismatch)
            + " (evaluate them with the same settings, or pass --allow-mismatch to compare anyway)"
        )
    costs: dict[str, dict[str, Any]] = {}
    if cost is not None:
        try:
            costs = {r["method"]: r for r in json.loads(Path(cost).read_text(encoding="utf-8"))}
        except (OSError, ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"{cost}: not a bench/method_cost.py JSON file ({exc})") from exc
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for compare.md, .json and .png")
    out.mkdir(parents=True, exist_ok=True)
    orders = sorted({k for r in loaded for k in r["orders"] if k != "0"}, key=int)
    base = next((r for r in loaded if r["method"]["method"] == "none"), None)
    lines = [
        "# Method comparison",
        "",
        _each("Suite", [r["suite"] for r in loaded])
        + ", "
        + _each("split", [r["plan"]["split"] for r in loaded])
        + "; judges: "
        + ", ".join(sorted({r["judge"] for r in loaded}))
        + ". Order-k figures are means over subsets.",
        "",
        *(
            ["**Not comparable** (compared with --allow-mismatch):", *(f"- {m}" for m in mismatch), ""]
            if mismatch
            else []
        ),
        "| method | trainable params | prompt overhead (order 1) | inference × base | train s | "
        + " | ".join(f"DSR@{k} ↑ | OR-in@{k} ↓ | OR-neu@{k} ↓ | OR-bnd@{k} ↓" for k in orders)
        + " | empty-policy refusal (categories) |",
        "|---|---|---|---|---|" + "---|---|---|---|" * len(orders) + "---|",
    ]
    table = []
    for r, dirname in zip(loaded, names):
        overhead = [v for k, v in r["cost"]["prompt_overhead"].items() if k]
        row = {
            "method": r["method"]["method"],
            "trainable_parameters": r["cost"]["trainable_parameters"],
            "prompt_overhead": sum(overhead) / len(overhead) if overhead else 0,
            "orders": {k: {m: r["orders"].get(k, {}).get(m) for m, _ in METRICS} for k in orders},
            "empty_or": (r["orders"].get("0", {}) or {}).get("or_inactive"),
            "extras": r.get("extras", {}),
        }
        measured = costs.get(dirname) or costs.get(row["method"]) or {}
        row["inference_ratio"] = measured.get("ratio_to_none")
        row["training_seconds"] = measured.get("training_seconds")
        row["label"] = row["method"] if dirname == row["method"] else f"{row['method']} [{dirname}]"
        table.append(row)
        cells = [" | ".join(pct(row["orders"][k][m]) for m, _ in METRICS) for k in orders]
        ratio = "–" if row["inference_ratio"] is None else f"{row['inference_ratio']:.2f}"
        train_s = "–" if not row["training_seconds"] else f"{row['training_seconds']:.0f}"
        lines.append(
            f"| {row['label']} | {row['trainable_parameters']:,} | {row['prompt_overhead']:.0f} | {ratio} | "
            f"{train_s} | " + " | ".join(cells) + f" | {pct(row['empty_or'])} |"
        )
    if any(r["extras"] for r in table):
        lines += ["", "## Utility, margin and robustness", ""]
        for r in table:
            for k, v in extras_summary(r["extras"]).items():
                lines.append(f"- **{r['label']}** {k}: {v}")
    if base is not None:
        lines += [
            "",
            f"Base model (`none`) greedy responses are the reference for OR; "
            f"its fingerprint `{base['method']['fingerprint']}`.",
        ]
    image = plot_orders(loaded, out / "compare_by_order.png", [r["label"] for r in table])
    lines += ["", f"![by order]({image.name})"]
    (out / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    return [out / "compare.md", out / "compare.json", image]


def _sampled_subsets(n: int) -> str:
    """Order 1 always runs every category (``choose_policies``), so the sample caps orders 2 and up."""
    return f"at most {n} sampled subset{'s' if n != 1 else ''} per order from order 2"
