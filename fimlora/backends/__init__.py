"""Backend dispatch for the accumulate op (DESIGN §5).

``accumulate(dy, h, segments, scale, state)`` folds the per-sample LoRA-B gradients
G_n = scale * sum_{t in segment n} dy_t h_t^T into ``state`` (a LayerStats) in place:

- dy: (T, d_out) gradient of the layer output, fp32/fp16/bf16
- h: (T, r) calibration activations A x (or x itself, for full-weight statistics)
- segments: (S, 2) int64 [start, end) token ranges, one per sample; tokens in no range
  (padding) are ignored; an empty range is a sample whose gradient is zero.

When ``state.track_samples`` is set, each gradient's squared Frobenius norm ||G_n||^2 is written
too, straight into the state's per-sample buffer: every backend module's
``accumulate(dy, h, segments, scale, state, sample_sq=None)`` overwrites an (S,) float32
``sample_sq`` with them when given (computed from the tile the fused kernels hold anyway), and
computes nothing extra without it. With ``granularity="batch"`` the one observation's norm is kept.

Backends: ``torch`` (plain PyTorch, the reference), ``triton`` (fused kernel, fimlora._kernels;
CUDA tensors, or CPU ones under TRITON_INTERPRET=1), ``compiled`` (the compiled op of the
optional extension fimlora._C, with a CPU and a CUDA implementation). ``auto`` picks, for CUDA
tensors, triton then compiled then torch; for CPU tensors, the fastest measured CPU path (see
``_CPU_ORDER``); for float64 inputs, torch. The backend is chosen per call (``backend=``), by
``use_backend(...)``, by the environment variable FIMLORA_BACKEND, or ``auto``.
``describe_backends()`` says, per device, what will run and why. Optional backends are imported
lazily and never raise on ``import fimlora``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..stats import GRANULARITIES, LayerStats

_MODULES = {"torch": "._torch", "triton": "._triton", "compiled": "._compiled"}
BACKENDS = ("auto", *_MODULES)  # every name a caller may give (e.g. the CLI's --backend choices)
_RENAMED = {"cuda": "compiled"}  # old names, still accepted with a DeprecationWarning
_CUDA_ORDER = ("triton", "compiled", "torch")
# On CPU the compiled op's ATen implementation is used when built: measured faster than the
# plain-PyTorch path by benchmarks/op_throughput.py (see README "Performance").
_CPU_ORDER = ("compiled", "torch")
_default: str | None = None  # set by use_backend; the only global mutable state


def _module(name: str):
    try:
        return importlib.import_module(_MODULES[name], __name__)
    except ImportError as error:  # a backend module that is not part of this install
        return error


def backend_status(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether backend ``name`` can run (on ``device``, when given), and why (not). Cached per
    (name, device): dispatch asks once per layer and batch, and the answer does not change
    within a process."""
    return _status(name, None if device is None else torch.device(device))


@functools.cache
def _status(name: str, device: torch.device | None) -> tuple[bool, str]:
    module = _module(name)
    if isinstance(module, ImportError):
        return False, f"backend module missing from this install ({module})"
    try:
        return module.available(device)
    except Exception as error:  # a probe must never break dispatch
        return False, f"availability probe failed: {error}"


def available_backends() -> dict[str, tuple[bool, str]]:
    """Each backend's availability on some device, and the reason (per device: ``describe_backends``)."""
    return {name: backend_status(name) for name in _MODULES}


