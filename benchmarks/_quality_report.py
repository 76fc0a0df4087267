"""Summaries, paired CIs, plots and markdown tables from the quality study's CSVs."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from _common import write_csv
from _quality_methods import METHODS
from _quality_stats import mean_std, paired_ci


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _by_cell(rows: list[dict], column: str = "score") -> dict[tuple[str, str, str], dict[int, float]]:
    cells: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for row in rows:
        cells[(row["task"], row["method"], row.get("variant", ""))][int(row["seed"])] = float(row[column])
    return cells


def summarise(rows: list[dict], reference: dict[tuple[str, str, str], dict[int, float]] | None = None,
              against: str = "uniform") -> list[dict]:
    """One row per (task, method, variant): mean +- std over seeds and the paired difference against
    ``against`` (same task and seed; from ``reference`` rows if given, e.g. the main table)."""
    cells = _by_cell(rows)
    ref = reference if reference is not None else cells
    params = defaultdict(list)
    for row in rows:
        params[(row["task"], row["method"], row.get("variant", ""))].append(float(row["lora_params"]))
    out = []
    for (task, method, variant), by_seed in sorted(cells.items(), key=lambda kv: _order(kv[0])):
        mean, std = mean_std(list(by_seed.values()))
        item = {"task": task, "method": method, "variant": variant, "n": len(by_seed), "mean": mean, "std": std,
                "lora_params_mean": sum(params[(task, method, variant)]) / len(params[(task, method, variant)])}
        base = ref.get((task, against, ""), {})
        common = sorted(set(by_seed) & set(base))
        if (method, variant) != (against, "") and len(common) >= 2:
            ci = paired_ci([by_seed[s] for s in common], [base[s] for s in common])
            item.update(diff=ci["mean"], ci_low=ci["low"], ci_high=ci["high"], p=ci["p"], pairs=ci["n"])
        out.append(item)
    return out


def _order(key: tuple[str, str, str]) -> tuple:
    task, method, variant = key
    tasks = ["sst2", "rte", "mrpc", "cola"]
    return (tasks.index(task) if task in tasks else 99, task,
            METHODS.index(method) if method in METHODS else 99, variant)


def _fmt_ci(item: dict, scale: float = 100.0) -> str:
    if "diff" not in item:
        return "(reference)" if item["method"] == "uniform" and not item["variant"] else "n/a"
    if item["ci_low"] == item["ci_high"]:
        return f"{scale * item['diff']:+.2f} (identical in every pair: no spread, no CI)"
    mark = " *" if item["ci_low"] > 0 or item["ci_high"] < 0 else ""
    return f"{scale * item['diff']:+.2f} [{scale * item['ci_low']:+.2f}, {scale * item['ci_high']:+.2f}]{mark}"


def majority_baselines(specs) -> dict[str, float]:
    """Dev score of always predicting the most frequent training label (context for the table)."""
    from _quality_tasks import encode_labels, load_task, score_predictions

    out = {}
    for spec in specs:
        if spec.regression:
            continue
        data = load_task(spec, train_size=10**9, heldout_size=0)
        train = encode_labels(data.train.labels, spec, data.vocabulary)
        gold = encode_labels(data.dev.labels, spec, data.vocabulary)
        top = max(set(train), key=train.count)
        out[spec.name] = score_predictions(spec, [top] * len(gold), gold, len(data.vocabulary) - 1)["score"]
    return out


def markdown_main(summary: list[dict], majority: dict[str, float] | None = None) -> str:
    """Methods as rows, tasks as columns: mean +- std, and the paired difference vs uniform with its 95% CI."""
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    methods = [m for m in METHODS if any(s["method"] == m for s in summary)]
    at = {(s["task"], s["method"]): s for s in summary if not s["variant"]}
    lines = ["| method | " + " | ".join(f"{t} (n)" for t in tasks) + " | LoRA params (mean over cells) |",
             "|---|" + "---|" * len(tasks) + "---|"]
    if majority:
        lines.append("| (majority class) | " + " | ".join(f"{100 * majority[t]:.2f}" if t in majority else ""
                                                        for t in tasks) + " | 0 |")
    for m in methods:
        cells = []
        for t in tasks:
            s = at.get((t, m))
            cells.append("" if s is None else f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f} ({s['n']})")
        params = [at[(t, m)]["lora_params_mean"] for t in tasks if (t, m) in at]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {sum(params) / max(1, len(params)):,.0f} |")
    lines += ["", "Paired difference against uniform (same seed), in points, with the t-based 95% CI "
              "(* = CI excludes 0):", "", "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        if m == "uniform":
            continue
        lines.append(f"| {m} | " + " | ".join(_fmt_ci(at[(t, m)]) if (t, m) in at else "" for t in tasks) + " |")
    return "\n".join(lines)


def markdown_times(rows: list[dict]) -> str:
    """Mean wall seconds per cell (method x task) and the total, as measured in the rows."""
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        times[(row["task"], row["method"])].append(float(row["seconds"]))
    tasks = list(dict.fromkeys(t for t, _ in times))
    methods = [m for m in METHODS if any(m == mm for _, mm in times)]
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{sum(times[(t, m)]) / len(times[(t, m)]):.0f} s" if times[(t, m)] else ""
                                              for t in tasks) + " |")
    total = sum(sum(v) for v in times.values())
    lines.append(f"\nTotal: {len(rows)} cells, {total / 60:.1f} min of wall time summed over cells "
                 f"(mean {total / max(1, len(rows)):.0f} s per cell).")
    return "\n".join(lines)


def markdown_ablations(summary: list[dict], main_summary: list[dict]) -> str:
    base = {(s["task"], s["method"]): s for s in main_summary if not s["variant"]}
    lines = ["| task | variant | n | score (mean +- std) | vs uniform: diff [95% CI] |", "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['task']} | {s['variant']} | {s['n']} | {100 * s['mean']:.2f} +- {100 * s['std']:.2f} | "
                     f"{_fmt_ci(s)} |")
    for task in dict.fromkeys(s["task"] for s in summary):
        for method, label in (("fim-variance", "(main) T=8, defaults"), ("uniform", "(main) uniform")):
            if (task, method) in base:
                b = base[(task, method)]
                lines.append(f"| {task} | {label} | {b['n']} | {100 * b['mean']:.2f} +- {100 * b['std']:.2f} | "
                             f"{_fmt_ci(b)} |")
    return "\n".join(lines)


def markdown_stability(rows: list[dict]) -> str:
    lines = ["| task | factor | score | map | pairs | Spearman mean (min) | Kendall mean (min) |",
             "|---|---|---|---|---|---|---|"]
    def f(row: dict, key: str) -> str:
        value = row[key]
        return "nan" if value in ("", "nan") or math.isnan(float(value)) else f"{float(value):.2f}"

    for r in rows:
        lines.append(f"| {r['task']} | {r['factor']} | {r['score']} | {r['map']} | {r['pairs']} | "
                     f"{f(r, 'spearman_mean')} ({f(r, 'spearman_min')}) | {f(r, 'kendall_mean')} ({f(r, 'kendall_min')}) |")
    return "\n".join(lines)


def markdown_cross_task(results: Path, prefix: str) -> str:
    """Agreement of the seed-0 variance rank maps *between tasks*: is the map about the task at all?"""
    from itertools import combinations

    from _quality_stats import agreement

    from fimlora import RankPlan

    plans = {p.stem.split("_plan_")[1].rsplit("_", 1)[0]: RankPlan.load(p)
             for p in sorted(results.glob(f"{prefix}_plan_*_variance.json"))}
    if len(plans) < 2:
        return ""
    lines = ["| task A | task B | Spearman (scores) | Spearman (ranks) | Kendall (ranks) | layers with equal rank |",
             "|---|---|---|---|---|---|"]
    for a, b in combinations(plans, 2):
        sa, sb = [lp.score for lp in plans[a].layers], [lp.score for lp in plans[b].layers]
        ra, rb = [lp.rank for lp in plans[a].layers], [lp.rank for lp in plans[b].layers]
        same = sum(x == y for x, y in zip(ra, rb, strict=True))
        lines.append(f"| {a} | {b} | {agreement(sa, sb)[0]:.2f} | {agreement(ra, rb)[0]:.2f} | "
                     f"{agreement(ra, rb)[1]:.2f} | {same}/{len(ra)} |")
    return "\n".join(lines)


def plot_main(summary: list[dict], path: Path) -> None:
    """Per-task bars (mean, error bar = std over seeds), one colour per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(s["task"] for s in summary if not s["variant"]))
    methods = [m for m in METHODS if any(s["method"] == m for s in summary)]
    at = {(s["task"], s["method"]): s for s in summary if not s["variant"]}
    fig = Figure(figsize=(3.2 * len(tasks), 3.6))
    FigureCanvasAgg(fig)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        vals = [at.get((task, m)) for m in methods]
        means = [100 * v["mean"] if v else 0 for v in vals]
        stds = [100 * v["std"] if v else 0 for v in vals]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3, color=[f"C{k}" for k in range(len(methods))])
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        hi = max(m + s for m, s in zip(means, stds, strict=True))
        ax.set_ylim(lo - 0.3 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1))
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{task} (dev; n={vals[0]['n'] if vals[0] else 0} seeds)", fontsize=9)
    fig.suptitle("all-MiniLM-L6-v2 + LoRA, same parameter budget: mean +- std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_ablations(summary: list[dict], main_summary: list[dict], path: Path) -> None:
    """One panel per knob: score vs setting, with the main table's uniform as a band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    base = {(s["task"], s["method"]): s for s in main_summary if not s["variant"]}
    defaults = {"T": 8, "r_min": 4, "temperature": 1.0, "calib_rank": 8, "granularity": "sample"}
    knobs = list(defaults)
    fig = Figure(figsize=(3.0 * len(knobs), 3.2))
    FigureCanvasAgg(fig)
    for i, knob in enumerate(knobs):
        ax = fig.add_subplot(1, len(knobs), i + 1)
        for k, task in enumerate(dict.fromkeys(s["task"] for s in summary)):
            points = [(s["variant"].split("=")[1], s) for s in summary if s["task"] == task and s["variant"].startswith(knob + "=")]
            if (task, "fim-variance") in base:
                points.append((str(defaults[knob]), base[(task, "fim-variance")]))
            try:
                points.sort(key=lambda p: float(p[0]))
            except ValueError:
                points.sort(key=lambda p: p[0])
            xs = [p[0] for p in points]
            ax.errorbar(range(len(xs)), [100 * p[1]["mean"] for p in points], yerr=[100 * p[1]["std"] for p in points],
                        marker="o", capsize=3, color=f"C{k}", label=task)
            ax.set_xticks(range(len(xs)), xs)
            if (task, "uniform") in base:
                u = base[(task, "uniform")]
                ax.axhspan(100 * (u["mean"] - u["std"]), 100 * (u["mean"] + u["std"]), color=f"C{k}", alpha=0.12)
                ax.axhline(100 * u["mean"], color=f"C{k}", ls="--", lw=0.8)
        ax.set_xlabel(knob)
        ax.set_title(f"fim-variance vs {knob}", fontsize=9)
        if i == 0:
            ax.set_ylabel("dev score (band: uniform mean +- std)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(results: Path, prefix: str, specs=()) -> None:
    """Write <prefix>_summary.csv, <prefix>_ablations_summary.csv, plots and <prefix>_tables.md."""
    main_rows = read_rows(results / f"{prefix}_main.csv")
    abl_rows = read_rows(results / f"{prefix}_ablations.csv")
    stab_rows = read_rows(results / f"{prefix}_stability.csv")
    parts = []
    main_summary = summarise(main_rows) if main_rows else []
    if main_summary:
        write_csv(main_summary, f"{prefix}_summary.csv", results)
        plot_main(main_summary, results / f"{prefix}_main.png")
        parts += ["## Main table", "", markdown_main(main_summary, majority_baselines(specs)),
                  "", "Wall time per cell (seconds, mean over seeds):", "", markdown_times(main_rows)]
    if abl_rows:
        abl_summary = summarise(abl_rows, reference=_by_cell(main_rows))
        write_csv(abl_summary, f"{prefix}_ablations_summary.csv", results)
        plot_ablations(abl_summary, main_summary, results / f"{prefix}_ablations.png")
        parts += ["", "## Ablations", "", markdown_ablations(abl_summary, main_summary),
                  "", "Wall time per ablation cell:", "", markdown_times(abl_rows)]
    if stab_rows:
        parts += ["", "## Stability", "", markdown_stability(stab_rows)]
        cross = markdown_cross_task(results, prefix)
        if cross:
            parts += ["", "Across tasks (seed-0 `variance` plans, same head seed and calibration A seed):", "", cross]
    text = "\n".join(parts) + "\n"
    (results / f"{prefix}_tables.md").write_text(text)
    print(text)
