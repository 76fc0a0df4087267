"""Helpers shared by the benchmark scripts: timing, environment record, CSV output."""

from __future__ import annotations

import csv
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
