"""Prompt templates for prompt/completion examples, and the checks on chat messages.

``"alpaca"`` is the Stanford Alpaca prompt, which LLM-Adapters (the instruction / input /
output layout of its commonsense and math sets) also trains with: the variant with an
"### Input:" section when the row's ``input`` is non-empty, the one without it otherwise. The
completion (the row's ``output``) follows the prompt's final newline. Any other template is a
``str.format`` string over the row's columns, e.g. ``"Question: {question}\\nAnswer: "``.
"""

from __future__ import annotations

import string
from typing import Any

ALPACA = "alpaca"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def prompt_fields(template: str) -> list[str]:
    """The columns ``template`` must find in every row ("alpaca": instruction; its input is optional)."""
    if template == ALPACA:
        return ["instruction"]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt_template={template!r} is not a valid format string ({exc}); "
                         "write columns as {name} and literal braces as {{ and }}") from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"prompt_template={template!r}: {{{name}}} is not a column name; "
                             "name each column as {column}")
        if name not in fields:
            fields.append(name)
    if not fields:
        raise ValueError(f"prompt_template={template!r} names no column; write columns as {{name}}, "
                         f"or use prompt_template={ALPACA!r}")
    return fields


def render_prompt(template: str, row: dict[str, Any]) -> str:
    """The prompt for one row (whose template fields are all present and not None)."""
    if template == ALPACA:
        extra = row.get("input")
        if extra is None or str(extra).strip() == "":
            return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])
        return ALPACA_PROMPT.format(instruction=row["instruction"], input=extra)
    return template.format(**{name: row[name] for name in prompt_fields(template)})


def check_messages(value: Any, where: str, column: str) -> list[dict]:
    """A chat conversation: a non-empty list of {"role": str, "content": str} dicts with at least
    one assistant turn (the turns the loss covers). ``where`` names the source and row."""
    if isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} holds a string, not a list of {{'role', 'content'}} messages; "
                         "chat data needs a .jsonl/.json file or a dataset whose column is a list")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: column {column!r} must be a non-empty list of {{'role', 'content'}} messages, "
                         f"got {type(value).__name__ if value != [] else 'an empty list'}")
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {number} of column {column!r} is not a "
                             "{'role': str, 'content': str} dict")
    if not any(message["role"] == "assistant" for message in value):
        raise ValueError(f"{where}: the conversation in column {column!r} has no 'assistant' message, "
                         "so no token carries a loss (the loss covers the assistant turns only)")
    return value


def plain_chat(messages: list[dict]) -> str:
    """A plain "role: content" rendering of a conversation, for display only."""
    return "\n".join(f"{message['role']}: {message['content']}" for message in messages)
