"""The calibration loop: batches in, per-layer LoRA-B gradient statistics out (DESIGN §3)."""

from __future__ import annotations

import inspect
import itertools
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import backends, distributed
from .losses import TASKS, infer_task, model_losses
from .probe import LayerProbe, ProbeSession, make_probe
from .samples import sample_layout
from .stats import GRANULARITIES, SCORES, LayerStats
from .targets import base_model, find_targets, layer_device, layer_shape, plan_name, unwrap_model

logger = logging.getLogger("fimlora")

LossFn = Callable[[nn.Module, dict], torch.Tensor]


# (the layers' statistics so far, batches done) -> stop now? (``num_batches="auto"``)
StopRule = Callable[[list[LayerStats], int], bool]


class NonFiniteError(RuntimeError):
    """A loss or gradient statistic became NaN/inf; nothing is allocated from it."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How the statistics were measured (recorded in the plan's "calibration" section)."""

    task: str  # a TASKS name, or "custom" for a loss_fn
    granularity: str
    num_batches: int  # batches seen, over all ranks
    samples: int
    tokens: int
    calib_rank: int
    calib_alpha: float
    use_rslora: bool
    seed: int
    backend: str  # the backend that ran
    world_size: int
    targets: str | tuple[str, ...]
    seconds: float

    def to_dict(self) -> dict:
        """JSON-ready (targets as a string or a list)."""
        d = asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return d


@dataclass
class CalibrationResult:
    """Per-layer statistics (keyed by the base model's module names) and how they were made."""

    stats: dict[str, LayerStats]
    shapes: dict[str, tuple[int, int]]  # (d_in, d_out)
    settings: CalibrationSettings

    def scores(self, score: str = "variance") -> dict[str, float]:
        """One score per layer: the mean of its "variance" or "fisher" statistic (SCORES)."""
        if score not in SCORES:
            raise ValueError(f"score={score!r} is not known; use one of {SCORES}")
        return {name: s.score(score) for name, s in self.stats.items()}


@dataclass(frozen=True)
class ModelFeed:
    """How batches are fed to one model: read once from its forward's signature and its config,
    not per batch."""

    takes_position_ids: bool
    takes_use_cache: bool
    encoder_decoder: bool

    @classmethod
    def for_model(cls, model: nn.Module) -> ModelFeed:
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        config = getattr(base_model(model), "config", None)
        return cls(
            takes_position_ids="position_ids" in parameters or any_keyword,
            takes_use_cache="use_cache" in parameters or any_keyword,
            encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        )

    def prepare(self, batch: dict) -> dict:
        """The batch as the model gets it. Left-padded rows need explicit positions, or their tokens
        sit at shifted positions and the gradients (of q/k under RoPE, of everything under absolute
        positions) change. No KV cache: it costs memory, and transformers only isolates packed
        rows without one."""
        mask = batch.get("attention_mask")
        if mask is not None and "position_ids" not in batch and not bool(mask[:, 0].all()):
            if self.encoder_decoder:
                raise ValueError("left-padded batches are not supported for encoder-decoder models; pad on the right")
            if self.takes_position_ids:
                batch = {**batch, "position_ids": (mask.long().cumsum(dim=1) - 1).clamp(min=0)}
        if self.takes_use_cache and "use_cache" not in batch:
            batch = {**batch, "use_cache": False}
        return batch

    def stream_lengths(self, batch: dict, task: str | None) -> tuple[int, ...]:
        """An encoder-decoder's encoder and decoder row lengths, when its decoder reads a sequence
        of its own (empty otherwise: the decoder then sees the encoder's tokens' layout)."""
        if not self.encoder_decoder:
            return ()
        decoder = batch.get("decoder_input_ids", batch.get("labels") if task == "seq2seq-lm" else None)
        if decoder is None or decoder.dim() != 2:
            return ()
        return tuple(dict.fromkeys((batch["input_ids"].shape[1], decoder.shape[1])))


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return layer_device(embeddings if embeddings is not None else model)


