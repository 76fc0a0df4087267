"""Readers: a .txt/.jsonl/.json/.csv/.tsv file, a Hub dataset or the built-in demo set -> `TextExamples`.

Three layouts: plain texts (with optional pair and label columns); prompt/completion pairs for
causal-LM calibration with the loss on the completion only (a prompt column or a prompt
template over several columns, see ``prompts``); and chat conversations (a column of
``{"role", "content"}`` messages, rendered later by the tokenizer's chat template).

Every error names the source, and the line (or item, or row) where it can."""

from __future__ import annotations

import importlib.resources
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import ALPACA, check_messages, plain_chat, prompt_fields, render_prompt
from .tables import Table, delimited_table, json_array_table, jsonl_table

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".csv", ".tsv", ".json")
_DEFAULT_TEXT_COLUMNS = ("text", "sentence", "sentence1")
_BUILTIN_FILE = "builtin_sentiment.jsonl"
logger = logging.getLogger("fimlora")


@dataclass
class TextExamples:
    """Raw examples: texts, optional second texts (pair tasks such as RTE) and raw labels.

    Causal-LM prompt/completion examples have ``completions``: ``texts`` are then the prompts, and
    the loss covers the completion tokens only. Chat examples have ``messages`` (one list of
    ``{"role", "content"}`` dicts each): ``texts`` are then a plain "role: content" rendering for
    display, and the encoding goes through the tokenizer's chat template instead.

    ``columns`` records what the reader chose, defaults and layouts found from the columns
    included (e.g. ``{"prompt_template": "alpaca", "completion_column": "output"}``), for a
    summary or a plan; it takes no part in equality.
    """

    texts: list[str]
    text_pairs: list[str] | None = None
    labels: list | None = None
    completions: list[str] | None = None
    messages: list[list[dict]] | None = None
    columns: dict[str, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.completions is not None and self.messages is not None:
            raise ValueError("TextExamples: completions and messages are two layouts; give one of them")
        for name in ("text_pairs", "labels", "completions", "messages"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.texts):
                raise ValueError(f"TextExamples: {len(self.texts)} texts but {len(values)} {name}")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int]) -> TextExamples:
        """The examples at ``indices``, in that order."""

        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return TextExamples(pick(self.texts), pick(self.text_pairs), pick(self.labels), pick(self.completions),
                            pick(self.messages), self.columns)


