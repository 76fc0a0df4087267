"""Tables and a plot from results/quality/runs.csv (any subset of the grid; incomplete pairs are left out).

    python benchmarks/quality/report.py            # writes results/quality/tables.md and paired_differences.png
    python benchmarks/quality/report.py --readme benchmarks/quality/README.md   # and the README's tables
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from analysis import Paired, compare, correct, minimum_detectable_effect, paired_bootstrap, seeds_needed  # noqa: E402
from methods import BUDGETS  # noqa: E402
from run import DATA_DIR, RESULTS  # noqa: E402
from tasks import glue_tasks, load_task, task_score  # noqa: E402

BARS = {"sst2": 84.0, "mrpc": 80.0, "cola": 20.0}


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def gold_labels(data_dir: str, split: str) -> dict[str, list[int]]:
    """Class ids of every task's val or dev split, in the order the runs predicted them."""
    out = {}
    for name, spec in glue_tasks(data_dir).items():
        try:
            data = load_task(spec)
        except (OSError, ValueError):
            continue
        examples = data.val if split == "val" else data.dev
        index = {label: i for i, label in enumerate(data.label_names)}
        out[name] = [index[label] for label in examples.labels]
    return out


def fmt(x: float, digits: int = 2, sign: bool = False) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def mean_sd(values: list[float]) -> str:
    n = len(values)
    if n == 0:
        return ""
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return f"{mean:.2f} ± {fmt(sd)} ({n})"


class Grid:
    """Rows of one split and recipe precision, indexed by (task, method, budget, seed)."""

    def __init__(self, rows: list[dict], split: str, bf16: str = "True") -> None:
        self.rows = [r for r in rows if r["split"] == split and r["bf16"] == bf16]
        self.by = {(r["task"], r["method"], r["budget"], int(r["seed"])): r for r in self.rows}
        self.tasks = [t for t in ("sst2", "mrpc", "cola", "rte") if any(r["task"] == t for r in self.rows)]
        self.methods = list(dict.fromkeys(r["method"] for r in self.rows))

    def seeds(self, task: str, method: str, budget: str) -> list[int]:
        return sorted(s for (t, m, b, s) in self.by if (t, m, b) == (task, method, budget))

    def pairs(self, task: str, method: str, budget: str) -> list[tuple[dict, dict]]:
        return [(self.by[(task, method, budget, s)], self.by[(task, "uniform", budget, s)])
                for s in self.seeds(task, method, budget) if (task, "uniform", budget, s) in self.by]


def paired_table(grid: Grid, budget: str, methods: list[str], gold: dict[str, list[int]], metric: dict[str, str],
                 bootstrap: int) -> tuple[list[str], list[Paired]]:
    """Per-task and pooled paired differences against uniform, corrected over this table's pooled rows."""
    lines = ["| method | " + " | ".join(grid.tasks) + " | pooled (tasks x seeds) | bootstrap 95% CI | Holm p | MDE |",
             "|---|" + "---|" * (len(grid.tasks) + 4)]
    pooled_rows: list[Paired] = []
    cells: dict[str, list[str]] = {}
    for method in methods:
        per_task, diffs, boot_pairs = [], [], []
        for task in grid.tasks:
            pairs = grid.pairs(task, method, budget)
            d = [float(a["score"]) - float(b["score"]) for a, b in pairs]
            diffs += d
            c = compare(task, d)
            per_task.append(f"{fmt(c.mean, sign=True)} [{fmt(c.lo, sign=True)}, {fmt(c.hi, sign=True)}] (n={c.n})"
                            if d else "")
            if task in gold:
                scorer = (lambda m: lambda p, g: task_score(m, p, g))(metric[task])
                boot_pairs += [([int(x) for x in a["predictions"]], [int(x) for x in b["predictions"]], gold[task],
                                scorer) for a, b in pairs if len(a["predictions"]) == len(gold[task])]
        row = compare(method, diffs)
        if boot_pairs and bootstrap:
            row.boot_lo, row.boot_hi = paired_bootstrap(boot_pairs, resamples=bootstrap)
        pooled_rows.append(row)
        cells[method] = per_task
    correct(pooled_rows)
    for row in pooled_rows:
        lines.append(f"| {row.label} | " + " | ".join(cells[row.label]) +
                     f" | {fmt(row.mean, sign=True)} [{fmt(row.lo, sign=True)}, {fmt(row.hi, sign=True)}] (n={row.n}, sd {fmt(row.sd)})"
                     f" | [{fmt(row.boot_lo, sign=True)}, {fmt(row.boot_hi, sign=True)}] | {fmt(row.p_holm, 3)} | {fmt(row.mde)} |")
    return lines, pooled_rows


