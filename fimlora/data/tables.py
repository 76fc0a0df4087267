"""File text -> a table: (columns, rows), each row (where, {column: value}), for .jsonl, .json
(one array of objects) and .csv/.tsv. ``where`` ("line 3", "item 2 (line 7)") lets every error
point at its row."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

Table = tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]


def jsonl_table(text: str, source: str) -> Table:
    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}, line {number}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{source}, line {number}: expected a JSON object, got {type(row).__name__}")
            yield f"line {number}", row

    return _first_keys_as_header(rows())


def json_array_table(text: str, source: str) -> Table:
    """A .json file: one array of objects, decoded an item at a time so errors name the item and line."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"[ \t\n\r]*")

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def fail(offset: int, what: str) -> ValueError:
        return ValueError(f"{source}, line {line_of(offset)}: {what}")

    start = whitespace.match(text, 0).end()
    if start == len(text):
        return [], iter(())
    if text[start] != "[":
        try:
            kind = type(decoder.raw_decode(text, start)[0]).__name__
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, f"invalid JSON ({exc.msg})") from exc
        raise ValueError(f"{source}: expected a JSON array of objects ([{{...}}, {{...}}]), got a JSON {kind}; "
                         "a file of one object per line is JSON Lines: name it .jsonl")

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        offset = whitespace.match(text, start + 1).end()
        if text.startswith("]", offset):
            return
        for item in itertools.count(1):
            try:
                row, end = decoder.raw_decode(text, offset)
            except json.JSONDecodeError as exc:
                raise fail(exc.pos, f"invalid JSON in item {item} ({exc.msg})") from exc
            where = f"item {item} (line {line_of(offset)})"
            if not isinstance(row, dict):
                raise ValueError(f"{source}, {where}: expected a JSON object, got {type(row).__name__}")
            yield where, row
            offset = whitespace.match(text, end).end()
            if text.startswith("]", offset):
                if whitespace.match(text, offset + 1).end() != len(text):
                    raise fail(offset + 1, "unexpected text after the closing ']'")
                return
            if not text.startswith(",", offset):
                raise fail(offset, f"expected ',' or ']' after item {item}")
            offset = whitespace.match(text, offset + 1).end()

    return _first_keys_as_header(rows())


def _first_keys_as_header(iterator: Iterator[tuple[str, dict[str, Any]]]) -> Table:
    # JSON has no header: the first object's keys stand in for it.
    first = next(iterator, None)
    return (list(first[1]), itertools.chain([first], iterator)) if first else ([], iter(()))


def delimited_table(text: str, source: str, suffix: str, column_names: Sequence[str] | None = None) -> Table:
    # GLUE TSVs are unquoted and contain literal '"' characters, so quoting must be off for .tsv.
    tsv = suffix == ".tsv"
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",", quoting=quoting)
    header = list(column_names) if column_names is not None else [name.strip() for name in next(reader, [])]
    named_by = "the header" if column_names is None else "column_names"

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
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
            yield f"line {reader.line_num}", dict(zip(header, fields, strict=True))

    return header, rows()
