"""Backend dispatch for the accumulate op (DESIGN §5).

``accumulate(dy, h, segments, scale, state)`` folds the per-sample LoRA-B gradients
G_n = scale * sum_{t in segment n} dy_t h_t^T into ``state`` (a LayerStats) in place:

- dy: (T, d_out) gradient of the layer output, fp32/fp16/bf16
- h: (T, r) calibration activations A x
- segments: (S, 2) int64 [start, end) token ranges, one per sample; tokens in no range
  (padding) are ignored; an empty range is a sample whose gradient is zero.

The backend is chosen per call (``backend=``), by ``use_backend(...)``, by the environment
variable FIMLORA_BACKEND, or ``auto``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..stats import GRANULARITIES, LayerStats
from . import _torch

_BACKENDS = {_torch.name: _torch}
BACKENDS = ("auto", *_BACKENDS)
_default: str | None = None  # set by use_backend; the only global mutable state


def available_backends() -> dict[str, tuple[bool, str]]:
    """Each backend's availability and the reason."""
    return {name: module.available() for name, module in _BACKENDS.items()}


def resolve_backend(name: str | None = None, device: torch.device | None = None) -> str:
    """The concrete backend a call would use. Raises for unknown or unavailable backends."""
    name = name or _default or os.environ.get("FIMLORA_BACKEND") or "auto"
    if name == "auto":
        return "torch"
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r} is not known; choose one of {', '.join(BACKENDS)}")
    ok, reason = _BACKENDS[name].available()
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {reason}. Use backend='auto' or 'torch'.")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the default backend inside the block."""
    global _default
    resolve_backend(name)  # fail early on a bad name
    previous, _default = _default, name
    try:
        yield
    finally:
        _default = previous


def check_inputs(dy: torch.Tensor, h: torch.Tensor, segments: torch.Tensor, state: LayerStats) -> None:
    if dy.dim() != 2 or h.dim() != 2 or dy.shape[0] != h.shape[0]:
        raise ValueError(f"dy must be (T, d_out) and h (T, r) with the same T; got {tuple(dy.shape)} and {tuple(h.shape)}")
    if state.shape != (dy.shape[1], h.shape[1]):
        raise ValueError(f"state has shape {state.shape} but dy/h give (d_out, r) = ({dy.shape[1]}, {h.shape[1]})")
    if segments.dim() != 2 or segments.shape[1] != 2:
        raise ValueError(f"segments must be (S, 2) [start, end) ranges; got shape {tuple(segments.shape)}")


def accumulate(
    dy: torch.Tensor,
    h: torch.Tensor,
    segments: torch.Tensor,
    scale: float,
    state: LayerStats,
    *,
    granularity: str = "sample",
    backend: str | None = None,
) -> None:
    """Fold the per-sample B gradients of one batch into ``state`` in place (see module doc)."""
    check_inputs(dy, h, segments, state)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not known; use one of {GRANULARITIES}")
    _BACKENDS[resolve_backend(backend, dy.device)].accumulate(dy, h, segments, scale, state, granularity=granularity)
