"""The user-level path: calibration statistics -> rank plan -> ready PEFT model."""

from __future__ import annotations

import platform
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .adapter import apply_plan, layer_alpha
from .allocate import Budget, allocate
from .calibrate import CalibrationResult, calibrate
from .data import make_batches
from .plan import LayerPlan, RankPlan
from .targets import find_targets, layer_shape


def installed_version(package: str) -> str:
    import importlib.metadata as metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **{package: installed_version(package) for package in ("fimlora", "torch", "transformers", "peft")}}


def _allocation_defaults(base_rank, budget, r_min, r_max):
    if not isinstance(base_rank, int) or base_rank < 1:
        raise ValueError(f"base_rank must be a positive integer, got {base_rank!r}")
    budget = budget or Budget.mean_rank(base_rank)
    r_min = base_rank // 2 if r_min is None else r_min
    r_max = 2 * base_rank if r_max is None else r_max
    return budget, r_min, r_max


def check_allocation(
    shapes: Sequence[tuple[int, int]], *, base_rank: int = 8, budget: Budget | None = None,
    r_min: int | None = None, r_max: int | None = None, multiple_of: int = 1, temperature: float = 1.0,
) -> None:
    """Raise now, before any calibration work, if these allocation settings cannot succeed."""
    budget, r_min, r_max = _allocation_defaults(base_rank, budget, r_min, r_max)
    total, costs = budget.resolve(shapes)
    allocate([1.0] * len(costs), total, costs=costs, r_min=r_min, r_max=r_max,
             multiple_of=multiple_of, temperature=temperature)


def _warn_if_scores_cannot_rank(scores: Mapping[str, float], score: str, samples: int | None) -> None:
    """Equal scores (a variance over fewer than 2 samples is 0 everywhere) give uniform ranks:
    say so instead of passing a uniform adapter off as an allocation."""
    values = list(scores.values())
    if len(values) < 2 or max(values) != min(values):
        return
    hint = ""
    if score == "variance" and samples is not None and samples < 2:
        hint = f"; a variance needs at least 2 samples and this calibration saw {samples}"
    warnings.warn(f"every layer has the same {score} score ({values[0]:.3g}), so the ranks are uniform{hint}",
                  stacklevel=3)


def make_plan(
    result: CalibrationResult,
    *,
    base_rank: int = 8,
    base_alpha: float | None = None,
    budget: Budget | None = None,
    r_min: int | None = None,
    r_max: int | None = None,
    multiple_of: int = 1,
    temperature: float = 1.0,
    score: str | None = None,
    alpha_policy: str = "fixed_scale",
    model_name: str | None = None,
) -> RankPlan:
    """Split a budget across the calibrated layers in proportion to their scores.

    Defaults (DESIGN §6): the budget is the parameter count of uniform rank ``base_rank`` over
    the same layers, r_min = base_rank // 2, r_max = 2 * base_rank, alpha kept at scale
    base_alpha / base_rank in every layer.
    """
    budget, r_min, r_max = _allocation_defaults(base_rank, budget, r_min, r_max)
    base_alpha = float(base_rank if base_alpha is None else base_alpha)
    score = score or result.settings.get("score", "variance")
    layer_alpha(alpha_policy, base_alpha, base_rank, base_rank)  # rejects an unknown policy now

    names = list(result.stats)
    shapes = [result.shapes[name] for name in names]
    scores = result.scores(score)
    _warn_if_scores_cannot_rank(scores, score, result.settings.get("samples"))
    total, costs = budget.resolve(shapes)
    ranks = allocate(
        [scores[name] for name in names], total, costs=costs, r_min=r_min, r_max=r_max,
        multiple_of=multiple_of, temperature=temperature,
    )
    layers = [
        LayerPlan(
            name=name, d_in=d_in, d_out=d_out, rank=rank,
            alpha=layer_alpha(alpha_policy, base_alpha, base_rank, rank),
            score=scores[name], stats=result.stats[name].summary(),
        )
        for name, (d_in, d_out), rank in zip(names, shapes, ranks, strict=True)
    ]
    calibration = {
        **result.settings, "score": score, "r_min": r_min, "r_max": r_max,
        "multiple_of": multiple_of, "temperature": temperature,
    }
    if model_name:
        calibration["model"] = model_name
    return RankPlan(
        layers=layers,
        budget={**budget.to_dict(), "total": int(total)},
        base_rank=base_rank, base_alpha=base_alpha, alpha_policy=alpha_policy,
        calibration=calibration, versions=library_versions(),
    )


