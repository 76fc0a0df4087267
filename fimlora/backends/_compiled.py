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


def accumulate(
    dy: torch.Tensor,
    h: torch.Tensor,
    segments: torch.Tensor,
    scale: float,
    state: LayerStats,
    *,
    granularity: str = "sample",
) -> None:
    if granularity != "sample":
        raise ValueError(f"the {name} backend folds per-sample gradients only; got granularity={granularity!r}")
    ok, reason = available(dy.device)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    if segments.device != dy.device:  # the kernels read the ranges on dy's device
        segments = segments.to(dy.device)
    torch.ops.fimlora.accumulate_sample_stats(dy, h, segments, float(scale), state.count, state.mean, state.m2)
    state.count += segments.shape[0]
