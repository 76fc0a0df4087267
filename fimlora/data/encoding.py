"""Encoding: `TextExamples` -> one dict of 1-D LongTensors per example (input_ids, attention_mask,
labels and, for BERT-style pairs, token_type_ids), with labels turned into class ids."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..losses import TASKS
from .readers import TextExamples

logger = logging.getLogger("fimlora")


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
