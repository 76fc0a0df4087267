"""The study's tasks: files, columns and metric per task, read with fimlora's own reader.

Each task's train file is split once, by a fixed seed, into ``fit`` (what every run trains on)
and ``val`` (a slice carved from train, the only split the recipe and the scoring choices were
chosen on). The GLUE dev file is the reported split and is never used to choose anything.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fimlora.data import TextExamples, read_examples

METRICS = ("accuracy", "f1_accuracy", "matthews")
SPLIT_SEED = 1234


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data is and how to read and score it (``columns``: for headerless files)."""

    name: str
    train_file: str
    dev_file: str
    text: str
    label: str
    pair: str | None = None
    metric: str = "accuracy"
    columns: tuple[str, ...] | None = None

    def read(self, path: str) -> TextExamples:
        return read_examples(path, text_column=self.text, text_pair_column=self.pair, label_column=self.label,
                             column_names=self.columns)


def glue_tasks(data_dir: str | Path) -> dict[str, TaskSpec]:
    d = Path(data_dir)
    return {
        "sst2": TaskSpec("sst2", str(d / "SST-2/train.tsv"), str(d / "SST-2/dev.tsv"), "sentence", "label"),
        "mrpc": TaskSpec("mrpc", str(d / "MRPC/train.tsv"), str(d / "MRPC/dev.tsv"), "#1 String", "Quality",
                         pair="#2 String", metric="f1_accuracy"),
        "cola": TaskSpec("cola", str(d / "CoLA/train.tsv"), str(d / "CoLA/dev.tsv"), "sentence", "label",
                         metric="matthews", columns=("source", "label", "mark", "sentence")),
        "rte": TaskSpec("rte", str(d / "RTE/train.tsv"), str(d / "RTE/dev.tsv"), "sentence1", "label",
                        pair="sentence2"),
    }


@dataclass
class TaskData:
    spec: TaskSpec
    fit: TextExamples
    val: TextExamples
    dev: TextExamples
    label_names: list  # class id i is label_names[i]; the positive class (F1, MCC) is the last


def validation_size(rows: int) -> int:
    """10% of train, at most 1,000 rows: enough to rank recipes, small enough to leave train whole."""
    return min(1000, round(0.1 * rows))


def load_task(spec: TaskSpec, *, fit_size: int | None = None, eval_size: int | None = None) -> TaskData:
    """The fixed fit/val split of train (seeded by SPLIT_SEED only) and the dev file.

    ``fit_size``/``eval_size`` shrink the splits for smoke runs only."""
    train = spec.read(spec.train_file)
    order = list(range(len(train)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = validation_size(len(train))
    val, fit = order[:n_val], order[n_val:]
    dev = spec.read(spec.dev_file)
    names = sorted(set(train.labels), key=lambda x: (isinstance(x, str), x))
    if fit_size is not None:
        fit = fit[:fit_size]
    if eval_size is not None:
        val = val[:eval_size]
        dev = dev.select(range(min(eval_size, len(dev))))
    return TaskData(spec, train.select(fit), train.select(val), dev, names)


# ---- metrics (GLUE conventions; the positive class is id 1 in every binary task here) ----------

def _counts(pred: Sequence[int], gold: Sequence[int]) -> tuple[int, int, int, int]:
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold, strict=True))
    tn = sum(p != 1 and g != 1 for p, g in zip(pred, gold, strict=True))
    fp = sum(p == 1 and g != 1 for p, g in zip(pred, gold, strict=True))
    fn = sum(p != 1 and g == 1 for p, g in zip(pred, gold, strict=True))
    return tp, tn, fp, fn


def metric_parts(pred: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
    tp, tn, fp, fn = _counts(pred, gold)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": (tp + tn) / len(gold),
        "f1": 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn),
        "mcc": 0.0 if denom == 0 else (tp * tn - fp * fn) / denom,  # 0 for an empty margin, as sklearn
    }


def task_score(metric: str, pred: Sequence[int], gold: Sequence[int]) -> float:
    """The task's GLUE number x 100 (MRPC: mean of accuracy and F1; CoLA: MCC)."""
    parts = metric_parts(pred, gold)
    value = {"accuracy": parts["accuracy"], "f1_accuracy": (parts["accuracy"] + parts["f1"]) / 2,
             "matthews": parts["mcc"]}[metric]
    return 100.0 * value
