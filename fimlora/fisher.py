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

from .calibrate import LossFn, prepare_run, run_probes
from .probe import LayerProbe
from .stats import LayerStats
from .targets import layer_device, layer_shape, plan_name


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
        task: "causal-lm", "seq-cls" or "seq2seq-lm"; inferred from the model class when None.
        loss_fn: ``(model, batch) -> losses`` of shape (N,), one per sample, instead of ``task``.
        backend: accumulate backend, see ``fimlora.backends``.
        progress: show a progress bar.
    """
    model, task, layers, chosen_backend, batches = prepare_run(
        model, data, targets=targets, task=task, loss_fn=loss_fn, num_batches=num_batches, backend=backend
    )
    # a probe without A measures the weight's own gradient: h = x, scale 1
    probes = []
    for name, module in layers.items():
        d_in, d_out = layer_shape(module)
        probes.append(LayerProbe(name, module, None, 1.0, LayerStats.zeros(d_out, d_in, device=layer_device(module))))
    run_probes(model, probes, batches, task=task, loss_fn=loss_fn, backend=chosen_backend, progress=progress,
               total=num_batches, desc="fimlora full fisher")
    return {plan_name(p.name): p.state for p in probes}
