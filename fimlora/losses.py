"""Per-sample losses, so that each sample's gradient is its own (DESIGN §2).

Each function returns (losses, valid): losses of shape (N,) whose sum is back-propagated, and
a boolean mask of samples that carry a loss at all (a causal-LM row whose labels are all -100
has no loss and is not counted as a sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TASKS = ("causal-lm", "seq-cls")
IGNORE_INDEX = -100


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def causal_lm_losses(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted next-token cross-entropy, averaged over each sample's own labelled tokens.

    A target predicted from a padding position (the first real token of a left-padded row) is
    not part of the sample, so it is ignored: left and right padding give the same loss.
    """
    shifted_logits = _at_least_float32(logits[:, :-1])
    shifted_labels = labels[:, 1:]
    if attention_mask is not None:
        shifted_labels = shifted_labels.masked_fill(attention_mask[:, :-1] == 0, IGNORE_INDEX)
    token_loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    counted = (shifted_labels != IGNORE_INDEX).sum(dim=1)
    losses = token_loss.sum(dim=1) / counted.clamp(min=1)
    return losses, counted > 0


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
    """causal-lm or seq-cls from the model class (looking through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(base).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "causal-lm"
    if cls.endswith("ForSequenceClassification"):
        return "seq-cls"
    raise ValueError(
        f"cannot tell the task of a {cls}; pass task='causal-lm' or task='seq-cls', "
        "or loss_fn=(model, batch) -> per-sample losses of shape (N,)"
    )


def model_losses(model, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model on ``batch`` (without letting it reduce the loss) and return per-sample losses."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch.get("labels")
    if task == "causal-lm":
        if labels is None:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return causal_lm_losses(logits, labels, batch["attention_mask"])
    if labels is None:
        raise ValueError("seq-cls calibration needs a 'labels' entry in every batch")
    config = getattr(model, "config", None)
    return seq_cls_losses(logits, labels, getattr(config, "problem_type", None))