def _requested(name: str | None) -> str:
    """The backend asked for: ``name``, else use_backend's, else FIMLORA_BACKEND, else auto;
    checked, with an old name mapped to its new one."""
    from_environment = not name and not _default and os.environ.get("FIMLORA_BACKEND")
    name = name or _default or from_environment or "auto"
    source = "FIMLORA_BACKEND" if from_environment else "backend"
    if name in _RENAMED:
        warnings.warn(
            f"{source}={name!r} is deprecated: the compiled extension's backend is called {_RENAMED[name]!r} "
            "(it runs on CPU and CUDA)", DeprecationWarning, stacklevel=3)
        return _RENAMED[name]
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not known; choose one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(
    name: str | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> str:
    """The concrete backend a call on tensors of ``device`` and ``dtype`` would use. Raises for
    unknown or unavailable backends."""
    name = _requested(name)
    if name == "auto":
        if dtype == torch.float64:
            return "torch"  # the fused backends take fp32/fp16/bf16 inputs
        on_cuda = device is not None and torch.device(device).type == "cuda"
        for candidate in _CUDA_ORDER if on_cuda else _CPU_ORDER:
            if backend_status(candidate, device)[0]:
                return candidate
        return "torch"
    ok, reason = backend_status(name, device)
    if not ok:
        where = "" if device is None else f" on {torch.device(device)}"
        raise RuntimeError(f"backend {name!r} is not available{where}: {reason}. Use backend='auto' or 'torch'.")
    return name


def resolve_backends(
    name: str | None, devices: Sequence[torch.device | str], dtype: torch.dtype | None = None
) -> dict[str, str]:
    """``resolve_backend`` for each distinct device (e.g. of a model's target layers, which a
    device_map may spread over several): {device: the backend a call there runs}, to record in a
    plan. Raises as resolve_backend does, naming the device."""
    return {str(device): resolve_backend(name, device, dtype) for device in dict.fromkeys(map(torch.device, devices))}


@dataclass(frozen=True)
class DeviceBackends:
    """What the accumulate op runs on one device: ``runs`` is the backend that the request
    (``requested``) resolves to for fp32/fp16/bf16 inputs (float64 ones always run ``torch``),
    or None with the reason in ``problem``; ``status`` is each backend's availability there."""

    device: str
    requested: str
    runs: str | None
    problem: str | None
    status: dict[str, tuple[bool, str]]

    def lines(self, width: int = 16) -> list[str]:
        """Human-readable lines, labels right-aligned to ``width``, as ``fimlora env`` prints them."""
        runs = f"{self.requested} runs {self.runs}" if self.runs is not None else self.problem
        lines = [f"{'device ' + self.device:>{width}}: {runs}"]
        for name, (ok, reason) in self.status.items():
            lines.append(f"{'backend ' + name:>{width}}: {'available' if ok else 'unavailable'} ({reason})")
        return lines


def describe_backends(
    devices: Sequence[torch.device | str] | None = None, backend: str | None = None
) -> list[DeviceBackends]:
    """Per device (default: cpu and every visible CUDA device), the backend a call with
    ``backend`` (default: as dispatch chooses it, see the module doc) would run and every
    backend's availability with its reason. Raises only for an unknown backend name."""
    if devices is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = ["cpu", *(f"cuda:{index}" for index in range(count))]
    requested = _requested(backend)
    described = []
    for device in map(torch.device, devices):
        try:
            runs, problem = resolve_backend(requested, device), None
        except RuntimeError as error:
            runs, problem = None, str(error)
        status = {name: backend_status(name, device) for name in _MODULES}
        described.append(DeviceBackends(str(device), requested, runs, problem, status))
    return described


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the default backend inside the block."""
    global _default
    name = _requested(name)  # fail early on a bad name
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
    if segments.dim() != 2 or segments.shape[1] != 2 or segments.dtype != torch.long:
        raise ValueError(f"segments must be an int64 (S, 2) tensor of [start, end) ranges; got {segments.dtype} {tuple(segments.shape)}")


def summed_grad(dy: torch.Tensor, h: torch.Tensor, segments: torch.Tensor, scale: float) -> torch.Tensor:
    """sum_n G_n = scale * sum over every token in a segment of dy_t h_t^T, in float32 (d_out, r)."""
    t = dy.shape[0]
    edges = torch.zeros(t + 1, device=dy.device)
    edges.index_add_(0, segments[:, 0], torch.ones(segments.shape[0], device=dy.device))
    edges.index_add_(0, segments[:, 1], -torch.ones(segments.shape[0], device=dy.device))
    in_a_sample = edges.cumsum(0)[:t] > 0
    weighted_h = h.float() * in_a_sample[:, None]
    return dy.float().T @ weighted_h * scale


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
    """Fold the per-sample B gradients of one batch into ``state`` in place (see module doc).

    With ``granularity="batch"`` the batch contributes one observation, the gradient of its mean
    per-sample loss. Every backend gets int64 segments on dy's device and per-sample granularity.
    """
    check_inputs(dy, h, segments, state)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not known; use one of {GRANULARITIES}")
    segments = segments.to(dy.device)  # the kernels read the ranges where dy is; a no-op when there
    if granularity == "batch":
        if segments.shape[0]:
            grad = summed_grad(dy, h, segments, scale) / segments.shape[0]
            state.update_(grad[None])
            if state.track_samples:
                state.add_sample_sq_(grad.double().square().sum().float()[None])
        return
    module = _module(resolve_backend(backend, dy.device, dy.dtype))
    if not state.track_samples:
        module.accumulate(dy, h, segments, scale, state)
        return
    with state.sample_sq_slots(segments.shape[0]) as sample_sq:
        module.accumulate(dy, h, segments, scale, state, sample_sq=sample_sq)
