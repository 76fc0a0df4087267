"""Calibration data, in three eager, in-memory stages (calibration needs only a few batches):
`read_examples` (file or Hub dataset -> `TextExamples`), `encode_examples` (-> one dict of 1-D
tensors per example) and `make_batches` (-> padded batches)."""

from __future__ import annotations

import csv
import importlib.resources
import io
import itertools
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .losses import TASKS

logger = logging.getLogger("fimlora")

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".csv", ".tsv")
_DEFAULT_TEXT_COLUMNS = ("text", "sentence", "sentence1")
_BUILTIN_FILE = "builtin_sentiment.jsonl"

# (columns, rows); each row is (line number, {column: value}) so errors can point at the line.
_Table = tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]


@dataclass
class TextExamples:
    """Raw examples: texts, optional second texts (pair tasks such as RTE) and raw labels."""

    texts: list[str]
    text_pairs: list[str] | None = None
    labels: list | None = None

    def __post_init__(self) -> None:
        for name in ("text_pairs", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.texts):
                raise ValueError(f"TextExamples: {len(self.texts)} texts but {len(values)} {name}")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int]) -> TextExamples:
        """The examples at ``indices``, in that order."""

        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return TextExamples(pick(self.texts), pick(self.text_pairs), pick(self.labels))


def read_examples(
    path_or_name: str,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    split: str = "train",
    limit: int | None = None,
    column_names: Sequence[str] | None = None,
) -> TextExamples:
    """Read examples from a .txt/.jsonl/.csv/.tsv file, or a Hub dataset name if no such file exists.

    Columns default to "text" (else "sentence", else "sentence1") for the text, "sentence2" as the
    pair when the text column is "sentence1", and "label" when present. `limit` keeps the first N.
    `column_names` names the columns of a .csv/.tsv file that has no header row (GLUE's CoLA):
    its first line is then data.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if column_names is not None and Path(path_or_name).suffix.lower() not in (".csv", ".tsv"):
        raise ValueError(f"column_names is for .csv/.tsv files without a header row, not {path_or_name!r}")
    columns = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    path = Path(path_or_name)
    if not path.exists():
        return _read_hub_dataset(str(path_or_name), split=split, limit=limit, **columns)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return _parse(_read_text(path), suffix, str(path), limit=limit, column_names=column_names, **columns)


def builtin_examples() -> TextExamples:
    """The embedded demo calibration set: 128 short reviews, labels 0 (negative) / 1 (positive)."""
    resource = importlib.resources.files("fimlora").joinpath("data", _BUILTIN_FILE)
    return _parse(resource.read_text(encoding="utf-8"), ".jsonl", f"fimlora/data/{_BUILTIN_FILE}")


def _read_text(path: Path) -> str:
    """The file's text; OS and decoding errors become ValueErrors that name the file (and line)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig drops the byte-order mark that some GLUE files (MRPC) start with.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8 ({exc.reason}); save it as UTF-8") from exc


def _parse(text: str, suffix: str, source: str, *, limit: int | None = None,
           column_names: Sequence[str] | None = None, **columns: str | None) -> TextExamples:
    if suffix == ".txt":
        given = [f"{name}={value!r}" for name, value in columns.items() if value is not None]
        if given:
            raise ValueError(f"{source} is plain text (one example per line) and has no columns: {', '.join(given)}")
        texts = list(itertools.islice((line.strip() for line in text.splitlines() if line.strip()), limit))
        if not texts:
            raise ValueError(f"{source} contains no examples (every line is empty)")
        return TextExamples(texts=texts)
    table = _jsonl_table(text, source) if suffix == ".jsonl" else _delimited_table(text, source, suffix, column_names)
    return _select(table, source, limit=limit, numeric_labels=suffix != ".jsonl", **columns)


def _jsonl_table(text: str, source: str) -> _Table:
    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}, line {number}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{source}, line {number}: expected a JSON object, got {type(row).__name__}")
            yield number, row

    # JSON Lines has no header: the first object's keys stand in for it.
    iterator = rows()
    first = next(iterator, None)
    return (list(first[1]), itertools.chain([first], iterator)) if first else ([], iter(()))


def _delimited_table(text: str, source: str, suffix: str, column_names: Sequence[str] | None = None) -> _Table:
    # GLUE TSVs are unquoted and contain literal '"' characters, so quoting must be off for .tsv.
    tsv = suffix == ".tsv"
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",", quoting=quoting)
    header = list(column_names) if column_names is not None else [name.strip() for name in next(reader, [])]

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise ValueError(f"{source}, line {reader.line_num}: {exc}") from exc
            if not fields:  # blank line
                continue
            if len(fields) != len(header):
                raise ValueError(f"{source}, line {reader.line_num}: {len(fields)} fields but the header has {len(header)}")
            yield reader.line_num, dict(zip(header, fields, strict=True))

    return header, rows()