def score_table(grid: Grid, budget: str, methods: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(grid.tasks) + " | LoRA params (min-max over runs) | wall time per run |",
             "|---|" + "---|" * (len(grid.tasks) + 2)]
    for method in methods:
        rows = [r for r in grid.rows if r["method"] == method and r["budget"] == budget]
        if not rows:
            continue
        scores = [mean_sd([float(r["score"]) for r in rows if r["task"] == t]) for t in grid.tasks]
        ratio = [int(r["lora_params"]) / int(r["uniform_params"]) for r in rows]
        params = sorted(int(r["lora_params"]) for r in rows)
        secs = sum(float(r["seconds"]) for r in rows) / len(rows)
        lines.append(f"| {method} | " + " | ".join(scores) +
                     f" | {params[0]:,}-{params[-1]:,} ({min(ratio):.3f}-{max(ratio):.3f} x uniform) | {secs / 60:.1f} min |")
    return lines


def clamp_share(grid: Grid, budget: str) -> list[str]:
    """How much of fim-variance's map sits at the clamps: the allocator's clamps versus its scores."""
    b = BUDGETS[budget]
    lines = ["| task | runs | layers at r_min | at r_max | in between |", "|---|---|---|---|---|"]
    for task in grid.tasks:
        rows = [r for r in grid.rows if (r["task"], r["method"], r["budget"]) == (task, "fim-variance", budget)]
        ranks = [int(x) for r in rows for x in r["ranks"].split()]
        if ranks:
            lo, hi = sum(x <= b.r_min for x in ranks) / len(ranks), sum(x >= b.r_max for x in ranks) / len(ranks)
            lines.append(f"| {task} | {len(rows)} | {lo:.0%} | {hi:.0%} | {1 - lo - hi:.0%} |")
    return lines


def power_table(grid: Grid, budget: str, method: str = "fim-variance") -> list[str]:
    """Paired sd of ``method`` minus uniform per task, the effect this design can see, the seeds a smaller one needs."""
    lines = ["| task | pairs | uniform sd over seeds | paired sd | MDE now (80% power, alpha 0.05) |"
             " seeds for 0.5 points | seeds for 1 point |", "|---|---|---|---|---|---|---|"]
    pooled: list[float] = []
    for task in [*grid.tasks, "pooled"]:
        if task == "pooled":
            diffs, uniform = pooled, []
        else:
            pairs = grid.pairs(task, method, budget)
            diffs = [float(a["score"]) - float(b["score"]) for a, b in pairs]
            uniform = [float(r["score"]) for r in grid.rows if (r["task"], r["method"], r["budget"]) == (task, "uniform", budget)]
            pooled += diffs
        if len(diffs) < 2:
            continue
        sd = compare(task, diffs).sd
        u_sd = compare(task, uniform).sd if len(uniform) > 1 else math.nan
        if sd > 0:
            need = [str(seeds_needed(effect, sd) or "> 1000") for effect in (0.5, 1.0)]
        else:  # identical differences in every pair: no estimate of the noise yet
            need = ["n/a", "n/a"]
        lines.append(f"| {task} | {len(diffs)} | {fmt(u_sd)} | {fmt(sd)} | "
                     f"{fmt(minimum_detectable_effect(sd, len(diffs)))} | " + " | ".join(need) + " |")
    return lines


def map_agreement(grid: Grid, budget: str) -> list[str]:
    """Spearman correlation of rank maps (36 layers): how much of fim-variance's map is the task, the seed, the prior."""
    from scipy.stats import spearmanr

    def ranks(task: str, method: str, seed: int) -> list[int] | None:
        row = grid.by.get((task, method, budget, seed))
        return [int(x) for x in row["ranks"].split()] if row else None

    runs = [(t, s) for (t, m, b, s) in grid.by if (m, b) == ("fim-variance", budget)]
    pairs: dict[str, list[float]] = {"fim-variance, another seed (same task)": [],
                                     "fim-variance, another task (same seed)": [],
                                     "prior (same task and seed)": [], "fim-warm (same task and seed)": []}
    for i, (t, s) in enumerate(runs):
        mine = ranks(t, "fim-variance", s)
        for t2, s2 in runs[i + 1:]:
            key = "fim-variance, another seed (same task)" if t2 == t else (
                "fim-variance, another task (same seed)" if s2 == s else None)
            if key:
                pairs[key].append(spearmanr(mine, ranks(t2, "fim-variance", s2))[0])
        for method in ("prior", "fim-warm"):
            other = ranks(t, method, s)
            if other:
                pairs[f"{method} (same task and seed)"].append(spearmanr(mine, other)[0])
    lines = ["| fim-variance's map against | map pairs | Spearman (mean, min-max) |", "|---|---|---|"]
    for label, rhos in pairs.items():
        if rhos:
            lines.append(f"| {label} | {len(rhos)} | {sum(rhos) / len(rhos):.2f} ({min(rhos):.2f} to {max(rhos):.2f}) |")
    return lines


