"""The one path through the library, used by ``fimlora.get_peft_model`` and the command line:

    model + data + AllocationConfig + base LoraConfig
      -> every setting checked against the target layers (no work done yet)
      -> calibration statistics -> rank plan -> PEFT model, or adapter files on disk
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_directory
from .adapter import apply_plan, check_task_type
from .allocation import AllocationConfig, layer_alpha
from .calibrate import CalibrationResult, calibrate
from .confidence import MAX_UNSTABLE_SHARE, MapConfidence, of_statistics
from .data import make_batches
from .modelinfo import describe_model, model_task, resolved_name_or_path
from .plan import LayerPlan, RankPlan
from .targets import find_targets, layer_shape
from .versions import library_versions

__all__ = ["ADAPTER_FILES", "BASE_DIR", "as_batches", "check_alpha", "get_peft_model", "make_plan", "plan_model",
           "write_adapter"]

# README.md is PEFT's model card; BASE_DIR (sequence classifiers) holds the base model with its head's config
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "fimlora_plan.json", "rank_map.png")
BASE_DIR = "base"


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


def _warn_if_unreachable(allocation: AllocationConfig, shapes: Sequence[tuple[int, int]]) -> None:
    """A budget the clamps keep from shaping the ranks gives a uniform adapter: say which clamp binds."""
    reason = allocation.unreachable(shapes)
    if reason:
        warnings.warn(f"the budget cannot be allocated by score: {reason}", stacklevel=3)


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
    _warn_if_unreachable(allocation, [result.shapes[name] for name in result.stats])
    return _build_plan(result, allocation, base_rank=base_rank, base_alpha=base_alpha, model_name=model_name,
                       record=record)


def _build_plan(result: CalibrationResult, allocation: AllocationConfig, *, base_rank: int, base_alpha: float | None,
                model_name: str | None, record: Mapping[str, Any] | None) -> RankPlan:
    base_alpha = check_alpha(base_rank if base_alpha is None else base_alpha, "base_alpha")
    names = list(result.stats)
    shapes = [result.shapes[name] for name in names]
    scores = result.scores(allocation.score)
    _warn_if_scores_cannot_rank(scores, allocation.score, result.settings.samples)
    ranks, total = allocation.allocate([scores[name] for name in names], shapes)
    confidence = of_statistics(result.stats, names, ranks, lambda s: allocation.allocate(s, shapes)[0],
                               score=allocation.score, step=allocation.multiple_of, seed=result.settings.seed)
    decision = None
    if confidence is not None:
        ranks, decision = _decide(confidence, allocation, ranks, shapes)
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
                    base_alpha=base_alpha, calibration=calibration, versions=library_versions(),
                    confidence=confidence, decision=decision)


class AutoStop:
    """``num_batches="auto"``: calibrate until the rank map is stable (fimlora.confidence: at most
    MAX_UNSTABLE_SHARE of the layers with a rank interval wider than one step), from
    MIN_AUTO_BATCHES on, or until the data or ``max_batches`` runs out. Distributed runs decide on
    copies of the merged statistics, so every rank stops at the same batch."""

    MIN_AUTO_BATCHES = 2
    RESAMPLES = 100  # per check; the plan's own intervals use DEFAULT_RESAMPLES

    def __init__(self, allocation: AllocationConfig, shapes: Sequence[tuple[int, int]], *, seed: int) -> None:
        self.allocation, self.shapes, self.seed = allocation, list(shapes), seed
        self.trace: list[tuple[int, float]] = []  # (batches, unstable share) at each check
        self.seen = 0  # batches this rank has run
        self.stopped = False

    def __call__(self, states: list, done: int) -> bool:
        self.seen = done
        if done < self.MIN_AUTO_BATCHES:
            return False
        from . import distributed

        if distributed.is_distributed():
            states = copy.deepcopy(states)  # merged copies: the real merge happens once, at the end
            distributed.all_reduce_stats(states)  # (with the per-sample norms gathered)
        names = [str(i) for i in range(len(states))]
        scores = [s.score(self.allocation.score) for s in states]
        allocate = lambda values: self.allocation.allocate(values, self.shapes)[0]  # noqa: E731
        confidence = of_statistics(dict(zip(names, states, strict=True)), names, allocate(scores), allocate,
                                   score=self.allocation.score, step=self.allocation.multiple_of, seed=self.seed,
                                   resamples=self.RESAMPLES)
        if confidence is None:
            return False
        self.trace.append((done, confidence.unstable_share))
        # two stable checks in a row: one draw of the bootstrap can pass by luck
        self.stopped = len(self.trace) >= 2 and all(u <= MAX_UNSTABLE_SHARE for _, u in self.trace[-2:])
        return self.stopped

    def describe(self, max_batches: int) -> dict[str, Any]:
        """Where and why this rank stopped (every rank alike: the decision is made on merged statistics)."""
        done = self.seen
        why = ("the rank map was stable" if self.stopped else
               f"max_batches={max_batches} reached" if done >= max_batches else "the data ran out")
        return {"rule": f"stop once at most {MAX_UNSTABLE_SHARE:.0%} of layers have a rank interval wider than one "
                        f"step at two checks in a row (one after every batch from batch {self.MIN_AUTO_BATCHES})",
                "batches": done, "why": why, "unstable_share_by_batch": [[b, round(u, 4)] for b, u in self.trace]}


class UncertainMapError(ValueError):
    """The calibration cannot tell the layers apart (``AllocationConfig(if_uncertain="error")``)."""


def _decide(confidence: MapConfidence, allocation: AllocationConfig, ranks: list[int],
            shapes: Sequence[tuple[int, int]]) -> tuple[list[int], dict[str, str]]:
    """Apply the ``if_uncertain`` policy to a flat or unstable map; say plainly what was done."""
    if confidence.flat or not confidence.stable:
        reason = confidence.verdict()
        if allocation.if_uncertain == "error":
            raise UncertainMapError(f"the rank map is {reason}; calibrate on more data, or pass "
                                    "if_uncertain='uniform' (--if-uncertain uniform) to write the uniform adapter")
        if allocation.if_uncertain == "uniform":
            warnings.warn(f"the rank map is {reason}: writing the uniform adapter at the same budget "
                          "(--if-uncertain allocate keeps the score-based ranks)", stacklevel=4)
            return allocation.allocate_uniformly(shapes)[0], {"action": "uniform", "reason": reason}
        warnings.warn(f"the rank map is {reason}; allocating by score anyway (--if-uncertain allocate)", stacklevel=4)
        return ranks, {"action": "allocated", "reason": reason}
    return ranks, {"action": "allocated", "reason": confidence.verdict()}


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


def fingerprint(rows: Iterable[Any]) -> str:
    """sha256 of the rows' content (JSON, one line per row): the same rows in the same order give the same value."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def as_batches(data, *, batch_size: int, num_batches: int, pad_token_id: int, shuffle: bool = True, seed: int = 0,
               record: dict | None = None):
    """Batches from ``data``: a DataLoader or iterable of batch dicts is used as it is; a dataset of
    tokenised examples (a ``datasets.Dataset`` or a list of dicts with 1-D ``input_ids``) is padded
    into batches of ``batch_size``, from a ``seed``-ed draw of its rows (the first rows with
    ``shuffle=False``). For examples, ``record`` (if given) receives the rows used: their count,
    whether they were shuffled and a fingerprint of their token ids."""
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) or len(data) == 0:
        return data
    first = data[0]
    if not isinstance(first, Mapping) or torch.as_tensor(first["input_ids"]).dim() != 1:
        return data  # already a sequence of batches
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "labels") if k in first]
    count = min(len(data), batch_size * num_batches)
    order = range(count)
    if shuffle:  # a private generator: the same seed draws the same rows, global RNG untouched
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    rows = (data[i] for i in order)  # a datasets row is decoded once, not once per key
    features = [{k: torch.as_tensor(row[k]) for k in keys} for row in rows]
    for feature in features:
        feature.setdefault("attention_mask", torch.ones_like(feature["input_ids"]))
    if record is not None:
        record["rows"] = {"count": len(features), "of": len(data), "shuffled": bool(shuffle),
                          "fingerprint": fingerprint(f["input_ids"].tolist() for f in features)}
    return make_batches(features, batch_size=batch_size, pad_token_id=pad_token_id)


