"""Loading a local transformers model and tokenizer for the CLI (offline, no hub access)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .data import TextExamples

logger = logging.getLogger("fimlora")


def _task_from_architectures(architectures: list[str]) -> str:
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    # sequence classifiers and bare encoders (a new classification head is added)
    return "seq-cls"


def _num_labels(examples: TextExamples) -> int:
    if examples.labels is None:
        raise ValueError("a sequence-classification calibration needs labels; pass --label-column (or --task causal-lm)")
    if all(isinstance(label, float) for label in examples.labels):
        return 1  # regression
    return len(set(examples.labels))


def load_model_and_tokenizer(model_dir: str, *, task: str, examples: TextExamples, dtype: torch.dtype, device: str, seed: int):
    """(model, tokenizer, task) from a local directory. A classification head that the checkpoint
    lacks is initialised from ``seed``, as fine-tuning would."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model {model_dir} is not a directory; give a local transformers model directory")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if task == "auto":
        task = _task_from_architectures(list(getattr(config, "architectures", None) or []))
        logger.info("task: %s (from the model's architecture)", task)
    kwargs = {"local_files_only": True, "dtype": dtype}
    torch.manual_seed(seed)
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    else:
        is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        num_labels = config.num_labels if is_classifier else _num_labels(examples)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer, task
