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
from _op import DTYPES, copy_bandwidth, make_inputs, read_bytes  # noqa: E402
from fimlora._kernels.accumulate import accumulate_sample_stats  # noqa: E402

DEFAULT = "default"


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


WARPS = (2, 4, 8, 16)
TOP = 3  # tile variants whose warps are swept in the second stage


def with_warps(rows: list[dict], smoke: bool) -> list[dict]:
    """The second stage: the fastest tile variants again with every warp count."""
    if smoke:
        return [{"block_d": 16, "block_r": 16, "block_t": 16, "num_splits": 1, "num_warps": 2}]
    timed = sorted((row for row in rows if "ms" in row and row["method"] != DEFAULT), key=lambda row: row["ms"])
    keys = ("block_d", "block_r", "block_t", "num_splits")
    return [{**{key: row[key] for key in keys}, "num_warps": warps} for row in timed[:TOP] for warps in WARPS]


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


class ShapeSweep:
    """One shape's inputs, its default result, and the measuring of variants on it."""

    def __init__(self, shape, *, device: str, smoke: bool, copy_gbs: float | None):
        self.shape, self.device, self.smoke, self.copy_gbs = shape, device, smoke, copy_gbs
        n, length, d_out, r, dtype_name = shape
        self.dy, self.h, self.segments = make_inputs(n, length, d_out, r, DTYPES[dtype_name], device)
        self.read_bytes = read_bytes(self.dy, self.h)
        # timed calls write into these (their values do not matter), so no allocation is timed
        self.scratch = (torch.zeros(d_out, r, device=device), torch.zeros(d_out, r, device=device))
        self.reference_m2 = self.run({})[1]

    def run(self, variant: dict, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics of one batch from zero, into fresh tensors or ``out``."""
        d_out, r = self.shape[2], self.shape[3]
        mean, m2 = out or (torch.zeros(d_out, r, device=self.device), torch.zeros(d_out, r, device=self.device))
        accumulate_sample_stats(self.dy, self.h, self.segments, 1.0, 0, mean, m2, **variant)
        return mean, m2

    def measure(self, variant: dict) -> dict:
        n, length, d_out, r, dtype_name = self.shape
        label = DEFAULT if not variant else "d{block_d} r{block_r} t{block_t} s{num_splits}".format(**variant)
        if "num_warps" in variant:
            label += f" w{variant['num_warps']}"
        row = {"N": n, "L": length, "d_out": d_out, "r": r, "dtype": dtype_name, "method": label, **variant}
        try:
            m2 = self.run(variant)[1]
        except Exception as error:  # a tile the compiler rejects (shared memory, registers): recorded, not fatal
            return {**row, "status": "error", "reason": str(error).splitlines()[0][:160]}
        scale = max(float(self.reference_m2.abs().max()), 1e-30)
        milliseconds = bench(lambda: self.run(variant, self.scratch), self.device, self.smoke)
        gbs = self.read_bytes / (milliseconds / 1e3) / 1e9
        return {**row, "status": "ok", "max_rel_diff": float((m2 - self.reference_m2).abs().max()) / scale,
                "ms": round(milliseconds, 4), "GBps": round(gbs, 1),
                "of_copy": round(gbs / self.copy_gbs, 3) if self.copy_gbs else ""}


def sweep_shape(shape, *, device: str, smoke: bool, copy_gbs: float | None) -> list[dict]:
    """Tiles and splits first, then the fastest few again with every warp count."""
    sweep = ShapeSweep(shape, device=device, smoke=smoke, copy_gbs=copy_gbs)
    rows = [sweep.measure(variant) for variant in variants(shape[2], shape[3], shape[0], smoke)]
    rows += [sweep.measure(variant) for variant in with_warps(rows, smoke)]
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
    env = environment(args.device)
    name = "tune_triton_smoke.csv" if args.smoke else "tune_triton_gpu.csv"
    rows = []
    for shape in shapes:  # the CSV is rewritten after every shape: a run cut short keeps what it measured
        found = [{**row, **env} for row in sweep_shape(shape, device=args.device, smoke=args.smoke, copy_gbs=copy_gbs)]
        rows += found
        path = write_csv(rows, name)
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
    print(f"wrote {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
