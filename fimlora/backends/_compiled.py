"""Compiled backend: the ``fimlora::accumulate_sample_stats`` operator of the optional
extension ``fimlora._C`` (csrc/). One fused pass per layer and batch, with a CUDA kernel for
CUDA tensors and a parallel ATen kernel for CPU tensors; it never materialises the
(S, d_out, r) per-sample gradients. Unavailable, with the reason, when the extension is not
built or was built for another torch (see ``fimlora._ext``).
"""

from __future__ import annotations

import torch

from .. import _ext
from ..stats import LayerStats

name = "cuda"


def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the op can run (on ``device``, when given) and why."""
    ok, reason = _ext.load()
    if ok and device is not None and torch.device(device).type == "cuda" and not _ext.has_cuda_kernels():
        return False, (
            "fimlora._C was built without CUDA kernels; rebuild on a machine with a CUDA torch and nvcc "
            "(or with FIMLORA_FORCE_CUDA=1): `pip install --no-build-isolation -e .`"
        )
    return ok, reason


def accumulate(dy: torch.Tensor, h: torch.Tensor, segments: torch.Tensor, scale: float, state: LayerStats) -> None:
    """Fold the per-sample gradients of one batch into ``state`` (inputs and availability checked
    by the dispatcher)."""
    torch.ops.fimlora.accumulate_sample_stats(dy, h, segments, float(scale), state.count, state.mean, state.m2)
    state.count += segments.shape[0]
