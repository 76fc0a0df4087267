"""The one path through the library, used by ``fimlora.get_peft_model`` and the command line:

    model + data + AllocationConfig + base LoraConfig
      -> every setting checked against the target layers (no work done yet)
      -> calibration statistics -> rank plan -> PEFT model, or adapter files on disk
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_directory
from .adapter import apply_plan
from .allocation import AllocationConfig, layer_alpha
from .calibrate import CalibrationResult, calibrate
from .data import make_batches
from .plan import LayerPlan, RankPlan
from .targets import find_targets, layer_shape
from .versions import library_versions

__all__ = ["as_batches", "check_alpha", "get_peft_model", "make_plan", "plan_model", "write_adapter"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "fimlora_plan.json", "rank_map.png")


def check_alpha(alpha: Any, name: str = "lora_alpha") -> float:
    """A LoRA alpha must be a finite number > 0: with alpha 0 the adapter does nothing."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{name}={alpha!r} must be a finite number > 0 (alpha 0 gives an adapter that does "
                         "nothing); the usual choice is the rank or twice it")
    return float(alpha)


def _warn_if_scores_cannot_rank(scores: Mapping[str, float], score: str, samples: int) -> None:
    """Equal scores (a variance over fewer than 2 samples is 0 everywhere) give uniform ranks:
    say so instead of passing a uniform adapter off as an allocation."""
    values = list(scores.values())
    if len(values) < 2 or max(values) != min(values):
        return
    hint = ""
    if score == "variance" and samples < 2:
        hint = f"; a variance needs at least 2 samples and this calibration saw {samples}"
    warnings.warn(f"every layer has the same {score} score ({values[0]:.3g}), so the ranks are uniform{hint}",
                  stacklevel=3)


def make_plan(
    result: CalibrationResult,
    allocation: AllocationConfig | None = None,
    *,
    base_rank: int = 8,
    base_alpha: float | None = None,
    model_name: str | None = None,
    record: Mapping[str, Any] | None = None,
) -> RankPlan:
    """Split a budget across the calibrated layers in proportion to their scores.

    ``allocation``'s defaults (DESIGN §6) come from ``base_rank``: the budget is the parameter count
    of uniform rank ``base_rank`` over the same layers, r_min = base_rank // 2, r_max = 2 * base_rank,
    alpha kept at scale base_alpha / base_rank in every layer. ``record`` (e.g. the data's name) is
    added to the plan's calibration record.
    """
    allocation = (allocation or AllocationConfig()).resolved(base_rank)
    base_alpha = check_alpha(base_rank if base_alpha is None else base_alpha, "base_alpha")
    names = list(result.stats)
    shapes = [result.shapes[name] for name in names]
    scores = result.scores(allocation.score)
    _warn_if_scores_cannot_rank(scores, allocation.score, result.settings.samples)
    ranks, total = allocation.allocate([scores[name] for name in names], shapes)
    layers = [
        LayerPlan(
            name=name, d_in=d_in, d_out=d_out, rank=rank,
            alpha=layer_alpha(allocation.alpha_policy, base_alpha, base_rank, rank),
            score=scores[name], stats=result.stats[name].summary(),
        )
        for name, (d_in, d_out), rank in zip(names, shapes, ranks, strict=True)
    ]
    calibration = {**result.settings.to_dict(), **({"model": model_name} if model_name else {}), **(record or {})}
    return RankPlan(layers=layers, allocation=allocation, budget_total=int(total), base_rank=base_rank,
                    base_alpha=base_alpha, calibration=calibration, versions=library_versions())


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


def plan_model(
    model: nn.Module,
    data: Iterable[Mapping],
    lora_config=None,
    *,
    allocation: AllocationConfig | None = None,
    batch_size: int = 8,
    record: Mapping[str, Any] | None = None,
    **calibrate_kwargs,
) -> RankPlan:
    """Calibrate ``model`` on ``data`` and allocate ranks: the plan for ``lora_config``'s targets.

    Everything that can be checked without calibrating is checked first: the allocation settings
    (``allocation``, defaults from ``lora_config.r``) against the target layers' shapes, alpha, and
    ``lora_config.use_rslora`` against the alpha policy. ``calibrate_kwargs`` go to
    :func:`fimlora.calibrate` (num_batches, rank, seed, backend, ...).
    """
    from peft import LoraConfig

    misplaced = sorted(set(calibrate_kwargs) & {f.name for f in AllocationConfig.__dataclass_fields__.values()})
    if misplaced:
        raise TypeError(f"{', '.join(misplaced)} belong(s) to the allocation: pass allocation=AllocationConfig("
                        f"{misplaced[0]}=...)")
    lora_config = lora_config or LoraConfig()
    allocation = (allocation or AllocationConfig()).resolved(lora_config.r, use_rslora=bool(lora_config.use_rslora))
    check_alpha(lora_config.lora_alpha)
    targets = _targets_of(lora_config, model)
    allocation.check([layer_shape(module) for module in find_targets(model, targets).values()])
    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    batches = as_batches(data, batch_size=batch_size, num_batches=calibrate_kwargs.get("num_batches", 8),
                         pad_token_id=pad_token_id)
    result = calibrate(model, batches, targets=targets, **calibrate_kwargs)
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    return make_plan(result, allocation, base_rank=lora_config.r, base_alpha=lora_config.lora_alpha,
                     model_name=model_name, record=record)


def get_peft_model(model: nn.Module, data: Iterable[Mapping], lora_config=None, *,
                   allocation: AllocationConfig | None = None, batch_size: int = 8, **calibrate_kwargs):
    """Calibrate ``model`` on ``data``, allocate ranks, and return the ready ``PeftModel``.

    A drop-in for ``peft.get_peft_model(model, lora_config)`` for Trainer/TRL users: the base
    ``lora_config`` gives the uniform rank whose parameter count is the budget, alpha, the target
    modules and everything else (dropout, task type, ``use_rslora`` ...); ``allocation`` changes
    the budget, clamps, rounding, temperature, alpha policy or score. The plan is kept on the
    returned model as ``peft_model.fimlora_plan``. ``data`` is a DataLoader or any iterable of dict
    batches, or a dataset of tokenised examples (padded here into batches of ``batch_size``).
    """
    plan = plan_model(model, data, lora_config, allocation=allocation, batch_size=batch_size, **calibrate_kwargs)
    peft_model = apply_plan(model, plan, lora_config)
    peft_model.fimlora_plan = plan
    return peft_model


def write_adapter(model: nn.Module, plan: RankPlan, lora_config, directory: str | Path, *,
                  overwrite: bool = False) -> Path:
    """Write ``ADAPTER_FILES`` (the freshly initialised PEFT adapter of ``plan``, the plan and its
    heatmap) into ``directory``, all at once or nothing."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        apply_plan(model, plan, lora_config).save_pretrained(str(tmp))
        plan.save(tmp / "fimlora_plan.json")
        plan.plot(tmp / "rank_map.png")
    return Path(directory)
