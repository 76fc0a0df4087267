"""Run one benchmark method in a fresh process and measure its peak memory.

Peak memory is a per-process quantity, so every (method, shape) gets its own process:

    parent:  Isolated(preload).run(worker, spec)   spec and result are JSON
    child:   worker(spec) -> serve(spec, build, methods): builds the model and data, takes an
             idle baseline, runs the named method and returns its timings and memory record.

The children are forked from a multiprocessing fork server that has imported ``preload``
(torch, transformers, ...) once: each child is a new process with its own address space and
its own counters, but does not pay the seconds of imports again (spawn where there is no fork
server). The server never runs a torch op, so no thread pool is forked.

On CPU the peak is the resident set size high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``)
minus a baseline taken right before the method runs, after the model and data are built. Each
child first pins glibc's allocator (``pin_allocator``) so that RSS follows live memory. On
Linux the high-water mark is first reset to the current RSS (``/proc/self/clear_refs``), so that
transient memory of the build (weight init, tokenisation) cannot hide the method's own peak;
where that is not allowed the baseline is the high-water mark so far, and the row says so
(``peak_reset`` false). On CUDA it is ``torch.cuda.max_memory_allocated`` over the same window.

A method that cannot run here raises ``Skip`` with the reason (missing package, say); the parent
gets ``status: skipped`` and prints it. Any other failure comes back as ``status: error`` with its
message, and a hung method as ``status: timeout``: one bad contender never stops a benchmark.

Children start without the checkout on their import path (``_common.child_environment``), so
the checkout's kernels/ never stands in for the PyPI package ``kernels`` (DESIGN §4).
"""

from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from _common import child_environment, machine_load


class Skip(Exception):
    """The method cannot run on this machine; the message says why and how to fix it."""


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; falls back to the high-water mark elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


_MMAP_THRESHOLD = 64 * 2**10


def pin_allocator() -> str:
    """Make glibc serve every block of 64 KiB or more by its own mmap, and give freed heap memory
    back above 64 KiB, so that RSS follows live tensors. By default glibc raises its mmap
    threshold as blocks are freed (up to 32 MiB) and keeps freed blocks for reuse; the same run's
    peak RSS then varied by ~100 MiB with allocation history on the small Llama, and by ~10 MiB
    with a 1 MiB threshold, against ~0.1 MiB with this one (measured here). Returns what was done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        if libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, _MMAP_THRESHOLD):
            return "glibc mmap/trim threshold 64 KiB"
    except (OSError, AttributeError):
        pass
    return "default allocator"


def measure_peak(run: Callable[[], Any], device: str = "cpu") -> tuple[Any, dict]:
    """Run ``run()`` and return (its result, memory record). The record's ``peak_extra_bytes``
    is the peak over the call minus the idle baseline just before it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return result, {"baseline_bytes": baseline, "peak_extra_bytes": peak - baseline, "peak_reset": True,
                        "memory_kind": "cuda max_memory_allocated"}
    reset = reset_peak_rss()
    baseline = peak_rss_bytes() if reset else max(peak_rss_bytes(), current_rss_bytes())
    result = run()
    peak = peak_rss_bytes()
    return result, {"baseline_bytes": baseline, "peak_extra_bytes": max(peak - baseline, 0), "peak_reset": reset,
                    "memory_kind": "cpu peak RSS"}


def serve(spec: dict, build: Callable[[dict], Any], methods: Mapping[str, Callable[[Any, dict], dict]]) -> dict:
    """Child side: build the workload, measure the named method, return the JSON-able result.

    A method returns a JSON-able dict; an optional ``"stats"`` entry (tensors) is saved with
    ``torch.save`` to ``spec["stats_path"]`` after the measurement, for the parent to compare.
    """
    warnings.simplefilter("ignore")  # library chatter from the contenders; failures still raise
    try:
        if spec["method"] not in methods:
            raise Skip(f"unknown method {spec['method']!r}; known: {', '.join(methods)}")
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        if spec.get("device", "cpu") != "cpu":
            allocator = "cuda caching allocator"
        else:  # a timing-only run may keep glibc's default (mmap costs page faults)
            allocator = pin_allocator() if spec.get("pin_allocator", True) else "default allocator"
        workload = build(spec)
        output, memory = measure_peak(lambda: methods[spec["method"]](workload, spec), spec.get("device", "cpu"))
        stats = output.pop("stats", None)
        if stats is not None and spec.get("stats_path"):
            torch.save(stats, spec["stats_path"])
            output["stats_path"] = spec["stats_path"]
        return {"status": "ok", **output, **memory, "allocator": allocator, "threads": torch.get_num_threads(),
                "load": machine_load()}
    except Skip as reason:
        return {"status": "skipped", "reason": str(reason)}
    except Exception as error:  # reported to the parent, which keeps going
        traceback.print_exc()
        return {"status": "error", "reason": f"{type(error).__name__}: {error}"}


def _child(worker: Callable[[dict], dict], spec_json: str, connection) -> None:
    try:  # tqdm's default lock is a named semaphore that a child leaves behind (a shutdown warning)
        import threading

        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())
    except ImportError:
        pass
    connection.send(json.dumps(worker(json.loads(spec_json))))
    connection.close()


class Isolated:
    """Runs ``worker(spec)`` in a fresh process per call (see the module docstring).

    ``worker`` must be a module-level function of the benchmark script (it is pickled by name).
    """

    _starting = threading.Lock()  # child_environment changes os.environ while a child starts

    def __init__(self, preload: Sequence[str] = ()):
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self._context = mp.get_context(method)
        if method == "forkserver":
            self._context.set_forkserver_preload(list(preload))

    def run(self, worker: Callable[[dict], dict], spec: dict, *, timeout: float) -> dict:
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_child, args=(worker, json.dumps(spec), sender), daemon=True)
        with self._starting, child_environment():
            process.start()
        sender.close()
        try:
            if receiver.poll(timeout):
                return json.loads(receiver.recv())
            if process.is_alive():
                return {"status": "timeout", "reason": f"no result within {timeout:.0f} s"}
            return {"status": "error", "reason": f"worker died with exit code {process.exitcode} (out of memory?)"}
        except EOFError:
            process.join(5)
            return {"status": "error", "reason": f"worker died with exit code {process.exitcode} (out of memory?)"}
        finally:
            if process.is_alive():
                process.kill()
            process.join()
            receiver.close()


def run_all(isolated: Isolated, entry: Callable[[dict], dict], specs: list[dict], *, jobs: int,
            timeout: float) -> list[dict]:
    """``entry(spec)`` for each spec in its own fresh process, ``jobs`` at a time (1 for timings
    that mean something), printing one line per spec as it ends."""
    def one(spec: dict) -> dict:
        started = time.perf_counter()
        result = isolated.run(entry, spec, timeout=timeout)
        where = f"{spec['model']} N={spec['N']:>3} L={spec['L']:>4}"
        note = f"  ({result['reason']})" if result["status"] != "ok" else ""
        print(f"  {where} {spec['method']:<14} {result['status']:<8} {time.perf_counter() - started:6.1f} s{note}",
              flush=True)
        return result

    if jobs <= 1:
        return [one(spec) for spec in specs]
    with ThreadPoolExecutor(jobs) as pool:  # each thread only waits on its own child process
        return list(pool.map(one, specs))