def verdict_table(path: Path) -> list[str]:
    """What fimlora's defaults decide on the study's calibrations (verdicts.py), per task and batch count."""
    if not path.exists():
        return []
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in read_rows(path):
        groups.setdefault((row["task"], row["num_batches"]), []).append(row)
    lines = ["| task | num_batches | seeds | batches read | verdicts | action | layers wider than one step "
             "(mean, max) | expected rank change per layer (mean) |", "|---|---|---|---|---|---|---|---|"]
    for (task, batches), rows in groups.items():
        share = [float(r["unstable_share"]) for r in rows]
        change = [float(r["expected_rank_change"]) for r in rows]
        verdicts = ", ".join(f"{v} {sum(r['verdict'] == v for r in rows)}" for v in sorted({r["verdict"] for r in rows}))
        actions = ", ".join(f"{a} {sum(r['action'] == a for r in rows)}" for a in sorted({r["action"] for r in rows}))
        used = sorted(int(r["batches_used"]) for r in rows)
        lines.append(f"| {task} | {batches} | {len(rows)} | {used[0]}-{used[-1]} | {verdicts} | {actions} | "
                     f"{sum(share) / len(share):.0%}, {max(share):.0%} | {sum(change) / len(change):.2f} |")
    return lines


def headline(grid: Grid, budget: str, rows: list[Paired]) -> list[str]:
    """The answer in numbers, one line per comparison, so prose elsewhere can quote it verbatim."""
    methods = {r["method"] for r in grid.rows if r["budget"] == budget}
    complete = set.intersection(*(set(grid.seeds(t, m, budget)) for t in grid.tasks for m in methods))
    lines = [f"Budget {budget}: {sum(r['budget'] == budget for r in grid.rows)} dev rows; seeds complete on every "
             f"task and method: {', '.join(map(str, sorted(complete))) or 'none'}."]
    for r in rows:
        lines.append(f"- {r.label} minus uniform, pooled: {fmt(r.mean, sign=True)} points, t 95% CI "
                     f"[{fmt(r.lo, sign=True)}, {fmt(r.hi, sign=True)}], bootstrap [{fmt(r.boot_lo, sign=True)}, "
                     f"{fmt(r.boot_hi, sign=True)}], n = {r.n}, Holm p {fmt(r.p_holm, 3)}, MDE {fmt(r.mde)}")
    return lines


