"""Triton backend of the accumulate op: one fused kernel per call (``fimlora._kernels.accumulate``).

It forms every per-sample B gradient tile in registers and folds it into the running moments
with Welford's update, so the (S, d_out, r) per-sample tensor is never materialised. It runs on
CUDA devices, or on CPU under Triton's interpreter (TRITON_INTERPRET=1, slow; for tests).
"""

from __future__ import annotations

import os

import torch

from ..stats import LayerStats

name = "triton"


def available(device=None) -> tuple[bool, str]:
    """Whether the kernels can run (on ``device``, when given) here, and why (never raises)."""
    try:
        import triton
    except Exception:  # a broken install can raise more than ImportError
        return False, "triton is not installed (pip install triton)"
    version = getattr(triton, "__version__", "?")
    for_cuda = device is None or torch.device(device).type == "cuda"
    try:
        cuda = torch.cuda.is_available()
    except Exception:
        cuda = False
    if for_cuda and cuda:
        return True, f"triton {version} on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {version} interpreter on CPU (TRITON_INTERPRET=1; slow)"
    if not for_cuda:
        return False, "CPU tensors need the interpreter (set TRITON_INTERPRET=1; slow)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"


def accumulate(
    dy: torch.Tensor,
    h: torch.Tensor,
    segments: torch.Tensor,
    scale: float,
    state: LayerStats,
    sample_sq: torch.Tensor | None = None,
) -> None:
    """Fold the per-sample gradients of one batch into ``state``, and write each sample's
    ||G_n||^2 to ``sample_sq`` (S,) float32 when given (inputs checked by the dispatcher)."""
    # Imported here so that importing fimlora never needs triton.
    from fimlora._kernels.accumulate import accumulate_sample_stats

    accumulate_sample_stats(dy, h, segments, scale, state.count, state.mean, state.m2, sample_sq=sample_sq)
    state.count += segments.shape[0]
