"""Encoding: `TextExamples` -> one dict of 1-D LongTensors per example (input_ids, attention_mask,
labels and, for BERT-style pairs, token_type_ids), with labels turned into class ids.

Causal-LM labels are -100 wherever a token carries no loss: the prompt of a prompt/completion
example, everything but the assistant turns of a chat example (see ``chat``)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..losses import IGNORE_INDEX, TASKS
from .chat import common_prefix_length, encode_chat, mask_source
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

    Sequences are truncated to min(max_length, model_max_length) (prompt/completion and chat
    examples keep their first tokens, as TRL's SFTTrainer truncates). For "causal-lm" the labels are
    a copy of input_ids; for "seq-cls" they are scalars (class ids, or floats for regression); for
    "seq2seq-lm" they are the token ids of the example's target text (its label column).
    `token_type_ids` is included too when the tokenizer declares it as a model input (BERT pairs).

    Causal-LM examples with completions (``TextExamples.completions``) are encoded as TRL's
    SFTTrainer encodes a prompt/completion dataset: the text is prompt + completion + EOS (the
    tokenizer's EOS token is appended unless the completion ends with it), tokenised as one
    string, and the labels are -100 on the prompt's tokens (the common prefix of the prompt's
    own tokenisation and the whole one). Chat examples (``TextExamples.messages``) are rendered
    with the tokenizer's chat template, labels -100 outside the assistant turns (``chat``).

    The per-sample loss the calibrator then takes for such an example (``losses.causal_lm_losses``)
    is the mean next-token cross-entropy over that sample's labelled tokens only:
    loss_n = (1/|C_n|) sum_{t in C_n} -log p(x_t | x_<t), C_n the completion (or assistant) tokens
    of sample n that survive truncation. SFT's batch loss, sum_n |C_n| loss_n / sum_n |C_n| (TRL
    divides by the batch's completion-token count), is these losses weighted by their token
    counts, so each sample's gradient is that of its own SFT loss. An example left with no
    labelled token after truncation carries no loss and is not counted as a sample.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    masked = examples.completions is not None or examples.messages is not None
    if masked and task != "causal-lm":
        layout = "prompt/completion" if examples.completions is not None else "chat (messages)"
        raise ValueError(f"{layout} examples are for task 'causal-lm' (the loss covers the completion tokens only), "
                         f"not {task!r}; read the file with text_column= (--text-column) for {task!r}")
    if masked:
        limit = max_length if model_max_length is None else min(max_length, model_max_length)
        return _encode_masked(examples, tokenizer, limit, model_max_length, max_length)
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
        _report_truncation(cut, len(examples), limit, model_max_length, max_length)

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


def _report_truncation(cut: int, total: int, limit: int, model_max_length: int | None, max_length: int,
                       stacklevel: int = 3) -> None:
    if model_max_length is not None and model_max_length <= max_length:
        message = f"{cut} of {total} examples were longer than the model's maximum of {model_max_length} tokens"
        warnings.warn(message + " and were truncated", stacklevel=stacklevel)  # at the caller of encode_examples
    else:
        logger.info("%d of %d examples were truncated to max_length=%d tokens", cut, total, limit)


def _encode_masked(examples: TextExamples, tokenizer: Any, limit: int, model_max_length: int | None,
                   max_length: int) -> list[dict[str, torch.Tensor]]:
    """Prompt/completion or chat examples: input ids and labels with -100 where no loss is taken."""
    if examples.messages is not None:
        source = mask_source(tokenizer)
        logger.info("chat examples: assistant tokens from the chat template's %s",
                    "{% generation %} markers" if source == "generation" else "prefix-by-prefix renderings")
        pairs = [encode_chat(tokenizer, conversation, source) for conversation in examples.messages]
        sequences = [(ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask, strict=True)])
                     for ids, mask in pairs]
    else:
        eos = getattr(tokenizer, "eos_token", None)
        completions = [c if not eos or c.endswith(eos) else c + eos for c in examples.completions]
        prompts = tokenizer(examples.texts)["input_ids"]
        wholes = tokenizer([p + c for p, c in zip(examples.texts, completions, strict=True)])["input_ids"]
        sequences = []
        for prompt, whole in zip(prompts, wholes, strict=True):
            start = common_prefix_length(prompt, whole)  # where the completion's tokens begin, as TRL finds it
            sequences.append((list(whole), [IGNORE_INDEX] * start + list(whole[start:])))
    cut = sum(len(ids) > limit for ids, _ in sequences)
    if cut:
        _report_truncation(cut, len(examples), limit, model_max_length, max_length, stacklevel=4)
    with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    features, empty = [], 0
    for ids, labels in sequences:
        ids, labels = torch.tensor(ids[:limit], dtype=torch.long), torch.tensor(labels[:limit], dtype=torch.long)
        empty += not bool((labels[1:] != IGNORE_INDEX).any())  # the first token is never a target
        feature = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if with_types:
            feature["token_type_ids"] = torch.zeros_like(ids)
        features.append({**feature, "labels": labels})
    what = "completion" if examples.completions is not None else "assistant"
    if empty == len(features):
        raise ValueError(f"none of the {len(features)} examples has a {what} token within {limit} tokens, so none "
                         "carries a loss; raise max_length (--max-length) or shorten the prompts")
    if empty:
        warnings.warn(f"{empty} of {len(features)} examples have no {what} token within {limit} tokens: they carry "
                      "no loss and calibration skips them; raise max_length (--max-length)", stacklevel=3)
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
