"""The one training recipe every method gets (only the LoRA ranks differ between methods).

Chosen from the uniform-only pilot on the validation split (see README): full fit split, batch
32, max length 128, AdamW with LoRA and head in their own parameter groups, 6% linear warm-up,
linear decay to 0, gradient clipping at 1, bf16 autocast on CPU (AMX) with float32 master weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import torch
from tasks import TaskData
from torch import nn

from fimlora.data import collate, encode_examples

# Optimiser steps per task: where uniform r=8 clearly learned the task in the pilot (val split).
STEPS = {"sst2": 400, "mrpc": 400, "cola": 1000, "rte": 600}


@dataclass(frozen=True)
class Recipe:
    steps: int
    batch_size: int = 32
    max_length: int = 128
    lora_lr: float = 5e-4
    head_lr: float = 5e-3
    warmup: float = 0.06
    lora_dropout: float = 0.05
    bf16: bool = True
    eval_batch_size: int = 128
    length_group: int = 16  # batches sorted by length together (1: plain random batches)

    def key(self) -> str:
        """A short digest of every setting (part of each result's resume key)."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def encode(examples, tokenizer, data: TaskData, max_length: int) -> list[dict[str, torch.Tensor]]:
    return encode_examples(examples, tokenizer, task="seq-cls", max_length=max_length, label_names=data.label_names)


def to_bf16_base(model: nn.Module) -> nn.Module:
    """Frozen weights in bf16 (cast once, not at every matmul); trainable ones stay float32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return model


def load_classifier(model_dir: str, num_labels: int, seed: int) -> nn.Module:
    """The pretrained encoder with a fresh head drawn from ``seed`` (the same head for every method)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report, once per run
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)


def batch_order(lengths: list[int], steps: int, batch_size: int, seed: int, group: int) -> list[list[int]]:
    """Epochs of seeded permutations, grouped by length as transformers' ``group_by_length`` does.

    Each run of ``group`` batches is sorted by length before it is cut into batches, and the
    batches are then shuffled, so that a batch pads to similar lengths (less wasted compute).
    The order depends on the seed only, never on the method."""
    gen = torch.Generator().manual_seed(50_000 + seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(lengths), generator=gen).tolist()
    order = order[:steps * batch_size]
    batches = []
    span = group * batch_size
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


def _autocast(recipe: Recipe):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16)


def train(model: nn.Module, features: list[dict], recipe: Recipe, seed: int, pad_token_id: int,
          *, steps: int | None = None, head_only: bool = False) -> list[float]:
    """Train the model's trainable parameters in place; returns the loss per step.

    ``head_only`` trains the non-LoRA trainable parameters alone (fim-warm's warm-up)."""
    steps = recipe.steps if steps is None else steps
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lora = [p for n, p in named if "lora_" in n]
    head = [p for n, p in named if "lora_" not in n]
    groups = [{"params": head, "lr": recipe.head_lr}] + ([] if head_only else [{"params": lora, "lr": recipe.lora_lr}])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, round(recipe.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    params = [p for group in groups for p in group["params"]]
    losses = []
    model.train()
    lengths = [f["input_ids"].numel() for f in features]
    for idx in batch_order(lengths, steps, recipe.batch_size, seed, recipe.length_group):
        batch = collate([features[i] for i in idx], pad_token_id=pad_token_id)
        with _autocast(recipe):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def predict(model: nn.Module, features: list[dict], recipe: Recipe, pad_token_id: int) -> list[int]:
    """Class ids in input order; rows are length-sorted into batches so that padding is small."""
    model.eval()
    order = sorted(range(len(features)), key=lambda i: features[i]["input_ids"].numel())
    out = [0] * len(features)
    for start in range(0, len(order), recipe.eval_batch_size):
        idx = order[start:start + recipe.eval_batch_size]
        batch = collate([features[i] for i in idx], pad_token_id=pad_token_id)
        batch.pop("labels")
        with _autocast(recipe):
            logits = model(**batch).logits
        for i, v in zip(idx, logits.float().argmax(-1).tolist(), strict=True):
            out[i] = v
    return out


class Timer:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 2)
