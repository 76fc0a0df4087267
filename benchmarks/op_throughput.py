"""Throughput of the accumulate op per backend, against the bare batched matmul.

For each shape: N samples of L tokens, dy (N*L, d_out) and h (N*L, r). Reported per backend:
median time, achieved GB/s over the bytes that must be read (dy once and h once), and the
ratio to the bare batched matmul sum_n dY_n^T H_n (torch.bmm), which forms the per-sample
gradients and does nothing else. On GPU the GB/s is also given as a fraction of the measured
device-to-device copy bandwidth. All contenders are timed round-robin in one process.

    python benchmarks/op_throughput.py            # full sweep on CPU (or --device cuda)
    python benchmarks/op_throughput.py --smoke    # a few seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, op_backends, print_table, time_interleaved, write_csv  # noqa: E402
from _op import DTYPES, copy_bandwidth, make_inputs, read_bytes  # noqa: E402

from fimlora import LayerStats, backends  # noqa: E402


def beyond_cache(nbytes: int, device: str) -> bool:
    """Whether inputs of ``nbytes`` are too large for the GPU's L2 to serve repeated reads
    (4x its size): only then is a fraction of copy bandwidth meaningful."""
    return nbytes >= 4 * torch.cuda.get_device_properties(torch.device(device)).L2_cache_size


def bench_shape(n, length, d_out, r, dtype, device, repeats, backend_names):
    dy, h, segments = make_inputs(n, length, d_out, r, dtype, device)
    dy_n, h_n = dy.view(n, length, d_out), h.view(n, length, r)
    contenders = {"bmm": lambda: torch.bmm(dy_n.transpose(1, 2), h_n)}
    for name in backend_names:
        state = LayerStats.zeros(d_out, r, device=device)
        contenders[name] = lambda name=name, state=state: backends.accumulate(dy, h, segments, 1.0, state, backend=name)
    return time_interleaved(contenders, device=device, repeats=repeats), read_bytes(dy, h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="one small shape, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="CSV file name under benchmarks/results/")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    names = [n for n in op_backends() if backends.backend_status(n)[0]]
    if not on_gpu:
        names = [n for n in names if n != "triton"]  # the interpreter is a test tool, not a CPU path
    names.append("auto")
    if args.smoke:
        grid = [(8, 64, 256, 16, "fp32")]
    elif on_gpu:
        grid = [(n, length, d, r, dt) for dt in ("bf16", "fp32") for d in (1024, 4096, 14336) for r in (8, 16, 64)
                for n, length in ((8, 512), (8, 2048))]
    else:
        grid = [(8, 512, 4096, 16, "fp32")] + [(8, 512, d, r, "fp32") for d in (1024, 4096, 14336) for r in (8, 16, 64)
                                              if (d, r) != (4096, 16)]
    repeats = args.repeats or (3 if args.smoke else 20 if on_gpu else 7)
    copy_gbs = copy_bandwidth(args.device) if on_gpu else None
    env = environment(args.device)
    rows = []
    out = args.out or ("op_throughput_smoke.csv" if args.smoke else f"op_throughput_{'gpu' if on_gpu else 'cpu'}.csv")
    for n, length, d_out, r, dtype_name in grid:
        times, nbytes = bench_shape(n, length, d_out, r, DTYPES[dtype_name], args.device, repeats, names)
        for name, seconds in times.items():
            gbs = nbytes / seconds / 1e9
            row = {
                "backend": name if name != "auto" else f"auto({backends.resolve_backend('auto', args.device)})",
                "N": n, "L": length, "d_out": d_out, "r": r, "dtype": dtype_name,
                "ms": round(seconds * 1e3, 3), "GB_s": round(gbs, 2),
                "x_bmm": round(seconds / times["bmm"], 3),
            }
            if copy_gbs:  # blank where L2 serves the repeated reads: no bandwidth claim there
                row["frac_copy_bw"] = round(gbs / copy_gbs, 3) if beyond_cache(nbytes, args.device) else ""
            rows.append({**row, **env})
        path = write_csv(rows, out)  # after every shape: a run cut short keeps what it measured
    columns = ["backend", "N", "L", "d_out", "r", "dtype", "ms", "GB_s", "x_bmm"] + (["frac_copy_bw"] if copy_gbs else [])
    print_table(rows, columns)
    if copy_gbs:
        print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
