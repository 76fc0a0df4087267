"""The rank maps the study compares, all at the parameter count of uniform LoRA at ``base_rank``.

Every method is a function of calibration score maps (one score per layer) and returns ranks;
the adapter is then built by fimlora's own ``apply_plan``. Methods:

- uniform: ``base_rank`` everywhere.
- fim-variance: the library's default (``calibrate`` + ``make_plan``, clamps [r/2, 2r]).
- fim-shuffled: fim-variance's ranks permuted among layers of the same module type (same
  histogram, same cost): does the placement matter?
- prior: scores predicted from block depth and module type alone, fitted on the *other* tasks'
  maps (log score = block effect + type effect): is the per-task signal more than a prior?
- fim-transfer: the map calibrated on another task (sst2 <- mrpc <- cola <- sst2).
- fim-warm: calibration after a head-only warm-up of a copy of the model, so that the gradients
  carry the task rather than a random head (training still starts from the fresh head).
- scoring variants on the validation split: per-cost, total, log, T=0.5 with clamps [r/4, 4r].
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fimlora import AllocationConfig, Budget, LayerPlan, RankPlan, allocate, apply_plan, plan_model
from fimlora.data import make_batches
from fimlora.plan import split_block_and_type
from fimlora.targets import find_targets, layer_shape, plan_name

# LoRA on every BERT linear of the encoder: q, k, v, attention output, MLP up, MLP down.
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
CALIB_BATCHES = 8
WARMUP_STEPS = 50
TRANSFER_DONOR = {"sst2": "mrpc", "mrpc": "cola", "cola": "sst2", "rte": "mrpc"}
CORE = ("uniform", "fim-variance", "fim-shuffled", "prior", "fim-warm")
SCORING = ("fim-variance", "fim-percost", "fim-total", "fim-log", "fim-t0.5wide")
METHODS = (*CORE, "fim-transfer", *SCORING[1:])


@dataclass(frozen=True)
class StudyBudget:
    """One budget of the study: uniform ``rank`` and the clamps FIM may use."""

    name: str
    rank: int
    r_min: int
    r_max: int


BUDGETS = {"r8": StudyBudget("r8", 8, 4, 16), "r2": StudyBudget("r2", 2, 0, 4)}


def target_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {plan_name(name): layer_shape(module) for name, module in find_targets(model, TARGETS).items()}


def lora_params(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items())


def allocate_map(scores: dict[str, float], shapes: dict[str, tuple[int, int]], budget: StudyBudget, *,
                 temperature: float = 1.0, r_min: int | None = None, r_max: int | None = None) -> dict[str, int]:
    """fimlora's allocator at the budget of uniform ``budget.rank`` (parameters)."""
    names = list(shapes)
    total, costs = Budget.mean_rank(budget.rank).resolve([shapes[n] for n in names])
    ranks = allocate([scores[n] for n in names], total, costs=costs, temperature=temperature,
                     r_min=budget.r_min if r_min is None else r_min, r_max=budget.r_max if r_max is None else r_max)
    return dict(zip(names, ranks, strict=True))


def build_model(model: nn.Module, ranks: dict[str, int], shapes: dict[str, tuple[int, int]], budget: StudyBudget,
                seed: int, lora_dropout: float) -> nn.Module:
    """The PEFT model of a rank map (alpha/r = 2 in every layer), LoRA-A drawn from ``seed``."""
    from peft import LoraConfig

    alpha = 2.0 * budget.rank
    layers = [LayerPlan(name=n, d_in=shapes[n][0], d_out=shapes[n][1], rank=r, alpha=alpha * r / budget.rank, score=0.0)
              for n, r in ranks.items()]
    allocation = AllocationConfig(budget=Budget.mean_rank(budget.rank), r_min=budget.r_min, r_max=budget.r_max,
                                  alpha_policy="fixed_scale")
    total, _ = allocation.budget.resolve(list(shapes.values()))
    plan = RankPlan(layers=layers, allocation=allocation, budget_total=int(total), base_rank=budget.rank,
                    base_alpha=alpha, calibration={}, versions={})
    config = LoraConfig(r=budget.rank, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=list(TARGETS),
                        task_type="SEQ_CLS", modules_to_save=["classifier"])
    torch.manual_seed(seed)
    return apply_plan(model, plan, config)


# ---- calibration maps ---------------------------------------------------------------------------