def prepare_run(model: nn.Module, data, *, targets, task, loss_fn, num_batches, backend):
    """The set-up calibrate and full_fisher share, every check before any work: the eager model,
    its task, its target layers, the concrete backend and the batch iterator."""
    model = unwrap_model(model)
    if loss_fn is None and task is None:
        task = infer_task(model)
    if loss_fn is None and task not in TASKS:
        raise ValueError(f"task={task!r} is not known; use one of {TASKS}, or pass loss_fn")
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    layers = find_targets(model, targets)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    chosen_backend = backends.resolve_backend(backend, _input_device(model), dtype)
    return model, task, layers, chosen_backend, _take_batches(data, num_batches)


def _check_settings(granularity, rank, stats_dtype) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not known; use one of {GRANULARITIES}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank (the calibration LoRA rank) must be a positive integer, got {rank!r}")
    if stats_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"stats_dtype must be torch.float32 or torch.float64, got {stats_dtype}")


def _take_batches(data: Iterable[Mapping], num_batches: int) -> Iterable[Mapping]:
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise ValueError("the calibration data is empty: it yielded no batch")
    if not isinstance(first, Mapping) or "input_ids" not in first:
        raise ValueError("each calibration batch must be a dict with at least 'input_ids' (and 'attention_mask', 'labels')")
    return itertools.islice(itertools.chain([first], iterator), num_batches)


def calibrate(
    model: nn.Module,
    data: Iterable[Mapping[str, torch.Tensor]],
    *,
    targets: str | Sequence[str] = "all-linear",
    task: str | None = None,
    loss_fn: LossFn | None = None,
    num_batches: int = 8,
    rank: int = 8,
    alpha: float = 8.0,
    use_rslora: bool = False,
    seed: int = 0,
    granularity: str = "sample",
    backend: str | None = None,
    stats_dtype: torch.dtype = torch.float32,
    train: bool = False,
    progress: bool = True,
    confidence: bool = True,
    stop_when: StopRule | None = None,
) -> CalibrationResult:
    """Measure the per-sample gradient statistics of a LoRA-B matrix on every target layer.

    The model is left bit-identical (no parameter is written; hooks, ``requires_grad`` flags
    and train/eval modes are restored on every exit path).

    Args:
        model: a transformers model (or a PEFT LoRA model, whose own lora_A and scale are used).
        data: a DataLoader or any iterable of dict batches with ``input_ids``, ``attention_mask``
            and (for seq-cls, optionally for causal-lm) ``labels``.
        targets: PEFT-style module names (suffix match), a regex (full match) or "all-linear".
        task: "causal-lm", "seq-cls" or "seq2seq-lm" (encoder-decoder models such as T5 and BART,
            with ``labels`` holding the target ids); inferred from the model class when None.
        loss_fn: ``(model, batch) -> losses`` of shape (N,), one per sample, instead of ``task``.
        num_batches: how many batches to calibrate on.
        rank, alpha, use_rslora, seed: the calibration LoRA (scale alpha/rank or alpha/sqrt(rank)).
        granularity: "sample" (per-sample gradients) or "batch" (one gradient per batch).
        backend: accumulate backend, see ``fimlora.backends``.
        train: run in train mode (dropout on) instead of eval mode.
        confidence: also keep each sample's squared gradient norm per layer (4 bytes per sample
            and layer; ``stats[name].sample_sq_norms()``), what fimlora.confidence resamples.
        stop_when: ``(states, batches done) -> bool``, checked after every batch: True stops
            (``fimlora.plan_model(num_batches="auto")`` stops once the rank map is stable).
    """
    _check_settings(granularity, rank, stats_dtype)
    model, task, layers, chosen_backend, batches = prepare_run(
        model, data, targets=targets, task=task, loss_fn=loss_fn, num_batches=num_batches, backend=backend
    )

    probes = [
        make_probe(name, module, rank=rank, alpha=alpha, use_rslora=use_rslora, seed=seed, stats_dtype=stats_dtype,
                   track_samples=confidence)
        for name, module in layers.items()
    ]
    started = time.perf_counter()
    done, samples, tokens = run_probes(
        model, probes, batches, task=task, loss_fn=loss_fn, granularity=granularity, backend=chosen_backend,
        train=train, progress=progress, total=num_batches, stop_when=stop_when,
    )
    if done < num_batches and stop_when is None:
        warnings.warn(f"the data gave only {done} batches of the {num_batches} asked for; calibrated on {done}", stacklevel=2)
    # data parallel: every rank ends with the statistics of all ranks' data
    distributed.all_reduce_stats([probe.state for probe in probes])
    done, samples, tokens = distributed.all_reduce_counts([done, samples, tokens])
    for probe in probes:
        if probe.state.count == 0:
            warnings.warn(f"layer {probe.name} received no gradient during calibration; its score is 0", stacklevel=2)

    settings = CalibrationSettings(
        task=task if loss_fn is None else "custom", granularity=granularity, num_batches=done, samples=samples,
        tokens=tokens, calib_rank=rank, calib_alpha=alpha, use_rslora=use_rslora, seed=seed,
        backend=chosen_backend, world_size=distributed.world_size(),
        targets=targets if isinstance(targets, str) else tuple(targets),
        seconds=round(time.perf_counter() - started, 3),
    )
    return CalibrationResult(
        stats={plan_name(p.name): p.state for p in probes},
        shapes={plan_name(p.name): layer_shape(p.module) for p in probes},
        settings=settings,
    )


