"""One cell of the quality study: (task, method, seed[, variant]) -> fine-tune, select, score.

The same optimiser, schedule, steps, batch order, head initialisation and LoRA-A seed for every
method. Selection (which checkpoint to report) uses only the held-out slice of train; the dev file
is evaluated once, on the selected checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from _quality_methods import (
    FimSettings,
    adalora_final_ranks,
    budget_total,
    build,
    lora_parameter_counts,
    lora_params_of,
    rank_summary,
    target_shapes,
)
from _quality_tasks import Examples, TaskData, encode_labels, score_predictions
from torch import nn

from fimlora.data import collate, make_batches


@dataclass(frozen=True)
class TrainConfig:
    """The sizes that make the study fit the machine (recorded in every row)."""

    max_length: int = 64
    batch_size: int = 16
    steps: int = 40
    lr: float = 2e-3
    warmup: float = 0.1
    # Fractions of training where the held-out slice is scored; the best is reported. One point
    # (the end) by default: on this machine every evaluation costs as much as several steps.
    checkpoints: tuple[float, ...] = (1.0,)
    eval_batch_size: int = 64

    def checkpoint_steps(self) -> list[int]:
        return sorted({max(1, round(f * self.steps)) for f in self.checkpoints})


def encode(examples: Examples, tokenizer, data: TaskData, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Token ids (+ segment ids for pairs) and a scalar label per example."""
    enc = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)
    labels = encode_labels(examples.labels, data.spec, data.vocabulary)
    dtype = torch.float32 if data.spec.regression else torch.long
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: torch.tensor(enc[k][i]) for k in keys}, "labels": torch.tensor(labels[i], dtype=dtype)}
            for i in range(len(examples))]


def load_classifier(model_dir: str, data: TaskData, seed: int) -> nn.Module:
    """The pretrained encoder with a fresh head drawn from ``seed`` (same head for every method)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report, once per cell
    torch.manual_seed(seed)
    if data.spec.regression:
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, problem_type="regression")
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(data.vocabulary))


@torch.no_grad()
def predict(model: nn.Module, features: list[dict], *, batch_size: int, pad_token_id: int, regression: bool) -> list:
    """Predictions in input order; rows are length-sorted into batches so padding is small."""
    model.eval()
    order = sorted(range(len(features)), key=lambda i: features[i]["input_ids"].numel())
    out: list = [None] * len(features)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([features[i] for i in idx], pad_token_id=pad_token_id)
        batch.pop("labels")
        logits = model(**batch).logits
        values = logits.squeeze(-1).tolist() if regression else logits.argmax(-1).tolist()
        for i, v in zip(idx, values, strict=True):
            out[i] = v
    return out


def evaluate(model: nn.Module, features: list[dict], data: TaskData, cfg: TrainConfig, pad_token_id: int) -> dict:
    pred = predict(model, features, batch_size=cfg.eval_batch_size, pad_token_id=pad_token_id,
                   regression=data.spec.regression)
    gold = [f["labels"].item() for f in features]
    positive = 0 if data.vocabulary is None else len(data.vocabulary) - 1
    return score_predictions(data.spec, pred, gold, positive)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_cell(*, data: TaskData, features: dict[str, list[dict]], model_dir: str, method: str, seed: int,
             cfg: TrainConfig, fim: FimSettings | None = None, pad_token_id: int = 0) -> dict:
    """Train one adapter and return its CSV row (metrics on dev, selection trace, budget, times)."""
    started = time.perf_counter()
    fim = fim or FimSettings()
    train = features["train"]
    model = load_classifier(model_dir, data, seed)
    shapes = target_shapes(model)
    total = budget_total(model)
    # Calibration batches: a seeded draw from the training subsample (what a user would calibrate on).
    calib = make_batches(train, batch_size=cfg.batch_size, pad_token_id=pad_token_id, shuffle=True,
                         seed=seed, num_batches=fim.num_batches)
    checkpoints = cfg.checkpoint_steps()
    built = build(method, model, calib, seed=seed, total_steps=cfg.steps, first_checkpoint=checkpoints[0], fim=fim)
    prep_seconds = time.perf_counter() - started
    model = built.model
    lora_trainable, head_trainable = lora_parameter_counts(model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = max(1, round(cfg.warmup * cfg.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm))))
    # The data order depends on the seed only (not on the method): epochs of seeded permutations.
    gen = torch.Generator().manual_seed(50_000 + seed)
    order: list[int] = []
    while len(order) < cfg.steps * cfg.batch_size:
        order += torch.randperm(len(train), generator=gen).tolist()

    is_adalora = bool(built.extra.get("adalora"))
    best: tuple[float, int, dict] | None = None
    trace = []
    model.train()
    for step in range(cfg.steps):
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = collate([train[i] for i in idx], pad_token_id=pad_token_id)
        loss = model(**batch).loss  # includes AdaLoRA's orthogonality term
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if is_adalora:
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        if step + 1 in checkpoints:
            held = evaluate(model, features["heldout"], data, cfg, pad_token_id)["score"]
            trace.append(f"{step + 1}:{held:.4f}")
            if best is None or held > best[0]:  # ties keep the earlier checkpoint
                best = (held, step + 1, _trainable_state(model))
            model.train()
    assert best is not None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in best[2]:
                p.copy_(best[2][name])
    dev = evaluate(model, features["dev"], data, cfg, pad_token_id)

    ranks = adalora_final_ranks(model) if is_adalora else built.ranks
    return {
        "task": data.spec.name, "method": method, "seed": seed,
        "score": dev["score"], "accuracy": dev.get("accuracy", ""), "f1": dev.get("f1", ""),
        "mcc": dev.get("mcc", ""), "pearson": dev.get("pearson", ""), "spearman": dev.get("spearman", ""),
        "heldout_best": best[0], "best_step": best[1], "heldout_trace": " ".join(trace),
        "budget_params": total,
        "lora_params": lora_params_of(ranks, shapes, adalora=is_adalora),  # final (AdaLoRA: after pruning)
        "lora_trainable": lora_trainable,  # trainable during training (AdaLoRA: init_r = 12)
        "head_params": head_trainable,
        "ranks_min_mean_max": rank_summary(ranks),
        "ranks": " ".join(str(ranks.get(n, 0)) for n in shapes),
        "calib_seconds": built.extra.get("calib_seconds", ""),
        "prep_seconds": round(prep_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
