"""What fimlora's defaults would do with the study's calibrations: allocate, or fall back to uniform?

The study allocates every method itself, so its runs never see the library's uncertainty policy
(``if_uncertain="uniform"``). This script calibrates exactly as the study's ``fim-variance`` does
(fit split, fresh head from the seed, batches of 32, max length 128), once with the study's 8
batches and once with ``num_batches="auto"``, and records each map's confidence verdict and what
the default policy decides. One row per (task, seed, batches) in results/quality/verdicts.csv.

    python benchmarks/quality/verdicts.py --seeds 0-3
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import methods as m  # noqa: E402
from grid import Study, model_dir  # noqa: E402
from recipe import Recipe, Timer, load_classifier  # noqa: E402
from run import DATA_DIR, RESULTS, parse_seeds  # noqa: E402
from tasks import glue_tasks  # noqa: E402

from fimlora import AllocationConfig  # noqa: E402

MAX_BATCHES = 64  # the library's default cap for num_batches="auto"
FIELDS = ("task", "seed", "num_batches", "batches_used", "samples", "verdict", "unstable_share",
          "expected_rank_change", "flat_p", "action", "seconds")


def verdict_row(study: Study, task: str, seed: int, num_batches: int | str, max_batches: int = MAX_BATCHES) -> dict:
    recipe = Recipe(steps=0)  # batch size and max length of every run (steps do not matter here)
    data, feats = study.task(task, recipe.max_length)
    model = load_classifier(model_dir(), len(data.label_names), seed)
    timer = Timer()
    plan = m.calibration_plan(model, feats["fit"], seed=seed, pad_token_id=study.pad, batch_size=recipe.batch_size,
                              allocation=AllocationConfig(), num_batches=num_batches, max_batches=max_batches)
    c = plan.confidence
    return {"task": task, "seed": seed, "num_batches": num_batches, "batches_used": plan.calibration.get("num_batches"),
            "samples": c.samples, "verdict": c.verdict().split(":")[0], "unstable_share": f"{c.unstable_share:.3f}",
            "expected_rank_change": f"{c.expected_rank_change:.3f}", "flat_p": f"{c.flat_p:.3g}",
            "action": (plan.decision or {}).get("action", "allocated"), "seconds": f"{timer.seconds():.1f}"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,mrpc,cola")
    p.add_argument("--seeds", default="0-3")
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--out", default=str(RESULTS / "verdicts.csv"))
    p.add_argument("--smoke", action="store_true", help="tiny splits, 2 batches and auto up to 3 (what CI runs)")
    args = p.parse_args(argv)
    study = Study(glue_tasks(args.data_dir), smoke=args.smoke)
    fixed, most = (2, 3) if args.smoke else (m.CALIB_BATCHES, MAX_BATCHES)
    rows = []
    for task in args.tasks.split(","):
        for seed in parse_seeds(args.seeds):
            for num_batches in (fixed, "auto"):
                rows.append(verdict_row(study, task, seed, num_batches, most))
                print(" ".join(f"{k}={rows[-1][k]}" for k in FIELDS), flush=True)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)  # never a half-written CSV


if __name__ == "__main__":
    main()