def _select(
    table: _Table,
    source: str,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
    numeric_labels: bool = False,
    unit: str = "line",
) -> TextExamples:
    """Pick the text / pair / label columns out of a table, checking names against its columns."""
    columns, rows = table
    if not columns:
        raise ValueError(f"{source} contains no examples")
    given = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    for option, name in given.items():
        if name is not None and name not in columns:
            raise ValueError(f"{option}={name!r} is not a column of {source}; available columns: {', '.join(columns)}")
    text_column = text_column or next((name for name in _DEFAULT_TEXT_COLUMNS if name in columns), None)
    if text_column is None:
        raise ValueError(
            f"{source} has none of the default text columns ({', '.join(_DEFAULT_TEXT_COLUMNS)}); "
            f"available columns: {', '.join(columns)}. Name one with text_column= (--text-column)"
        )
    if text_pair_column is None and text_column == "sentence1" and "sentence2" in columns:
        text_pair_column = "sentence2"
    label_column = label_column or ("label" if "label" in columns else None)

    chosen = (text_column, text_pair_column, label_column)
    texts, pairs, labels = values = ([], [], [])
    for number, row in itertools.islice(rows, limit):
        for column, out in zip(chosen, values, strict=True):
            if column is not None and row.get(column) is None:
                raise ValueError(f"{source}, {unit} {number}: no value for column {column!r}")
            if column is not None:
                out.append(row[column])
    if not texts:
        raise ValueError(f"{source} contains no examples")
    return TextExamples(
        texts=[str(text) for text in texts],
        text_pairs=[str(pair) for pair in pairs] if text_pair_column is not None else None,
        labels=(_parse_numbers(labels) if numeric_labels else labels) if label_column is not None else None,
    )


def _parse_numbers(labels: list) -> list:
    """CSV cells are strings: make labels ints (or floats) when every one of them parses as such."""
    for kind in (int, float):
        try:
            return [kind(label) for label in labels]
        except ValueError:
            continue
    return labels


def _read_hub_dataset(name: str, *, split: str, limit: int | None, **columns: str | None) -> TextExamples:
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"{name!r}: the file does not exist. To load a Hugging Face Hub dataset by name instead, "
            "install the datasets package (pip install datasets)"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub raises many kinds; all mean the same thing to the caller
        raise ValueError(f"{name!r} is not a file and could not be loaded as a dataset (split={split!r}): {exc}") from exc
    table = (list(dataset.column_names), ((index, dict(row)) for index, row in enumerate(dataset, start=1)))
    return _select(table, f"dataset {name!r} [{split}]", limit=limit, numeric_labels=False, unit="row", **columns)