def plan_model(
    model: nn.Module,
    data: Iterable[Mapping],
    lora_config=None,
    *,
    allocation: AllocationConfig | None = None,
    batch_size: int = 8,
    shuffle: bool = True,
    record: Mapping[str, Any] | None = None,
    max_batches: int = 64,
    **calibrate_kwargs,
) -> RankPlan:
    """Calibrate ``model`` on ``data`` and allocate ranks: the plan for ``lora_config``'s targets.

    Everything that can be checked without calibrating is checked first: the allocation settings
    (``allocation``, defaults from ``lora_config.r``) against the target layers' shapes, alpha, and
    ``lora_config.use_rslora`` against the alpha policy. ``calibrate_kwargs`` go to
    :func:`fimlora.calibrate` (num_batches, rank, seed, backend, ...). A dataset of tokenised
    examples is drawn from in a seeded random order (``shuffle=False``: its first rows). The plan
    records the model's class, the task, the head (sequence classifiers) and the rows used.
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
    found = find_targets(model, targets)
    shapes = [layer_shape(module) for module in found.values()]
    allocation.check(shapes)
    _warn_if_unreachable(allocation, shapes)
    task = calibrate_kwargs.get("task") or (None if calibrate_kwargs.get("loss_fn") else model_task(model))
    check_task_type(lora_config, task)
    record = {**describe_model(model, task, set(found)), **(record or {})}
    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    auto = calibrate_kwargs.get("num_batches") == "auto"
    batches = as_batches(data, batch_size=batch_size,
                         num_batches=max_batches if auto else calibrate_kwargs.get("num_batches", 8),
                         pad_token_id=pad_token_id, shuffle=shuffle, seed=calibrate_kwargs.get("seed", 0), record=record)
    if calibrate_kwargs.get("num_batches") == "auto":
        rule = AutoStop(allocation, shapes, seed=calibrate_kwargs.get("seed", 0))
        calibrate_kwargs = {**calibrate_kwargs, "num_batches": max_batches, "stop_when": rule, "confidence": True}
    else:
        rule = None
    result = calibrate(model, batches, targets=targets, **calibrate_kwargs)
    if rule is not None:
        record = {**record, "stop": rule.describe(max_batches)}
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    return _build_plan(result, allocation, base_rank=lora_config.r, base_alpha=lora_config.lora_alpha,
                       model_name=model_name, record=record)


def get_peft_model(model: nn.Module, data: Iterable[Mapping], lora_config=None, *,
                   allocation: AllocationConfig | None = None, batch_size: int = 8, shuffle: bool = True,
                   **calibrate_kwargs):
    """Calibrate ``model`` on ``data``, allocate ranks, and return the ready ``PeftModel``.

    A drop-in for ``peft.get_peft_model(model, lora_config)`` for Trainer/TRL users: the base
    ``lora_config`` gives the uniform rank whose parameter count is the budget, alpha, the target
    modules and everything else (dropout, ``use_rslora`` ...); ``allocation`` changes the budget,
    clamps, rounding, temperature, alpha policy or score. The task calibrated for sets
    ``task_type`` (SEQ_CLS, CAUSAL_LM, SEQ_2_SEQ_LM) where ``lora_config`` leaves it None (a
    contradicting one is refused), and a sequence classifier's head is trained
    (``modules_to_save``) unless ``lora_config`` names its own. The plan is kept on the returned
    model as ``peft_model.fimlora_plan``. ``data`` is a DataLoader or any iterable of dict batches,
    or a dataset of tokenised examples (padded here into batches of ``batch_size``, drawn in a
    seeded random order unless ``shuffle=False``).
    """
    plan = plan_model(model, data, lora_config, allocation=allocation, batch_size=batch_size, shuffle=shuffle,
                      **calibrate_kwargs)
    peft_model = _wrap(model, plan, lora_config)
    peft_model.fimlora_plan = plan
    return peft_model


def _wrap(model: nn.Module, plan: RankPlan, lora_config):
    """``apply_plan``, with the base model's local path made absolute (so that the saved adapter
    reloads with AutoPeftModelFor... from any working directory; hub ids stay ids)."""
    peft_model = apply_plan(model, plan, lora_config)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = resolved_name_or_path(config.base_model_name_or_path)
    return peft_model


def _write_base(model: nn.Module, plan: RankPlan, directory: Path) -> str | None:
    """A sequence classifier's base as AutoPeftModelForSequenceClassification will load it:
    ``directory/BASE_DIR`` holds the model's config with its head (num_labels, label map,
    problem_type) and links to every other file of the local base model (weights, tokenizer), so
    nothing is copied. Returns its final absolute path, or None when the base is not a local
    directory (a hub id) or no head was recorded."""
    source = plan.calibration.get("base_model")
    if "head" not in plan.calibration or not source or not os.path.isdir(source):
        return None
    base = directory / BASE_DIR
    base.mkdir()
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [type(model).__name__]
    config.save_pretrained(base)
    for entry in sorted(Path(source).iterdir()):
        if entry.name != "config.json" and not entry.name.startswith("."):
            os.symlink(entry.resolve(), base / entry.name)
    return BASE_DIR


def write_adapter(model: nn.Module, plan: RankPlan, lora_config, directory: str | Path, *,
                  overwrite: bool = False) -> list[str]:
    """Write ``ADAPTER_FILES`` (the freshly initialised PEFT adapter of ``plan``, ready to train:
    ``inference_mode: false``; the plan and its heatmap) into ``directory``, all at once or nothing;
    for a sequence classifier also ``BASE_DIR``, the base model with its head, which the adapter
    names as its base. Returns the names written."""
    directory = Path(directory)
    final = directory.absolute()
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        peft_model = _wrap(model, plan, lora_config)
        base = _write_base(model, plan, tmp)
        peft_model.save_pretrained(str(tmp))
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["inference_mode"] = False  # PEFT always saves True; this adapter is made to be trained
        if base is not None:
            config["base_model_name_or_path"] = str(final / base)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        plan.save(tmp / "fimlora_plan.json")
        plan.plot(tmp / "rank_map.png")
        written = sorted(p.name for p in tmp.iterdir())
    return written
