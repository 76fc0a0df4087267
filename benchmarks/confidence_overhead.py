"""What keeping the per-sample squared norms costs (issue 14): calibration with
``confidence=True`` (each sample's ||G_n||^2 per layer, what fimlora.confidence resamples) against
``confidence=False``, on the same model and batches, per accumulate backend.

Time: both settings run in one process, interleaved: each round runs off then on (the order
alternates between rounds, so neither always runs second), and the ratio is the median over
rounds of on / off within the round. With one thread (the default on CPU) the clock is the
process CPU time, which the load of other processes disturbs least; on CUDA it is wall time
after a synchronize.

Memory: the bytes the statistics hold (``LayerStats.nbytes``: mean + M2, plus the per-sample
buffer when on) with the setting on minus off, against the stated 4 bytes per sample and layer
(the buffer starts at the first batch's size and doubles, so up to twice that may be reserved;
8 equal batches, the calibration default, fill it exactly). On CUDA the allocator's own view
(``torch.cuda.memory_allocated`` while the results are held) is recorded too: it rounds every
buffer up to 512 bytes. The LLaMA-3-8B rows are computed from its published shapes (meta
device, fimlora's own target discovery), for the default 8 x 8 calibration.

    python benchmarks/confidence_overhead.py                 # stories260K shape, N=8, L=128, 8 batches (CPU)
    python benchmarks/confidence_overhead.py --device cuda    # every GPU backend (triton, compiled, torch)
    python benchmarks/confidence_overhead.py --smoke         # seconds

Writes benchmarks/results/confidence_overhead_<device>.csv (``_custom`` with non-default
options, ``_smoke`` with --smoke).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, machine_load, paired_ratio, print_table, synchronize, write_csv  # noqa: E402
from _workloads import MEASURED_MODELS, llama_model, meta_llama, token_batches  # noqa: E402

import fimlora  # noqa: E402
from fimlora import backends  # noqa: E402
from fimlora.targets import find_targets, layer_shape  # noqa: E402

BYTES_PER_SAMPLE_AND_LAYER = 4  # the stated cost: one float32 per sample and layer
DEFAULT_SAMPLES = 8 * 8  # the calibration default: 8 batches of 8 sequences


def calibrate(model, batches, backend: str, confidence: bool):
    return fimlora.calibrate(model, batches, num_batches=len(batches), backend=backend, confidence=confidence,
                             progress=False)


def held_bytes(result) -> int:
    return sum(stats.nbytes() for stats in result.stats.values())


def measure(model, batches, backend: str, device: str, rounds: int) -> dict:
    """One backend: paired on/off times over ``rounds`` and the statistics' bytes either way."""
    cpu_clock = device == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if cpu_clock else time.perf_counter
    times: dict[bool, list[float]] = {False: [], True: []}
    for settings in ((False, True), (True, False)):  # warm-up, both orders
        for confidence in settings:
            calibrate(model, batches, backend, confidence)
    for index in range(rounds):
        for confidence in ((False, True) if index % 2 == 0 else (True, False)):
            synchronize(device)
            began = clock()
            calibrate(model, batches, backend, confidence)
            synchronize(device)
            times[confidence].append(clock() - began)

    allocated = {}
    results = {}
    for confidence in (False, True):
        synchronize(device)
        before = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
        results[confidence] = calibrate(model, batches, backend, confidence)
        synchronize(device)
        allocated[confidence] = (torch.cuda.memory_allocated() - before) if device.startswith("cuda") else None
    on, off = results[True], results[False]
    samples, layers = on.settings.samples, len(on.stats)
    extra = held_bytes(on) - held_bytes(off)
    stated = BYTES_PER_SAMPLE_AND_LAYER * samples * layers
    row = {
        "method": backend, "samples": samples, "layers": layers,
        "off_s": round(statistics.median(times[False]), 4), "on_s": round(statistics.median(times[True]), 4),
        "on_over_off": round(paired_ratio(times[True], times[False]), 4),
        "rounds": rounds, "clock": "cpu" if cpu_clock else "wall",
        "stats_off_bytes": held_bytes(off), "extra_bytes": extra, "stated_bytes": stated,
        "extra_per_sample_layer": round(extra / max(samples * layers, 1), 3),
        "norms_match_fisher": max(abs(float(s.sample_sq_norms().mean()) / s.score("fisher") - 1)
                                  for s in on.stats.values() if s.count and s.score("fisher")),
    }
    if device.startswith("cuda"):
        row["allocated_extra_bytes"] = allocated[True] - allocated[False]
    return row


def at_scale(name: str, rank: int, samples: int) -> dict:
    """Computed: the statistics of a published shape, with and without the per-sample norms."""
    shapes = [layer_shape(m) for m in find_targets(meta_llama(name), "all-linear").values()]
    moments = sum(d_out * rank for _, d_out in shapes) * 2 * 4  # mean + M2, float32
    norms = len(shapes) * samples * BYTES_PER_SAMPLE_AND_LAYER
    weights = sum(p.numel() for p in meta_llama(name).parameters()) * 2  # bf16
    return {
        "method": "computed", "model": name, "samples": samples, "layers": len(shapes), "calib_rank": rank,
        "stats_off_bytes": moments, "extra_bytes": norms, "stated_bytes": norms,
        "extra_per_sample_layer": BYTES_PER_SAMPLE_AND_LAYER,
        "extra_KiB": round(norms / 2**10, 1), "moments_MiB": round(moments / 2**20, 2),
        "extra_over_weights": f"{norms / weights:.1e}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2-layer model, tiny batches, 2 rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny-llama", choices=MEASURED_MODELS)
    parser.add_argument("--n", type=int, default=8, help="sequences per batch")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--backend", action="append", help="accumulate backend(s); default: every available one")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    custom = any(getattr(args, key) != parser.get_default(key) for key in vars(args) if key not in ("smoke", "device"))
    if args.smoke:
        args.model, args.n, args.length, args.batches, args.rounds = "smoke-llama", 2, 16, 2, 2
    torch.set_num_threads(args.threads)

    model = llama_model(args.model).to(args.device)
    batches = token_batches(args.n, args.length, args.batches, model.config.vocab_size)
    wanted = args.backend or [b for b in backends.BACKENDS if b != "auto"]
    rows, env = [], environment(args.device)
    for backend in wanted:
        ok, reason = backends.backend_status(backend, args.device)
        if not ok or (backend == "triton" and args.device == "cpu"):  # the interpreter is not a timing
            rows.append({"method": backend, "status": "skipped", "reason": reason if not ok else "interpreter"})
            continue
        rows.append({"status": "ok", **measure(model, batches, backend, args.device, args.rounds)})
    for row in rows:
        row.update({"model": args.model, "N": args.n, "L": args.length, "batches": args.batches,
                    "device": args.device, "kind": "measured", "load": machine_load(), **env})
    rows.append({"status": "ok", "kind": "computed", **at_scale("llama-3-8b", 8, DEFAULT_SAMPLES)})

    print_table(rows, ["method", "model", "samples", "layers", "off_s", "on_s", "on_over_off", "extra_bytes",
                       "stated_bytes", "extra_per_sample_layer", "status"])
    # only default runs replace the committed results (as calibration_overhead.py does)
    suffix = "smoke" if args.smoke else "custom" if custom else args.device.split(":")[0]
    path = write_csv(rows, f"confidence_overhead_{suffix}.csv")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
