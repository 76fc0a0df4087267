"""Full-model diagonal empirical Fisher: the baseline that FIM-LoRA's statistics replace.

For a target layer y = W x (+ b), the gradient of sample n's own loss with respect to the
weight W is

    G_n = sum_t dy_{n,t} x_{n,t}^T            (d_out x d_in)

which is the LoRA-B formula of DESIGN §2 with h = x (no projection) and scale 1. So the full
statistics come from the very same machinery as calibration: the same per-sample losses
(``fimlora.losses``), the same sample layout (``fimlora.samples``), the same accumulate op
(``fimlora.backends``) and the same running moments (``LayerStats``, now d_out x d_in). The
result's ``fisher()`` is the eFIM diagonal (1/M) sum_n G_n^2 of every target weight,
accumulated per sample (never the square of a batch gradient), and its storage is
2 x d_out x d_in floats per layer: d_in / r times what calibration keeps.

It costs what a full per-sample statistic must cost: each target layer's input x is kept
(detached) from the forward until its backward, and the ``torch`` backend forms one layer's
(S, d_out, d_in) per-sample gradients at a time. As in calibration, no parameter requires
grad; only activation gradients flow, and the model is left unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import backends
from .calibrate import (
    LossFn,
    NonFiniteError,
    _accepts,
    _check_losses,
    _input_device,
    _take_batches,
    _with_position_ids,
)
from .losses import TASKS, infer_task, model_losses
from .probe import _AttachToAnchor
from .samples import SampleLayout, row_segments, sample_layout
from .stats import LayerStats
from .targets import find_targets, layer_shape, plan_name


class _WeightGradSession:
    """Context manager: on every target layer, a forward hook keeps the input x and hooks the
    output's gradient dy, which folds sum_t dy x^T per sample into that layer's LayerStats.

    Parameters are frozen and the model is put in eval mode inside the block; hooks, flags and
    modes are restored on every exit path. Like calibration's probe, the gradient hook lives on
    the output tensor of *that* forward, so a forward re-run by gradient checkpointing is not
    counted twice.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], stats: dict[str, LayerStats], backend: str):
        self.model = model
        self.layers = layers
        self.stats = stats
        self.backend = backend
        # positions a layer sees per batch -> [start, end) of each sample among them (as ProbeSession)
        self._layouts: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._saved_training: list[tuple[nn.Module, bool]] = []
        # lets the backward reach a layer whose input carries no gradient (the first target)
        self._anchor = torch.zeros((), requires_grad=True)

    def __enter__(self) -> _WeightGradSession:
        try:
            self._saved_requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
            self._saved_training = [(m, m.training) for m in self.model.modules()]
            for p, _ in self._saved_requires_grad:
                p.requires_grad_(False)
            self.model.eval()
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._forward_hook(name, self.stats[name])))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        for m, flag in self._saved_training:
            m.training = flag
        self._layouts = {}

    def set_batch(self, layout: SampleLayout, keep: torch.Tensor | None) -> None:
        """The samples of the batch about to be back-propagated; those with ``keep`` False are left out."""
        segments = layout.segments if keep is None else layout.segments[keep]
        self._layouts = {layout.index.numel(): segments}
        if not layout.packed:  # a layer after pooling sees one position per row
            rows = row_segments(layout.index.shape[0], device=segments.device)
            self._layouts.setdefault(layout.index.shape[0], rows if keep is None else rows[keep])

    def _forward_hook(self, name: str, state: LayerStats):
        d_out, d_in = state.shape

        def hook(module, args, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return None
            if not output.requires_grad:
                output = _AttachToAnchor.apply(output, self._anchor)
            inputs = x.detach().reshape(-1, d_in)

            def on_grad(dy: torch.Tensor) -> None:
                dy = dy.reshape(-1, d_out)
                segments = self._layouts.get(dy.shape[0])
                if segments is None:
                    raise RuntimeError(
                        f"layer {name} saw {dy.shape[0]} positions, which is neither the batch's tokens "
                        f"nor its rows {tuple(self._layouts)}; full_fisher needs target layers that act "
                        "on (batch, seq, features) or (batch, features)"
                    )
                # the weight gradient is the LoRA-B gradient with h = x and scale 1
                backends.accumulate(dy, inputs, segments, 1.0, state, backend=self.backend)

            output.register_hook(on_grad)
            return output

        return hook


def full_fisher(
    model: nn.Module,
    data: Iterable[Mapping[str, torch.Tensor]],
    *,
    targets: str | Sequence[str] = "all-linear",
    num_batches: int = 8,
    task: str | None = None,
    loss_fn: LossFn | None = None,
    backend: str | None = None,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Per-sample gradient statistics of the full weight of every target layer.

    Same data, targets, losses and backends as :func:`fimlora.calibrate`; the returned
    ``LayerStats`` of each layer (keyed by the base model's module name) has shape
    (d_out, d_in), and its ``fisher()`` is the empirical Fisher diagonal of that weight.
    The model is left bit-identical. Memory: see the module docstring.

    Args:
        model: a transformers model (or a PEFT model: the base weight of each LoRA layer).
        data: an iterable of dict batches with ``input_ids``, ``attention_mask`` (and ``labels``).
        targets: PEFT-style module names (suffix match), a regex (full match) or "all-linear".
        num_batches: how many batches to use.
        task: "causal-lm" or "seq-cls"; inferred from the model class when None.
        loss_fn: ``(model, batch) -> losses`` of shape (N,), one per sample, instead of ``task``.
        backend: accumulate backend, see ``fimlora.backends``.
        progress: show a progress bar.
    """
    if loss_fn is None and task is None:
        task = infer_task(model)
    if loss_fn is None and task not in TASKS:
        raise ValueError(f"task={task!r} is not known; use one of {TASKS}, or pass loss_fn")
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    layers = find_targets(model, targets)
    device = _input_device(model)
    chosen_backend = backends.resolve_backend(backend, device)
    batches = _take_batches(data, num_batches)
    stats = {}
    for name, module in layers.items():
        d_in, d_out = layer_shape(module)
        stats[name] = LayerStats.zeros(d_out, d_in, device=next(module.parameters()).device)

    from tqdm.auto import tqdm

    bar = tqdm(total=num_batches, unit="batch", desc="fimlora full fisher", disable=not progress, leave=False)
    with bar, _WeightGradSession(model, layers, stats, chosen_backend) as session:
        for index, batch in enumerate(batches):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            layout = sample_layout(batch)
            batch = _with_position_ids(model, batch)
            if "use_cache" not in batch and _accepts(model, "use_cache"):
                batch["use_cache"] = False
            if loss_fn is not None:
                losses, keep = loss_fn(model, batch), None
            else:
                losses, keep = model_losses(model, batch, task, layout)
            _check_losses(losses, layout.num_samples, index)
            if not losses.requires_grad:
                raise RuntimeError("the loss does not depend on any target layer; check targets and the model's forward")
            session.set_batch(layout, keep)
            losses.sum().backward()
            for name, state in stats.items():
                if not state.is_finite():
                    raise NonFiniteError(f"non-finite full-weight statistics in layer {name} after batch {index}")
            bar.update(1)
    return {plan_name(name): state for name, state in stats.items()}
