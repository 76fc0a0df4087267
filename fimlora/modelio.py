"""Loading a local transformers model and tokenizer for the CLI (offline, no hub access)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .choices import QUANTIZATIONS
from .data import TextExamples, label_ids

logger = logging.getLogger("fimlora")


def _task_from_architectures(architectures: list[str]) -> str:
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    # sequence classifiers and bare encoders (a new classification head is added)
    return "seq-cls"


def head_settings(labels: list, config=None) -> tuple[dict, list | None]:
    """(the head's from_pretrained settings, the label names to encode with) for these raw labels.

    Floats: a regression (num_labels 1, problem_type "regression"). Strings: one class per name, in
    sorted order, unless ``config`` (a classifier checkpoint's) already names them all; the label map
    goes into the model's config. Ints: class ids, num_labels = the largest + 1. A classifier
    checkpoint keeps its own num_labels."""
    ids = label_ids(labels, None)
    if isinstance(ids[0], float):
        return {"num_labels": 1, "problem_type": "regression"}, None
    single = {"problem_type": "single_label_classification"}
    known = getattr(config, "label2id", None) or {}
    if all(isinstance(label, str) for label in labels):
        names = sorted(set(labels))
        if config is not None and set(names) <= set(known) and not set(known) <= {f"LABEL_{i}" for i in range(len(known))}:
            names = [name for name, _ in sorted(known.items(), key=lambda item: item[1])]
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {name: i for i, name in enumerate(names)}, **single}, names
    if config is not None:
        return {"num_labels": config.num_labels, **single}, None
    return {"num_labels": max(ids) + 1, **single}, None


def _num_labels(examples: TextExamples) -> int:
    """Classes the head needs for the ids that encoding will give these labels (1: regression)."""
    return head_settings(examples.labels)[0]["num_labels"]


def resolve_task(model_dir: str, task: str) -> tuple[str, object]:
    """(task, config) from a local model directory's config alone, before data or weights are read."""
    from transformers import AutoConfig

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model {model_dir} is not a directory; give a local transformers model directory")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if task == "auto":
        task = "seq2seq-lm" if getattr(config, "is_encoder_decoder", False) else _task_from_architectures(
            list(getattr(config, "architectures", None) or []))
        logger.info("task: %s (from the model's architecture)", task)
    return task, config


def is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def check_quantization(quantize: str | None) -> None:
    """Fail fast, before data or weights are read, on a quantization this install cannot do."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize {quantize} is not known; choose one of {', '.join(QUANTIZATIONS)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes") from error


def quantization_config(quantize: str | None, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for ``quantize`` (None: no quantization)."""
    check_quantization(quantize)
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=dtype)


def load_model_and_tokenizer(model_dir: str, *, task: str, examples: TextExamples, dtype: torch.dtype, device: str,
                             seed: int, quantize: str | None = None, head: dict | None = None):
    """(model, tokenizer, task) from a local directory. A classification head that the checkpoint
    lacks is initialised from ``seed``, as fine-tuning would, with ``head``'s settings (num_labels,
    label map, problem_type: ``head_settings``; by default from the examples' labels). With
    ``quantize`` the base linears are loaded as bitsandbytes 4-bit (nf4/fp4) or 8-bit layers straight
    onto ``device`` (QLoRA's base model); fimlora calibrates them as they are."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    task, config = resolve_task(model_dir, task)
    if task == "seq2seq-lm" and examples.labels is None:  # before any weight is read
        raise ValueError(f"--model {model_dir} is an encoder-decoder (seq2seq) model: name the data's target text "
                         "column with --target-column")
    kwargs = {"local_files_only": True, "dtype": dtype}
    quantization = quantization_config(quantize, dtype)
    if quantization is not None:  # quantized weights are placed by the loader and cannot be moved after
        kwargs.update(quantization_config=quantization, device_map=device)
    torch.manual_seed(seed)
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    elif task == "seq2seq-lm":
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, **kwargs)
    else:
        if head is None:
            head, _ = head_settings(examples.labels, config if is_classifier(config) else None)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, **head, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantization is None:
        model = model.to(device)
    return model.eval(), tokenizer, task
