"""Compiled backend (``compiled``): the ``fimlora::accumulate_sample_stats`` operator of the optional
extension ``fimlora._C`` (csrc/), on CPU and CUDA tensors alike. One fused pass per layer and
batch, with a parallel ATen kernel for CPU tensors and, when built with CUDA, a CUDA kernel; it
never materialises the (S, d_out, r) per-sample gradients.

The extension loads softly: ``load()`` never raises, it says whether the operator can be used
and, if not, why and how to fix it. A library compiled for another torch either fails to load
(undefined symbols) or is refused here by comparing the torch version it was built against with
the running one, before any call can crash. Importing this module is cheap and loads nothing;
``load()`` does, once per process.
"""

from __future__ import annotations

import functools
import importlib
import sys

import torch

from ..stats import LayerStats

name = "compiled"
OP = "fimlora::accumulate_sample_stats"
REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (FIMLORA_BUILD_EXT=1 shows the build error)"


def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the op can run (on ``device``, when given) and why."""
    ok, reason = load()
    if ok and device is not None and torch.device(device).type == "cuda" and not has_cuda_kernels():
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
    sample_sq: torch.Tensor | None = None,
) -> None:
    """Fold the per-sample gradients of one batch into ``state``, and write each sample's
    ||G_n||^2 to ``sample_sq`` (S,) float32 when given (inputs and availability checked by the
    dispatcher)."""
    torch.ops.fimlora.accumulate_sample_stats(
        dy, h, segments, float(scale), state.count, state.mean, state.m2, sample_sq
    )
    state.count += segments.shape[0]


@functools.cache
def load() -> tuple[bool, str]:
    """(True, description) when the compiled operator is usable, else (False, reason)."""
    try:
        module = importlib.import_module("fimlora._C")
    except ModuleNotFoundError as exc:
        if exc.name != "fimlora._C":
            return False, f"fimlora._C could not be imported ({exc}); {REBUILD}"
        return False, f"the compiled extension fimlora._C is not built; {REBUILD}"
    except (ImportError, OSError) as exc:
        # Typically undefined symbols: the library was built against another torch.
        return False, f"fimlora._C failed to load ({exc}); {REBUILD}"
    except Exception as exc:  # e.g. a second copy of the library registering the same operators
        return False, f"fimlora._C failed to initialise ({type(exc).__name__}: {exc}); {REBUILD}"

    built = getattr(module, "__torch_version__", None)
    if built != torch.__version__:
        return False, f"fimlora._C was built for torch {built}, running {torch.__version__}; {REBUILD}"
    if not hasattr(torch.ops.fimlora, "accumulate_sample_stats"):
        return False, f"fimlora._C loaded but did not register {OP}; {REBUILD}"
    _register_fake()
    kernels = "CPU and CUDA kernels" if has_cuda_kernels() else "CPU kernels only"
    return True, f"compiled extension fimlora._C for torch {built} ({kernels})"


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels (False when not loaded)."""
    module = sys.modules.get("fimlora._C")
    return bool(getattr(module, "__cuda__", 0))


def _fake_accumulate(dy, h, segments, scale, count, mean, m2, sample_sq=None) -> None:
    # Shape-only kernel for FakeTensor, torch.compile and opcheck: the op returns nothing and
    # updates mean, m2 (and sample_sq, when given) in place, so there is only metadata to check.
    torch._check(dy.dim() == 2 and h.dim() == 2, lambda: "dy must be (T, d_out) and h (T, r)")
    torch._check(dy.shape[0] == h.shape[0], lambda: "dy and h must have the same number of tokens T")
    torch._check(segments.dim() == 2 and segments.shape[1] == 2, lambda: "segments must have shape (S, 2)")
    shape = (dy.shape[1], h.shape[1])
    torch._check(tuple(mean.shape) == shape and tuple(m2.shape) == shape, lambda: "mean and m2 must be (d_out, r)")
    if sample_sq is not None:
        torch._check(sample_sq.dim() == 1 and sample_sq.shape[0] == segments.shape[0],
                     lambda: "sample_sq must have shape (S,), one entry per segment")


def _register_fake() -> None:
    try:
        torch.library.register_fake(OP)(_fake_accumulate)
    except RuntimeError:
        pass  # registered already: load() is cached, but this module may have been reloaded
