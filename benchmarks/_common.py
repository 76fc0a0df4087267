"""Helpers shared by the benchmark scripts: the checkout kept off the import path, timing,
environment record, comparison, CSV output. Every script imports this module first."""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CHECKOUT = Path(__file__).resolve().parents[1]


def _is_checkout(entry: str) -> bool:
    return Path(entry or os.getcwd()).resolve() == CHECKOUT  # "" is the working directory


def off_checkout(entries: list[str]) -> list[str]:
    """``entries`` (sys.path, PYTHONPATH) without the checkout's root."""
    return [entry for entry in entries if not _is_checkout(entry)]


# DESIGN §4: the checkout's kernels/ must never stand in for the PyPI package `kernels` (which
# bitsandbytes and transformers import). A script's own folder is benchmarks/, but `python -c`,
# `python -m` or PYTHONPATH=. put the checkout's root on the path: take it off here, and keep it
# off in every child process (``child_environment``).
sys.path[:] = off_checkout(sys.path)


@contextlib.contextmanager
def child_environment() -> Iterator[None]:
    """While it lasts, new Python processes start without the checkout on their path: no
    PYTHONPATH entry for it, and PYTHONSAFEPATH=1, since multiprocessing starts its fork server and
    spawned children with ``python -c``, which would put the working directory (here usually the
    checkout's root) first on the path. Not thread-safe: hold a lock around it."""
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "PYTHONSAFEPATH")}
    paths = off_checkout(os.environ.get("PYTHONPATH", "").split(os.pathsep))
    os.environ["PYTHONSAFEPATH"] = "1"
    if any(paths):
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        os.environ.pop("PYTHONPATH", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(functions: dict[str, Callable[[], object]], *, device: str, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin in the same process so that
    machine noise hits every contender alike (these machines are shared)."""
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time in the same round: the two ran back to back,
    so slow drifts of the machine's load cancel."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (normwise: tiny elements do not dominate)."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def environment(device: str) -> dict[str, str]:
    import fimlora

    info = {
        "fimlora": fimlora.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    return info


def without_threads(env: dict) -> dict:
    """The environment record minus the parent's thread count (each row has its child's)."""
    return {k: v for k, v in env.items() if k != "threads"}


def op_backends() -> list[str]:
    """The accumulate op's backends that the installed fimlora names, "auto" left out. The compiled
    op is "cuda" before issue 12's rename and "compiled" after: whichever fimlora offers is used."""
    from fimlora import backends

    return [name for name in backends.BACKENDS if name != "auto"]


def write_csv(rows: list[dict], name: str, directory: Path = RESULTS) -> Path:
    """``rows`` as ``directory/name``, columns in order of first appearance."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).rjust(widths[c]) for c in columns))


def package_versions(*names: str) -> dict[str, str]:
    """Installed version of each distribution (``"not installed"`` when absent), for the record."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_load() -> float | None:
    """The 1-minute load average (None where unavailable): timings on a busy shared machine say so."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
