"""Tile sizes and sample splits of the Triton accumulate kernel, swept on the GPU (issue 7).

For each shape (N samples of L tokens, dy (N*L, d_out), h (N*L, r), bf16 by default) every
(BLOCK_D, BLOCK_R, BLOCK_T, num_splits) of the grid is timed with ``triton.testing.do_bench``
and checked against the default choice's statistics; reported: time, GB/s over the bytes that
must be read (dy and h once), that as a fraction of the measured copy bandwidth, and the
speed-up over the default (``_default_blocks`` / ``_default_num_splits``). The best variant per
shape is printed so that the defaults can be changed from measurements, and by how much it wins.

    python benchmarks/tune_triton.py               # GPU: the sweep (about a minute on an H200)
    python benchmarks/tune_triton.py --smoke       # CPU: TRITON_INTERPRET=1, one tiny shape, 2 variants
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on the CPU

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_csv  # noqa: E402
from op_throughput import copy_bandwidth  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT = "default"


def inputs(n: int, length: int, d_out: int, r: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(n * length, d_out, generator=g).to(device=device, dtype=dtype)
    h = torch.randn(n * length, r, generator=g).to(device=device, dtype=dtype)
    starts = torch.arange(n) * length
    segments = torch.stack([starts, starts + length], dim=1).to(device)
    return dy, h, segments


def variants(d_out: int, r: int, n: int, smoke: bool) -> list[dict]:
    """The default plus a grid of explicit choices (tiles no larger than the state they cover)."""
    if smoke:
        return [{}, {"block_d": 16, "block_r": 16, "block_t": 16, "num_splits": 1}]
    grid = []
    for block_d, block_r, block_t, splits in itertools.product((32, 64, 128), (16, 32, 64), (32, 64, 128), (1, 4, 16)):
        if block_r > max(16, r) or splits > n or block_d * block_r > 128 * 64:
            continue
        grid.append({"block_d": block_d, "block_r": block_r, "block_t": block_t, "num_splits": splits})
    return [{}, *grid]


def bench(fn, device: str, smoke: bool) -> float:
    """Median milliseconds of ``fn``."""
    if smoke or not device.startswith("cuda"):
        import time

        fn()
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=30, return_mode="median")


def sweep_shape(shape, *, device: str, smoke: bool, copy_gbs: float | None) -> list[dict]:
    from fimlora._kernels.accumulate import accumulate_sample_stats

    n, length, d_out, r, dtype_name = shape
    dy, h, segments = inputs(n, length, d_out, r, DTYPES[dtype_name], device)
    read_bytes = dy.numel() * dy.element_size() + h.numel() * h.element_size()

    def run(variant: dict):
        mean = torch.zeros(d_out, r, device=device)
        m2 = torch.zeros(d_out, r, device=device)
        accumulate_sample_stats(dy, h, segments, 1.0, 0, mean, m2, **variant)
        return mean, m2

    reference = run({})
    rows = []
    for variant in variants(d_out, r, n, smoke):
        label = DEFAULT if not variant else "d{block_d} r{block_r} t{block_t} s{num_splits}".format(**variant)
        row = {"N": n, "L": length, "d_out": d_out, "r": r, "dtype": dtype_name, "method": label, **variant}
        try:
            mean, m2 = run(variant)
        except Exception as error:  # a tile the compiler rejects (shared memory, registers): recorded, not fatal
            rows.append({**row, "status": "error", "reason": str(error).splitlines()[0][:160]})
            continue
        scale = max(float(reference[1].abs().max()), 1e-30)
        rows.append({**row, "status": "ok", "max_rel_diff": float((m2 - reference[1]).abs().max()) / scale})
        milliseconds = bench(lambda variant=variant: run(variant), device, smoke)
        gbs = read_bytes / (milliseconds / 1e3) / 1e9
        rows[-1].update(ms=round(milliseconds, 4), GBps=round(gbs, 1),
                        of_copy=round(gbs / copy_gbs, 3) if copy_gbs else "")
    default_ms = next((row["ms"] for row in rows if row["method"] == DEFAULT and "ms" in row), None)
    for row in rows:
        if "ms" in row and default_ms:
            row["speedup_vs_default"] = round(default_ms / row["ms"], 3)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.smoke and not args.device.startswith("cuda"):
        print("the sweep needs a CUDA device (or --smoke for the interpreter)", file=sys.stderr)
        return 2
    if args.smoke:
        shapes = [(2, 8, 16, 16, "fp32")]
        args.device = "cpu"
    else:
        shapes = [(8, 2048, d, r, "bf16") for d in (4096, 14336) for r in (8, 16)] + [(8, 2048, 4096, 64, "bf16")]
    copy_gbs = copy_bandwidth(args.device) if args.device.startswith("cuda") else None
    if copy_gbs:
        print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s")
    rows = []
    for shape in shapes:
        found = sweep_shape(shape, device=args.device, smoke=args.smoke, copy_gbs=copy_gbs)
        rows += found
        timed = [row for row in found if "ms" in row]
        best = min(timed, key=lambda row: row["ms"])
        default = next(row for row in timed if row["method"] == DEFAULT)
        print(f"N={shape[0]} L={shape[1]} d_out={shape[2]} r={shape[3]} {shape[4]}: default {default['ms']:.3f} ms "
              f"({default['GBps']} GB/s); best {best['method']} {best['ms']:.3f} ms ({best['GBps']} GB/s), "
              f"{default['ms'] / best['ms']:.2f}x the default")
    print_table([r for r in rows if r.get("speedup_vs_default", 0) >= 1.0 or r["method"] == DEFAULT],
                ["d_out", "r", "dtype", "method", "status", "ms", "GBps", "of_copy", "speedup_vs_default"])
    errors = [r for r in rows if r["status"] == "ok" and r["max_rel_diff"] > 1e-3]
    if errors:
        print(f"{len(errors)} variant(s) disagree with the default's statistics (max relative diff > 1e-3)")
    env = environment(args.device)
    for row in rows:
        row.update(env)
    path = write_csv(rows, "tune_triton_smoke.csv" if args.smoke else "tune_triton_gpu.csv")
    print(f"wrote {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
