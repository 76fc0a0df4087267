"""Per-sample losses, so that each sample's gradient is its own (DESIGN §2).

Each function returns (losses, valid): losses of shape (N,) whose sum is back-propagated, and
a boolean mask of samples that carry a loss at all (a causal-LM row whose labels are all -100
has no loss and is not counted as a sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .choices import TASKS
from .modelinfo import model_task
from .samples import SampleLayout
from .targets import base_model

__all__ = ["IGNORE_INDEX", "TASKS", "causal_lm_losses", "decoder_inputs", "infer_task", "model_losses",
           "seq2seq_losses", "seq_cls_losses"]

IGNORE_INDEX = -100


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def causal_lm_losses(
    logits: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted next-token cross-entropy, averaged over each sample's own labelled tokens.

    ``sample_index`` (N, L) says which sample each token belongs to (-1: none). A target counts
    for sample s only when it and the token predicting it both belong to s: so the first real
    token of a left-padded row, and the first token of each packed segment (predicted from the
    previous segment), are not targets, and left/right padding and packing all agree.
    """
    shifted_logits = _at_least_float32(logits[:, :-1])
    source, target = sample_index[:, :-1], sample_index[:, 1:]
    counted = (source == target) & (target >= 0) & (labels[:, 1:] != IGNORE_INDEX)
    shifted_labels = labels[:, 1:].masked_fill(~counted, IGNORE_INDEX)
    token_loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    owners = target[counted]
    totals = token_loss.new_zeros(num_samples).index_add(0, owners, token_loss[counted])
    counts = torch.bincount(owners, minlength=num_samples)
    return totals / counts.clamp(min=1), counts > 0


def seq2seq_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each decoder position against its label (no shift: the decoder input is
    the labels shifted right), averaged over each sample's own labelled positions."""
    counted = labels != IGNORE_INDEX
    token_loss = F.cross_entropy(
        _at_least_float32(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    counts = counted.sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts > 0


def decoder_inputs(model, batch: dict) -> dict:
    """The batch with ``decoder_input_ids`` made from its labels (the model's own right shift)
    when it has none: the model then never sees the labels, so it computes no loss of its own."""
    if "labels" not in batch:
        raise ValueError("seq2seq-lm calibration needs a 'labels' entry (the target token ids, -100 for padding)")
    if "decoder_input_ids" in batch:
        return batch
    base = base_model(model)
    prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise ValueError(f"{type(base).__name__} cannot make decoder_input_ids from labels; put them in the batch")
    return {**batch, "decoder_input_ids": prepare(labels=batch["labels"])}


def seq_cls_losses(logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None = None):
    """Cross-entropy per sample; squared error when there is one output (regression)."""
    logits = _at_least_float32(logits)
    n = logits.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=logits.device)
    if problem_type == "regression" or logits.shape[-1] == 1:
        return (logits.view(n, -1) - labels.to(logits.dtype).view(n, -1)).square().mean(dim=1), valid
    if problem_type == "multi_label_classification":
        bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return bce.mean(dim=1), valid
    return F.cross_entropy(logits, labels.long(), reduction="none"), valid


def infer_task(model) -> str:
    """causal-lm, seq-cls or seq2seq-lm from the model class (looking through a PEFT wrapper)."""
    task = model_task(model)
    if task is None:
        raise ValueError(
            f"cannot tell the task of a {type(base_model(model)).__name__}; pass task='causal-lm', 'seq-cls' or "
            "'seq2seq-lm', or loss_fn=(model, batch) -> per-sample losses of shape (N,)"
        )
    return task


def model_losses(model, batch: dict, task: str, layout: SampleLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model on ``batch`` (without letting it reduce the loss) and return per-sample losses."""
    if task != "causal-lm" and layout.packed:
        raise ValueError("packed rows (several samples in one row) are supported for causal-lm only")
    if task == "seq-cls" and "labels" not in batch:
        raise ValueError("seq-cls calibration needs a 'labels' entry in every batch")
    if task == "seq2seq-lm":
        batch = decoder_inputs(model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch.get("labels")
    if task == "seq2seq-lm":
        return seq2seq_losses(logits, labels)
    if task == "causal-lm":
        if labels is None:
            labels = batch["input_ids"]
        return causal_lm_losses(logits, labels, layout.index, layout.num_samples)
    config = getattr(model, "config", None)
    return seq_cls_losses(logits, labels, getattr(config, "problem_type", None))