def run_probes(
    model: nn.Module,
    probes: list[LayerProbe],
    batches: Iterable[Mapping],
    *,
    task: str | None,
    loss_fn: LossFn | None,
    granularity: str = "sample",
    backend: str = "torch",
    train: bool = False,
    progress: bool = True,
    total: int | None = None,
    desc: str = "fimlora calibrate",
    stop_when: StopRule | None = None,
) -> tuple[int, int, int]:
    """Run every batch forward and backward with ``probes`` hooked in; returns (batches, samples,
    tokens) seen on this rank. The probes' states hold the statistics afterwards. ``stop_when``
    (states, batches done) -> True ends the run early (every rank must decide alike)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("calibration was called inside torch.inference_mode(), where no gradient can flow; "
                           "call it outside that block")
    device = _input_device(model)
    feed = ModelFeed.for_model(model)
    samples = tokens = done = 0
    session = ProbeSession(model, probes, granularity=granularity, backend=backend, train=train)
    # gradients are the measurement: on even inside a caller's torch.no_grad()
    with torch.enable_grad(), _progress_bar(total, progress and distributed.rank() == 0, desc) as bar, session:
        for index, batch in enumerate(batches):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            layout = sample_layout(batch)
            batch = feed.prepare(batch)
            if loss_fn is not None:
                losses, keep = loss_fn(model, batch), None
            else:
                losses, keep = model_losses(model, batch, task, layout)
            _check_losses(losses, layout.num_samples, _batch_name(index, total))
            session.set_batch(layout, keep, feed.stream_lengths(batch, task))
            if not losses.requires_grad:
                raise RuntimeError("the loss does not depend on any target layer; check targets and the model's forward")
            losses.sum().backward()
            session.finish_batch()
            _check_stats(probes, _batch_name(index, total))
            done += 1
            samples += layout.num_samples if keep is None else int(keep.sum())
            tokens += int((layout.index >= 0).sum())
            bar.update(1)
            bar.set_postfix(samples=samples, tokens=tokens)
            if stop_when is not None and stop_when([probe.state for probe in probes], done):
                break
    return done, samples, tokens


def _batch_name(index: int, total: int | None) -> str:
    """"batch 3 of 8 (index 2)": people count from 1, the index says where in the data it is."""
    return f"batch {index + 1}{f' of {total}' if total else ''} (index {index})"


def _check_losses(losses: torch.Tensor, n: int, batch: str) -> None:
    if losses.shape != (n,):
        raise ValueError(
            f"the loss must have one value per sample, shape ({n},); got {tuple(losses.shape)} "
            "(a packed row holds several samples)"
        )
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(f"non-finite loss in {batch} (samples {bad}); no ranks were allocated")


def _check_stats(probes, batch: str) -> None:
    for probe in probes:
        if not probe.state.is_finite():
            raise NonFiniteError(
                f"non-finite gradient statistics in layer {probe.name} after {batch}; no ranks were allocated"
            )


def _progress_bar(total: int | None, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="batch", desc=desc, disable=not enabled, leave=False)
