"""What an adapter was built on, so that its artefacts describe themselves: the task, the model
class and the transformers auto class that rebuilds it, the head (for sequence classification:
its modules, ``num_labels``, the label map and ``problem_type``) and where the base model lives.

These go into the plan's calibration record (``describe_model``) and back out of it
(``head_kwargs``), and set what PEFT needs to know (``PEFT_TASK_TYPES``, ``head_modules``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .targets import base_model

__all__ = ["AUTO_CLASSES", "PEFT_TASK_TYPES", "head_kwargs", "describe_model", "head_modules",
           "model_task", "resolved_name_or_path"]

# fimlora task -> PEFT's task_type, and the transformers auto class whose models PEFT then wraps
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq-lm": "SEQ_2_SEQ_LM"}
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
                "seq2seq-lm": "AutoModelForSeq2SeqLM"}
_HEAD_KEYS = ("num_labels", "id2label", "label2id", "problem_type")


def model_task(model: nn.Module) -> str | None:
    """causal-lm, seq-cls or seq2seq-lm from the model's class, or None (a bare encoder, a custom module)."""
    base = base_model(model)
    name = type(base).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "seq-cls"
    if name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) and getattr(base.config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    return None


def head_modules(model: nn.Module, targets: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The top-level modules beside the pretrained body that hold parameters: a sequence
    classifier's head (BERT: classifier; Llama: score; DistilBERT: pre_classifier, classifier),
    which fine-tuning must train. Modules holding a LoRA target (``targets``) are left out: PEFT
    cannot both adapt and fully train one module."""
    base = base_model(model)
    body = getattr(base, "base_model_prefix", None)
    if not body or not hasattr(base, body):
        return []
    return [name for name, child in base.named_children()
            if name != body and any(True for _ in child.parameters())
            and not any(t == name or t.startswith(name + ".") for t in targets)]


def resolved_name_or_path(name_or_path: str | None) -> str | None:
    """An absolute path for a local directory (so an adapter reloads from any working directory);
    anything else (a hub id) unchanged."""
    if name_or_path and os.path.isdir(name_or_path):
        return str(Path(name_or_path).resolve())
    return name_or_path


def _head(config) -> dict[str, Any]:
    return {
        "num_labels": int(config.num_labels),
        "id2label": {str(i): str(label) for i, label in config.id2label.items()},
        "label2id": {str(label): int(i) for label, i in config.label2id.items()},
        "problem_type": config.problem_type or ("regression" if config.num_labels == 1 else "single_label_classification"),
    }


def describe_model(model: nn.Module, task: str | None, targets: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The plan's record of the model: its class, the auto class that rebuilds it for ``task``, the
    base model's (resolved) path, and for seq-cls the head (modules, num_labels, label map, problem_type)."""
    base = base_model(model)
    config = getattr(base, "config", None)
    record: dict[str, Any] = {"model_class": type(base).__name__}
    if task in AUTO_CLASSES:
        record["auto_class"] = AUTO_CLASSES[task]
    path = resolved_name_or_path(getattr(config, "_name_or_path", None) or getattr(base, "name_or_path", None))
    if path:
        record["base_model"] = path
    if task == "seq-cls" and config is not None:
        record["head"] = {"modules": head_modules(base, targets), **_head(config)}
    return record


def head_kwargs(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments that give the base model the head an adapter was
    built with (empty unless it was a sequence classifier): ``num_labels``, ``id2label``,
    ``label2id`` and ``problem_type``."""
    head = calibration.get("head") or {}
    kwargs = {key: head[key] for key in _HEAD_KEYS if key in head}
    if "id2label" in kwargs:
        kwargs["id2label"] = {int(i): label for i, label in kwargs["id2label"].items()}
    return kwargs