def _targets_of(lora_config, model: nn.Module) -> str | Sequence[str]:
    """The layers a LoraConfig would adapt, in the calibrator's terms (PEFT semantics)."""
    targets = lora_config.target_modules
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValueError(f"lora_config.target_modules is None and PEFT has no default for {model_type!r}; set it")
        return list(defaults[model_type])
    if isinstance(targets, str):
        return targets  # "all-linear" or a regex, as in PEFT
    return sorted(targets)


def as_batches(data, *, batch_size: int, num_batches: int, pad_token_id: int):
    """Batches from ``data``: a DataLoader or iterable of batch dicts is used as it is; a dataset of
    tokenised examples (a ``datasets.Dataset`` or a list of dicts with 1-D ``input_ids``) is padded
    into batches of ``batch_size``."""
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) or len(data) == 0:
        return data
    first = data[0]
    if not isinstance(first, Mapping) or torch.as_tensor(first["input_ids"]).dim() != 1:
        return data  # already a sequence of batches
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "labels") if k in first]
    count = min(len(data), batch_size * num_batches)
    rows = (data[i] for i in range(count))  # a datasets row is decoded once, not once per key
    features = [{k: torch.as_tensor(row[k]) for k in keys} for row in rows]
    for feature in features:
        feature.setdefault("attention_mask", torch.ones_like(feature["input_ids"]))
    return make_batches(features, batch_size=batch_size, pad_token_id=pad_token_id)


def get_peft_model(
    model: nn.Module,
    data: Iterable[Mapping],
    lora_config=None,
    *,
    budget: Budget | None = None,
    r_min: int | None = None,
    r_max: int | None = None,
    multiple_of: int = 1,
    temperature: float = 1.0,
    alpha_policy: str = "fixed_scale",
    batch_size: int = 8,
    **calibrate_kwargs,
):
    """Calibrate ``model`` on ``data``, allocate ranks, and return the ready ``PeftModel``.

    A drop-in for ``peft.get_peft_model(model, lora_config)`` for Trainer/TRL users: the base
    ``lora_config`` gives the uniform rank whose parameter count is the budget, alpha, the target
    modules and everything else (dropout, task type, ...). The plan is kept on the returned
    model as ``peft_model.fimlora_plan``. ``data`` is a DataLoader or any iterable of dict
    batches, or a dataset of tokenised examples (padded here into batches of ``batch_size``).
    """
    from peft import LoraConfig

    lora_config = lora_config or LoraConfig()
    targets = _targets_of(lora_config, model)
    shapes = [layer_shape(module) for module in find_targets(model, targets).values()]
    check_allocation(shapes, base_rank=lora_config.r, budget=budget, r_min=r_min, r_max=r_max,
                     multiple_of=multiple_of, temperature=temperature)
    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    batches = as_batches(data, batch_size=batch_size, num_batches=calibrate_kwargs.get("num_batches", 8),
                         pad_token_id=pad_token_id)
    result = calibrate(model, batches, targets=targets, **calibrate_kwargs)
    plan = make_plan(
        result, base_rank=lora_config.r, base_alpha=lora_config.lora_alpha, budget=budget, r_min=r_min,
        r_max=r_max, multiple_of=multiple_of, temperature=temperature, alpha_policy=alpha_policy,
        model_name=getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
    )
    peft_model = apply_plan(model, plan, lora_config)
    peft_model.fimlora_plan = plan
    return peft_model