def encode_examples(
    examples: TextExamples,
    tokenizer: Any,
    *,
    task: str,
    max_length: int,
    model_max_length: int | None = None,
    label_names: Sequence | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenise each example into 1-D LongTensors `input_ids`, `attention_mask` and `labels`.

    Sequences are truncated to min(max_length, model_max_length). For "causal-lm" the labels are a
    copy of input_ids; for "seq-cls" they are scalars (class ids, or floats for regression); for
    "seq2seq-lm" they are the token ids of the example's target text (its label column).
    `token_type_ids` is included too when the tokenizer declares it as a model input (BERT pairs).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    # Labels first, so a bad label column fails before any tokenising.
    labels = label_ids(examples.labels, label_names) if task == "seq-cls" else None
    targets = _target_texts(examples.labels) if task == "seq2seq-lm" else None
    limit = max_length if model_max_length is None else min(max_length, model_max_length)
    # BERT-style pair models need segment ids; models that do not declare them would reject them.
    with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    def tokenise(max_tokens: int) -> Any:
        return tokenizer(examples.texts, examples.text_pairs, truncation=True, max_length=max_tokens,
                         return_attention_mask=True, return_token_type_ids=with_types)

    # One token past the limit shows which examples the limit cuts, without the tokenizer's own
    # "longer than the maximum" warning that an untruncated call would log.
    encoded = tokenise(limit + 1)
    cut = sum(len(ids) > limit for ids in encoded["input_ids"])
    if cut:
        encoded = tokenise(limit)
        if model_max_length is not None and model_max_length <= max_length:
            message = f"{cut} of {len(examples)} examples were longer than the model's maximum of {model_max_length} tokens"
            warnings.warn(message + " and were truncated", stacklevel=2)
        else:
            logger.info("%d of %d examples were truncated to max_length=%d tokens", cut, len(examples), limit)

    if targets is not None:
        labels = tokenizer(text_target=targets, truncation=True, max_length=limit)["input_ids"]
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    features = []
    for i in range(len(examples)):
        feature = {key: torch.tensor(encoded[key][i], dtype=torch.long) for key in keys}
        if targets is not None:
            feature["labels"] = torch.tensor(labels[i], dtype=torch.long)
        elif labels is None:
            feature["labels"] = feature["input_ids"].clone()
        else:
            feature["labels"] = torch.tensor(labels[i], dtype=torch.float32 if isinstance(labels[i], float) else torch.long)
        features.append(feature)
    return features


def _target_texts(targets: list | None) -> list[str]:
    if targets is None or any(target is None or str(target) == "" for target in targets):
        raise ValueError("task 'seq2seq-lm' needs a target text for every example; name the target column (--target-column)")
    return [str(target) for target in targets]


def label_ids(labels: list | None, label_names: Sequence | None) -> list[int] | list[float]:
    """Turn raw labels into class ids (or floats for regression) for sequence classification."""
    if labels is None or any(label is None for label in labels):
        raise ValueError("task 'seq-cls' needs a label for every example; name the label column (--label-column)")
    if label_names is not None:
        index = {name: i for i, name in enumerate(label_names)}
        # Names win; an int that is not a name is taken as a class id if it is in range.
        ids = [index.get(label, label if isinstance(label, int) and 0 <= label < len(index) else None) for label in labels]
        unknown = sorted({repr(label) for label, i in zip(labels, ids, strict=True) if i is None})
        if unknown:
            raise ValueError(f"labels {', '.join(unknown)} are not in label_names={list(label_names)}")
        return [int(i) for i in ids]
    if all(isinstance(label, str) for label in labels):
        index = {name: i for i, name in enumerate(sorted(set(labels)))}
        logger.info("label ids: %s", index)
        return [index[label] for label in labels]
    if all(isinstance(label, int) for label in labels):  # bools too: JSON true/false are fine ids
        if min(labels) < 0:
            raise ValueError(f"label {min(labels)} is negative; class ids must be 0..num_labels-1 "
                             "(GLUE marks unlabelled test rows with -1)")
        return [int(label) for label in labels]
    if all(isinstance(label, (int, float)) for label in labels):
        return [float(label) for label in labels]  # regression
    kinds = sorted({type(label).__name__ for label in labels})
    raise ValueError(f"labels mix types ({', '.join(kinds)}); use all strings, all ints, or all floats")


def collate(features: list[dict], *, pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad 1-D features into one batch: input_ids with pad_token_id, masks and type ids with 0,
    per-token labels with -100 (ignored by the loss) to the longest labels (a seq2seq target can
    be longer or shorter than its source); scalar labels are stacked."""
    if not features:
        raise ValueError("collate needs at least one feature")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(feature["input_ids"].numel() for feature in features)
    batch = {}
    for key in features[0]:
        values = [feature[key] for feature in features]
        if key == "labels" and values[0].dim() == 0:
            batch[key] = torch.stack(values)
            continue
        if key == "labels":
            if any(value.dim() != 1 for value in values):
                raise ValueError("collate: per-token labels must be 1-D")
            size = max(value.numel() for value in values)
        elif any(value.shape != feature["input_ids"].shape for value, feature in zip(values, features, strict=True)):
            raise ValueError(f"collate: every {key!r} must be 1-D and as long as its input_ids")
        else:
            size = length
        fill = pad_token_id if key == "input_ids" else -100 if key == "labels" else 0
        paddings = [value.new_full((size - value.numel(),), fill) for value in values]
        pieces = zip(paddings, values, strict=True) if padding_side == "left" else zip(values, paddings, strict=True)
        batch[key] = torch.stack([torch.cat(pair) for pair in pieces])
    return batch


def make_batches(
    features: list[dict],
    *,
    batch_size: int,
    pad_token_id: int,
    padding_side: str = "right",
    num_batches: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of `batch_size` (the last may be smaller), shuffled by `seed` if asked, at most `num_batches`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    if not features:
        raise ValueError("make_batches got no features")
    order = list(range(len(features)))
    if shuffle:
        # A private generator: the same seed gives the same batches without touching global RNG state.
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).tolist()
    # Fewer batches than num_batches is not an error here: calibrate() warns about a short supply.
    starts = range(0, len(features), batch_size)[:num_batches]
    chunks = ([features[i] for i in order[start : start + batch_size]] for start in starts)
    return [collate(chunk, pad_token_id=pad_token_id, padding_side=padding_side) for chunk in chunks]


def pad_token_id_for(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0