def calibration_plan(model: nn.Module, features: list[dict], *, seed: int, pad_token_id: int, batch_size: int,
                     allocation: AllocationConfig, num_batches: int | str = CALIB_BATCHES,
                     max_batches: int = 64) -> RankPlan:
    """The study's calibration (seeded batches of the fit split, fresh head) through the library's
    one orchestrator, ``fimlora.plan_model``; ``num_batches="auto"`` reads at most ``max_batches``."""
    from peft import LoraConfig

    batches = make_batches(features, batch_size=batch_size, pad_token_id=pad_token_id, shuffle=True, seed=seed,
                           num_batches=max_batches if num_batches == "auto" else num_batches)
    return plan_model(model, batches, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)),
                      allocation=allocation, task="seq-cls", num_batches=num_batches, max_batches=max_batches,
                      seed=seed, progress=False)


def calibration_scores(model: nn.Module, features: list[dict], *, seed: int, pad_token_id: int,
                       batch_size: int) -> dict[str, float]:
    """Per-element mean variance of the LoRA-B gradient per layer (the library's default score)."""
    # The study allocates every method itself (allocate_map), so the plan's own uncertainty policy
    # must not replace the scores' ranks: only the scores are read here.
    plan = calibration_plan(model, features, seed=seed, pad_token_id=pad_token_id, batch_size=batch_size,
                            allocation=AllocationConfig(if_uncertain="allocate"))
    return {layer.name: layer.score for layer in plan.layers}


def warmed_scores(model: nn.Module, features: list[dict], *, seed: int, pad_token_id: int,
                  head_warmup: Callable[[nn.Module], None], batch_size: int) -> dict[str, float]:
    """Calibrate a copy of the model whose head was trained alone first; ``model`` is untouched."""
    warm = copy.deepcopy(model)
    for name, p in warm.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    head_warmup(warm)
    return calibration_scores(warm, features, seed=seed, pad_token_id=pad_token_id, batch_size=batch_size)


def prior_scores(other_maps: list[dict[str, float]], names: list[str]) -> dict[str, float]:
    """exp(block effect + type effect), least squares on the log scores of other tasks' maps."""
    blocks = sorted({split_block_and_type(n)[0] for m in other_maps for n in m})
    kinds = sorted({split_block_and_type(n)[1] for m in other_maps for n in m})
    def row(name: str) -> list[float]:
        block, kind = split_block_and_type(name)
        return [1.0] + [float(block == b) for b in blocks[1:]] + [float(kind == k) for k in kinds[1:]]
    x = np.array([row(n) for m in other_maps for n in m])
    y = np.array([math.log(max(v, 1e-300)) for m in other_maps for v in m.values()])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {n: float(math.exp(np.array(row(n)) @ coef)) for n in names}


def shuffled_within_type(ranks: dict[str, int], seed: int) -> dict[str, int]:
    """The same ranks, permuted among the layers of each module type (seeded)."""
    rng = random.Random(20_000 + seed)
    out = dict(ranks)
    by_kind: dict[str, list[str]] = {}
    for name in ranks:
        by_kind.setdefault(split_block_and_type(name)[1], []).append(name)
    for names in by_kind.values():
        values = [ranks[n] for n in names]
        rng.shuffle(values)
        out.update(zip(names, values, strict=True))
    return out


def variant_ranks(method: str, scores: dict[str, float], shapes: dict[str, tuple[int, int]],
                  budget: StudyBudget) -> dict[str, int]:
    """The scoring variants: other functions of the same calibration statistics."""
    if method == "fim-variance":
        return allocate_map(scores, shapes, budget)
    if method == "fim-percost":  # summed variance over B (d_out x r) per parameter of the layer
        return allocate_map({n: v * shapes[n][1] / sum(shapes[n]) for n, v in scores.items()}, shapes, budget)
    if method == "fim-total":
        return allocate_map({n: v * shapes[n][1] for n, v in scores.items()}, shapes, budget)
    if method == "fim-log":  # log-compressed: the smallest score maps to 1
        low = min(v for v in scores.values() if v > 0)
        return allocate_map({n: 1.0 + math.log(max(v, low) / low) for n, v in scores.items()}, shapes, budget)
    if method == "fim-t0.5wide":
        return allocate_map(scores, shapes, budget, temperature=0.5, r_min=budget.rank // 4, r_max=4 * budget.rank)
    raise ValueError(f"unknown scoring variant {method!r}")