def plot(grid: Grid, rows_by_budget: dict[str, list[Paired]], metric: dict[str, str], path: Path) -> None:
    """Forest plot: one panel per task and one pooled, a row per (method, budget); each seed's difference
    as a tick, the mean as a dot, the t interval over seeds and (pooled) the paired bootstrap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(budget, r) for budget, rows in rows_by_budget.items() for r in rows if r.n >= 1]
    if not items:
        return
    panels = [*grid.tasks, "pooled"]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 0.5 * len(items) + 1.8), sharey=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for y, (budget, row) in enumerate(items):
            if panel == "pooled":
                c = row
            else:
                c = compare(row.label, [float(a["score"]) - float(b["score"]) for a, b in grid.pairs(panel, row.label, budget)])
            if not c.n:
                continue
            ax.plot(c.diffs, [y] * c.n, "|", color="grey", ms=9, label="one seed" if y == 0 else None)
            if math.isfinite(c.lo):
                ax.plot([c.lo, c.hi], [y, y], color="tab:blue", lw=2, label="t 95% CI over seeds" if y == 0 else None)
            if panel == "pooled" and math.isfinite(row.boot_lo):
                ax.plot([row.boot_lo, row.boot_hi], [y + 0.2, y + 0.2], color="tab:orange", lw=2,
                        label="bootstrap 95% CI (seeds x dev examples)" if y == 0 else None)
            ax.plot([c.mean], [y], "o", color="black", ms=5)
        ax.axvline(0, color="grey", lw=1)
        unit = "points" if panel == "pooled" else metric.get(panel, "")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(f"minus uniform ({unit})", fontsize=8)
    axes[0][0].set_yticks(range(len(items)), [f"{r.label} ({b})" for b, r in items])
    axes[0][0].invert_yaxis()
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.suptitle("method minus uniform LoRA at the same parameter count, GLUE dev sets", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=3, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


README_BLOCK = re.compile(r"(<!-- report\.py: (\w+) -->\n).*?(<!-- /report\.py -->)", re.S)


def fill_readme(path: Path, sections: dict[str, list[str]]) -> None:
    """Replace each ``<!-- report.py: NAME -->`` ... ``<!-- /report.py -->`` block of a README with section NAME
    of tables.md (headings one level down), so that the README's tables are exactly what this script printed."""
    text = path.read_text()
    found = [m.group(2) for m in README_BLOCK.finditer(text)]
    if sorted(found) != sorted(sections):
        raise SystemExit(f"report.py: {path} needs one block per section {sorted(sections)}, found {found}; "
                         f"mark each with <!-- report.py: NAME --> ... <!-- /report.py -->")

    def body(match: re.Match) -> str:
        lines = ["#" + line if line.startswith("#") else line for line in sections[match.group(2)]]
        return match.group(1) + "\n".join(lines).strip("\n") + "\n" + match.group(3)

    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(README_BLOCK.sub(body, text))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=str(RESULTS / "runs.csv"))
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples (0: skip the bootstrap)")
    p.add_argument("--readme", type=Path, help="also rewrite this README's <!-- report.py: val|dev --> blocks")
    args = p.parse_args(argv)
    if args.readme and not args.readme.is_file():
        p.error(f"--readme {args.readme}: no such file; pass the study's README (benchmarks/quality/README.md)")
    rows = read_rows(Path(args.results))
    metric = {name: spec.metric for name, spec in glue_tasks(args.data_dir).items()}
    out: list[str] = []

    val = Grid(rows, "val")
    if val.rows:
        out += ["## Pilot: uniform r=8 on the validation split (carved from train)", "",
                "| task | bar | uniform (mean ± sd (n)) | steps | wall time per run |", "|---|---|---|---|---|"]
        for task in val.tasks:
            rs = [r for r in val.rows if (r["task"], r["method"], r["budget"]) == (task, "uniform", "r8")]
            if rs:
                out.append(f"| {task} | {BARS.get(task, '')} | {mean_sd([float(r['score']) for r in rs])} | "
                           f"{rs[0]['steps']} | {sum(float(r['seconds']) for r in rs) / len(rs) / 60:.1f} min |")
        for (t, mth, b, s), r32 in Grid(rows, "val", bf16="False").by.items():
            r16 = val.by.get((t, mth, b, s))
            if r16:
                out.append(f"\nbf16 parity, {t} {mth} {b} seed {s}: fp32 {float(r32['score']):.2f} "
                           f"({float(r32['seconds']) / 60:.1f} min) vs bf16 {float(r16['score']):.2f} "
                           f"({float(r16['seconds']) / 60:.1f} min); final loss {r32['loss_last']} vs {r16['loss_last']}")
        scoring = [m for m in val.methods if m != "uniform"]
        if scoring:
            gold = gold_labels(args.data_dir, "val")
            out += ["", "## Scoring choices on the validation split (paired against uniform, same seeds)", ""]
            out += score_table(val, "r8", ["uniform", *scoring]) + [""]
            out += paired_table(val, "r8", scoring, gold, metric, args.bootstrap)[0]

    sections = {"val": out, "dev": []}
    out = sections["dev"]  # the dev sets' tables from here on
    dev = Grid(rows, "dev")
    pooled: dict[str, list[Paired]] = {}
    if dev.rows:
        gold = gold_labels(args.data_dir, "dev")
        for budget in BUDGETS:
            methods = [m for m in dev.methods if any(r["method"] == m and r["budget"] == budget for r in dev.rows)]
            if "uniform" not in methods:
                continue
            others = [m for m in methods if m != "uniform"]
            out += ["", f"## Dev sets, budget {budget} (uniform r={BUDGETS[budget].rank}): scores", ""]
            out += score_table(dev, budget, methods)
            if others:
                out += ["", f"## Dev sets, budget {budget}: method minus uniform, paired by seed (points)", ""]
                lines, pooled[budget] = paired_table(dev, budget, others, gold, metric, args.bootstrap)
                out += lines + [""] + headline(dev, budget, pooled[budget])
            if "fim-variance" in others:
                out += ["", f"## Dev sets, budget {budget}: power (fim-variance minus uniform)", ""]
                out += power_table(dev, budget)
                out += ["", f"## Dev sets, budget {budget}: how alike the rank maps are", ""]
                out += map_agreement(dev, budget)
            out += ["", f"fim-variance's ranks at the clamps [{BUDGETS[budget].r_min}, {BUDGETS[budget].r_max}]:", ""]
            out += clamp_share(dev, budget)
        verdicts = verdict_table(Path(args.results).parent / "verdicts.csv")
        if verdicts:
            out += ["", "## What fimlora's defaults decide on these calibrations (`verdicts.py`)", ""] + verdicts
        total = sum(float(r["seconds"]) for r in dev.rows)
        out += ["", f"Dev runs: {len(dev.rows)}, {total / 3600:.1f} h of single-thread wall time in all."]
    text = "\n".join(sections["val"] + sections["dev"]).strip("\n") + "\n"
    target = Path(args.results).parent
    (target / "tables.md").write_text(text)
    plot(dev, pooled, metric, target / "paired_differences.png")
    if args.readme:
        fill_readme(args.readme, sections)
    print(text)


if __name__ == "__main__":
    main()
