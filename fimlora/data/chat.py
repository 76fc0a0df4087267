"""Chat conversations -> token ids and an assistant-token mask, through the tokenizer's chat template.

The mask is 1 on the tokens of the assistant turns, the tokens SFT's assistant-only loss trains
on (TRL's ``assistant_only_loss``). It is made in one of two ways, reported by `encode_chat`:

- ``"generation"``: the template marks assistant text with ``{% generation %}`` blocks, and
  transformers' ``apply_chat_template(return_assistant_tokens_mask=True)`` returns the mask,
  exactly as TRL computes it.
- ``"prefix"``: the template has no such markers (most shipped templates). The conversation is
  rendered prefix by prefix: assistant turn i covers the tokens from the end of
  ``messages[:i]`` rendered with the generation prompt (the assistant header) to the end of
  ``messages[:i + 1]``. So a turn covers its content and whatever the template writes after it
  (its end-of-turn token, e.g. ``<|im_end|>``), but not its header. A template that renders an
  earlier turn differently once later turns follow (some drop past reasoning) is handled as
  TRL does for prompts: a turn starts and ends where the renderings stop agreeing, with a
  warning.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

MASK_SOURCES = ("generation", "prefix")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template (its default one, for a template shipped as named variants)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ValueError(f"{type(tokenizer).__name__} has no chat template, so a messages column cannot be "
                         "rendered; set tokenizer.chat_template, or use prompt_column/completion_column "
                         "(--prompt-column/--completion-column)")
    return template


def mask_source(tokenizer: Any) -> str:
    """How `encode_chat` finds the assistant tokens for this tokenizer: "generation" or "prefix"."""
    return "generation" if _GENERATION.search(chat_template_of(tokenizer)) else "prefix"


def _render(tokenizer: Any, messages: list[dict], **kwargs: Any) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """How many leading tokens two sequences share (TRL's rule for where a completion starts)."""
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def encode_chat(tokenizer: Any, messages: list[dict], source: str | None = None) -> tuple[list[int], list[int]]:
    """(input ids, assistant mask) of one conversation; ``source`` forces the mask's source
    (default `mask_source(tokenizer)`)."""
    source = source or mask_source(tokenizer)
    if source not in MASK_SOURCES:
        raise ValueError(f"mask source {source!r} is not one of {', '.join(MASK_SOURCES)}")
    if source == "generation":
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        return list(encoded["input_ids"]), [int(bit) for bit in encoded["assistant_masks"]]
    ids = _render(tokenizer, messages)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        through = _render(tokenizer, messages[: i + 1])
        start, end = common_prefix_length(before, ids), common_prefix_length(through, ids)
        if start < len(before) or end < len(through):
            warnings.warn("the chat template renders an assistant turn differently when later turns follow; "
                          "its loss covers the tokens where the renderings agree", stacklevel=2)
        mask[start:end] = [1] * max(0, end - start)
    return ids, mask