def read_examples(
    path_or_name: str,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    split: str = "train",
    limit: int | None = None,
    column_names: Sequence[str] | None = None,
    prompt_column: str | None = None,
    completion_column: str | None = None,
    prompt_template: str | None = None,
    messages_column: str | None = None,
) -> TextExamples:
    """Read examples from a .txt/.jsonl/.json/.csv/.tsv file, or a Hub dataset name if no such file
exists (a missing file with one of those suffixes, or an absolute path, is an error instead).

    A .json file holds one array of objects (``[{"instruction": ..., "output": ...}, ...]``);
    errors name the item (1-based) and its line.

    Columns default to "text" (else "sentence", else "sentence1") for the text, "sentence2" as the
    pair when the text column is "sentence1", and "label" when present. `limit` keeps the first N.
    `column_names` names the columns of a .csv/.tsv file that has no header row (GLUE's CoLA):
    its first line is then data.

    Prompt/completion (causal-LM, loss on the completion only): `prompt_column` and
    `completion_column` name the two texts, joined as they are (prompt + completion, as TRL's
    SFTTrainer joins them: end the prompt with the separator you train with). Or
    `prompt_template` builds the prompt from several columns: ``"alpaca"`` (the Stanford Alpaca /
    LLM-Adapters template over instruction and input, see ``prompts.ALPACA``; completion column
    "output" unless named) or a ``str.format`` template such as
    ``"Question: {question}\nAnswer: "``. `messages_column` names a column of chat conversations
    (lists of ``{"role", "content"}`` dicts), encoded with the tokenizer's chat template, loss on
    the assistant turns only.

    With none of text_column, prompt_column, prompt_template or messages_column given and none of
    the default text columns present, the layout follows the columns, as TRL's SFTTrainer reads
    them: "messages" -> chat; "prompt" and "completion" -> prompt/completion; "instruction" and
    "output" -> the "alpaca" template.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if column_names is not None and Path(path_or_name).suffix.lower() not in (".csv", ".tsv"):
        raise ValueError(f"column_names is for .csv/.tsv files without a header row, not {path_or_name!r}")
    columns = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column,
               "prompt_column": prompt_column, "completion_column": completion_column,
               "prompt_template": prompt_template, "messages_column": messages_column}
    _check_layout(**columns)
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
    if suffix == ".jsonl":
        table = jsonl_table(text, source)
    elif suffix == ".json":
        table = json_array_table(text, source)
    else:
        table = delimited_table(text, source, suffix, column_names)
    return _select(table, source, limit=limit, numeric_labels=suffix not in (".jsonl", ".json"), **columns)


def _check_layout(**options: str | None) -> None:
    """Options that contradict each other, refused before any file is read."""
    given = {name: value for name, value in options.items() if value is not None}
    chat, prompt = given.get("messages_column"), given.get("prompt_column")
    if chat is not None:
        others = [f"{name}={given[name]!r}" for name in ("text_column", "text_pair_column", "prompt_column",
                                                          "completion_column", "prompt_template") if name in given]
        if others:
            raise ValueError(f"messages_column={chat!r} is a layout of its own (the chat template renders each "
                             f"conversation); drop {', '.join(others)}")
    if prompt is not None and "prompt_template" in given:
        raise ValueError(f"give prompt_column={prompt!r} or prompt_template=, not both "
                         "(a template names its columns itself, as {column})")
    prompted = prompt is not None or "prompt_template" in given
    texts = [f"{name}={given[name]!r}" for name in ("text_column", "text_pair_column") if name in given]
    if prompted and texts:
        raise ValueError(f"{', '.join(texts)} and a prompt (prompt_column/prompt_template) are two layouts; "
                         "a prompt/completion example has no text column: drop one")
    if "completion_column" in given and not prompted:
        raise ValueError(f"completion_column={given['completion_column']!r} needs the prompt it completes: "
                         "name prompt_column= (--prompt-column) or prompt_template=")
    if prompted and "completion_column" not in given and given.get("prompt_template") != ALPACA:
        raise ValueError("a prompt needs its completion: name completion_column= (--completion-column); "
                         "the loss covers the completion tokens only")


def _auto_layout(columns: list[str], source: str) -> dict[str, str]:
    """The layout of a table without a default text column, read from its columns as TRL does."""
    if "messages" in columns:
        layout = {"messages_column": "messages"}
    elif "prompt" in columns and "completion" in columns:
        layout = {"prompt_column": "prompt", "completion_column": "completion"}
    elif "instruction" in columns and "output" in columns:
        layout = {"prompt_template": ALPACA, "completion_column": "output"}
    else:
        raise ValueError(
            f"{source} has none of the default text columns ({', '.join(_DEFAULT_TEXT_COLUMNS)}); "
            f"available columns: {', '.join(columns)}. Name one with text_column= (--text-column), "
            "or prompt_column= and completion_column= (--prompt-column/--completion-column), "
            "or messages_column= (--messages-column)"
        )
    logger.info("%s: reading %s", source, ", ".join(f"{name}={value!r}" for name, value in layout.items()))
    return layout


def _select(
    table: Table,
    source: str,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    prompt_column: str | None = None,
    completion_column: str | None = None,
    prompt_template: str | None = None,
    messages_column: str | None = None,
    limit: int | None = None,
    numeric_labels: bool = False,
) -> TextExamples:
    """Pick the text / pair / label (or prompt / completion, or messages) columns out of a table,
    checking names against its columns."""
    columns, rows = table
    if not columns:
        raise ValueError(f"{source} contains no examples")
    given = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column,
             "prompt_column": prompt_column, "completion_column": completion_column, "messages_column": messages_column}
    for option, name in given.items():
        if name is not None and name not in columns:
            raise ValueError(f"{option}={name!r} is not a column of {source}; available columns: {', '.join(columns)}")
    layout = {"prompt_column": prompt_column, "completion_column": completion_column,
              "prompt_template": prompt_template, "messages_column": messages_column}
    if text_column is None and not any(layout.values()):
        text_column = next((name for name in _DEFAULT_TEXT_COLUMNS if name in columns), None)
        if text_column is None:
            layout.update(_auto_layout(columns, source))
    if layout["prompt_template"] == ALPACA:
        layout["completion_column"] = layout["completion_column"] or "output"
    template = layout["prompt_template"]
    if template is not None:
        missing = [name for name in prompt_fields(template) + [layout["completion_column"]] if name not in columns]
        if missing:
            raise ValueError(f"prompt_template={template!r} needs the columns {', '.join(map(repr, missing))}, "
                             f"which {source} lacks; available columns: {', '.join(columns)}")
    if text_pair_column is None and text_column == "sentence1" and "sentence2" in columns:
        text_pair_column = "sentence2"
    label_column = label_column or ("label" if "label" in columns else None)

    # Each output list is filled from one column; a template's prompt from several.
    required = [*prompt_fields(template)] if template is not None else []
    chosen = {"texts": text_column or layout["prompt_column"], "pairs": text_pair_column, "labels": label_column,
              "completions": layout["completion_column"], "messages": layout["messages_column"]}
    values: dict[str, list] = {key: [] for key in chosen}
    for where, row in itertools.islice(rows, limit):
        for column in [*required, *chosen.values()]:
            if column is not None and row.get(column) is None:
                raise ValueError(f"{source}, {where}: no value for column {column!r}")
        for key, column in chosen.items():
            if column is not None:
                values[key].append(row[column])
        if template is not None:
            values["texts"].append(render_prompt(template, row))
        if layout["messages_column"] is not None:
            conversation = check_messages(row[layout["messages_column"]], f"{source}, {where}", layout["messages_column"])
            values["texts"].append(plain_chat(conversation))
    if not values["texts"]:
        raise ValueError(f"{source} contains no examples")
    labels = values["labels"]
    return TextExamples(
        texts=[str(text) for text in values["texts"]],
        text_pairs=[str(pair) for pair in values["pairs"]] if text_pair_column is not None else None,
        labels=(_parse_numbers(labels) if numeric_labels else labels) if label_column is not None else None,
        completions=[str(c) for c in values["completions"]] if layout["completion_column"] is not None else None,
        messages=values["messages"] if layout["messages_column"] is not None else None,
        columns={name: value for name, value in {"text_column": text_column, "text_pair_column": text_pair_column,
                                                 "label_column": label_column, **layout}.items() if value is not None},
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
    table = (list(dataset.column_names), ((f"row {index}", dict(row)) for index, row in enumerate(dataset, start=1)))
    return _select(table, f"dataset {name!r} [{split}]", limit=limit, numeric_labels=False, **columns)
