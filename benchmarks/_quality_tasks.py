"""Task specs, a generic delimited-file reader and GLUE-convention metrics for the quality study.

Every task, the four GLUE rows below as much as a user's own file, is one ``TaskSpec``: files,
columns (by name when the file has a header, by 0-based index when it has none), and the metric.
Nothing downstream looks at a task's name, so a new task needs no new code path.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("accuracy", "f1_accuracy", "matthews", "pearson_spearman")


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data is and how to read and score it.

    Columns are header names, or 0-based indices written as digits when ``header`` is False.
    ``metric`` picks the GLUE-style score: accuracy, f1_accuracy (mean of F1 and accuracy, MRPC),
    matthews (CoLA) or pearson_spearman (mean of both correlations, regression as in STS-B).
    """

    name: str
    train_file: str
    dev_file: str
    text: str
    label: str
    pair: str | None = None
    header: bool = True
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r} is unknown; use one of {', '.join(METRICS)}")

    @property
    def regression(self) -> bool:
        return self.metric == "pearson_spearman"


def glue_tasks(data_dir: str | Path) -> dict[str, TaskSpec]:
    """The four GLUE rows of the study; nothing about them is special-cased anywhere else."""
    d = Path(data_dir)
    return {
        "sst2": TaskSpec("sst2", str(d / "SST-2/train.tsv"), str(d / "SST-2/dev.tsv"), "sentence", "label"),
        "rte": TaskSpec("rte", str(d / "RTE/train.tsv"), str(d / "RTE/dev.tsv"), "sentence1", "label", pair="sentence2"),
        "mrpc": TaskSpec("mrpc", str(d / "MRPC/train.tsv"), str(d / "MRPC/dev.tsv"), "#1 String", "Quality",
                         pair="#2 String", metric="f1_accuracy"),
        # CoLA has no header: column 3 is the sentence, column 1 the label.
        "cola": TaskSpec("cola", str(d / "CoLA/train.tsv"), str(d / "CoLA/dev.tsv"), "3", "1", header=False,
                         metric="matthews"),
    }


@dataclass
class Examples:
    """Texts, optional second texts and raw (string) labels, row-aligned."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[str]
    skipped: int = 0  # malformed rows (too few fields) that were left out
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int]) -> Examples:
        pick = lambda values: None if values is None else [values[i] for i in indices]  # noqa: E731
        return Examples(pick(self.texts), pick(self.pairs), pick(self.labels))


def read_table(path: str | Path, spec: TaskSpec) -> Examples:
    """Read a .tsv (split on tabs, no quoting, as GLUE writes them) or .csv file.

    ``utf-8-sig`` drops MRPC's byte-order mark and is harmless elsewhere. Rows with too few
    fields are skipped and counted; more than 1% of them is an error (wrong delimiter or columns).
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if path.suffix.lower() == ".csv":
            rows = [row for row in csv.reader(handle)]
        else:
            rows = [line.rstrip("\r\n").split("\t") for line in handle]
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if spec.header:
        names, rows = rows[0], rows[1:]
        where = {name.strip(): i for i, name in enumerate(names)}

        def index(column: str) -> int:
            if column not in where:
                raise ValueError(f"{path}: no column {column!r}; the header has {list(where)}")
            return where[column]
    else:
        def index(column: str) -> int:
            if not column.isdigit():
                raise ValueError(f"{path} has no header: give column {column!r} as a 0-based index")
            return int(column)

    cols = [index(spec.text), index(spec.label)] + ([index(spec.pair)] if spec.pair else [])
    need = max(cols) + 1
    good = [row for row in rows if len(row) >= need]
    skipped = len(rows) - len(good)
    if not good or skipped > 0.01 * len(rows):
        raise ValueError(f"{path}: {skipped} of {len(rows)} rows have fewer than {need} fields; check the delimiter/columns")
    texts = [row[cols[0]].strip() for row in good]
    labels = [row[cols[1]].strip() for row in good]
    pairs = [row[cols[2]].strip() for row in good] if spec.pair else None
    return Examples(texts, pairs, labels, skipped=skipped)


def label_vocabulary(labels: Sequence[str]) -> list[str]:
    """Class names in a fixed order: numerically when every label is an integer, else sorted.

    The positive class for F1 is the last one ("1" for MRPC)."""
    names = sorted(set(labels))
    if all(name.lstrip("-").isdigit() for name in names):
        names = sorted(names, key=int)
    return names


def encode_labels(labels: Sequence[str], spec: TaskSpec, vocabulary: Sequence[str] | None) -> list[float] | list[int]:
    if spec.regression:
        return [float(label) for label in labels]
    index = {name: i for i, name in enumerate(vocabulary or ())}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} do not occur in the training file of task {spec.name!r}")
    return [index[label] for label in labels]


@dataclass
class TaskData:
    """The splits the study uses. ``heldout`` comes from train and is the only split used to select."""

    spec: TaskSpec
    train: Examples
    heldout: Examples
    dev: Examples
    vocabulary: list[str] | None
    train_rows: int  # rows in the train file (before the held-out split and subsampling)


def load_task(spec: TaskSpec, *, train_size: int, heldout_size: int, split_seed: int = 1234,
              dev_size: int | None = None) -> TaskData:
    """Hold out a fixed slice of train for selection, then keep a fixed subsample of the rest.

    Both draws use ``split_seed`` only, so every method and seed sees the same examples. The dev
    file is used whole unless ``dev_size`` (smoke runs only) keeps its first rows."""
    full = read_table(spec.train_file, spec)
    order = list(range(len(full)))
    random.Random(split_seed).shuffle(order)
    heldout_size = min(heldout_size, len(full) // 5)
    heldout, rest = order[:heldout_size], order[heldout_size:]
    train = rest[:train_size]
    vocabulary = None if spec.regression else label_vocabulary(full.labels)
    dev = read_table(spec.dev_file, spec)
    if dev_size is not None:
        dev = dev.select(range(min(dev_size, len(dev))))
    return TaskData(spec, full.select(train), full.select(heldout), dev, vocabulary, len(full))


# ---- metrics (GLUE conventions) -----------------------------------------------------------------

def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)


def f1_binary(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold, strict=True))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold, strict=True))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold, strict=True))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """Matthews correlation (binary); 0 when a margin is empty, as scikit-learn reports it."""
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold, strict=True))
    tn = sum(p != positive and g != positive for p, g in zip(pred, gold, strict=True))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold, strict=True))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold, strict=True))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def score_predictions(spec: TaskSpec, pred: Sequence, gold: Sequence, positive: int = 1) -> dict[str, float]:
    """All metrics that apply, plus ``score``: the task's GLUE number (higher is better)."""
    if spec.regression:
        from scipy.stats import spearmanr

        out = {"pearson": pearson(pred, gold), "spearman": float(spearmanr(pred, gold).statistic)}
        out["score"] = (out["pearson"] + out["spearman"]) / 2
        return out
    out = {"accuracy": accuracy(pred, gold), "f1": f1_binary(pred, gold, positive), "mcc": matthews(pred, gold, positive)}
    out["score"] = {"accuracy": out["accuracy"], "f1_accuracy": (out["f1"] + out["accuracy"]) / 2,
                    "matthews": out["mcc"]}[spec.metric]
    return out
