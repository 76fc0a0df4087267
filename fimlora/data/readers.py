"""Readers: a .txt/.jsonl/.csv/.tsv file, a Hub dataset or the built-in demo set -> `TextExamples`.

Every error names the source, and the line (or row) where it can."""

from __future__ import annotations

import csv
import importlib.resources
import io
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Read examples from a .txt/.jsonl/.csv/.tsv file, or a Hub dataset name if no such file exists
(a missing file with one of those suffixes, or an absolute path, is an error instead).

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
    if not path.exists() and (path.suffix.lower() in SUPPORTED_EXTENSIONS or path.is_absolute()):
        raise FileNotFoundError(f"{path}: the file does not exist")  # not a Hub name: those have no suffix
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
    resource = importlib.resources.files("fimlora.data").joinpath(_BUILTIN_FILE)
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
    named_by = "the header" if column_names is None else "column_names"

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
                raise ValueError(f"{source}, line {reader.line_num}: {len(fields)} fields but {named_by} has {len(header)}")
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
