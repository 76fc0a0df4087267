"""Throughput and peak memory of fimlora calibration against every other way to get the same
per-sample LoRA-B gradient statistics, and against the floor: a plain forward and an
activation-only backward.

Contenders, on the same model and batches, all with the same per-sample loss (causal-LM shifted
cross-entropy averaged over each sample's own tokens, fimlora.losses) and, where LoRA is
wrapped, the same calibration A (fimlora.draw_calibration_a) with B = 0:

    floor            forward + activation-only backward: every weight frozen, the embeddings'
                     output requires grad (transformers' enable_input_require_grads); no statistic
    fimlora-<b>      fimlora.calibrate with accumulate backend <b> (each one available on CPU)
    peft             PEFT LoRA, lora_B trainable, one backward: only the batch-summed B gradient
    bs1              a batch-size-one loop over the samples, reading lora_B.weight.grad each time
    bmm              hooks on PEFT's lora_B: per-sample gradients by torch.bmm, then squared
    opacus           Opacus GradSampleModule (grad_sample), loss_reduction="sum"
    backpack         BackPACK BatchGrad + SumGradSquared on each lora_B
    torch.func       vmap(grad(per-sample loss)) over the rows

Conventions made equal: every method back-propagates the sum of the per-sample losses, so each
per-sample gradient is that of its own token-averaged loss (Opacus therefore runs with
loss_reduction="sum": its "mean" assumes a batch-mean loss and would rescale by N); the model
stays in eval mode, and only the hooked lora_B layers are put in train mode for Opacus, which
records nothing from modules in eval mode (a Linear behaves the same in both).

Memory and statistics: every (method, shape) runs in a fresh process (benchmarks/_memory.py):
peak RSS over its setup and one pass, minus an idle baseline taken after the model and data are
built. Each method's statistics are compared with fimlora's (relative error, max |a - b| /
max |b| over the mean and the second moment of every layer; the batch-summed gradient for peft).

Time: on a shared machine the load of other processes changes a lone process's time by up to 2x
(measured here), so each shape gets one more process that holds every method, each on its own
copy of the model, and times them in turn: a warm-up round, then timed rounds. A method's ratio
to the floor (or a rival's to fimlora) is the median over rounds of the two times in the same
round; 2 rounds per shape, 4 at N >= 16, and the headline (floor and fimlora at N=8, L=256) gets
a process and 6 rounds of its own. With one thread per process (the default) the clock is the
process CPU time, which other processes' load disturbs least.

    python benchmarks/calibration_overhead.py            # full sweep (~6 min on 2 idle cores, ~10 busy)
    python benchmarks/calibration_overhead.py --smoke    # seconds: 2-layer tiny Llama, N=2..4, L=16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    environment,
    machine_load,
    package_versions,
    paired_ratio,
    print_table,
    relative_error,
    without_threads,
    write_csv,
)
from _contenders import (  # noqa: E402
    CONTENDERS,
    PRELOAD,
    VERSIONS,
    backend_unavailable,
    measured,
    round_robin,
)
from _memory import Isolated, run_all, serve  # noqa: E402
from _workloads import MEASURED_MODELS, Workload, build  # noqa: E402

from fimlora import backends  # noqa: E402

METHODS: dict[str, Callable[[Workload, dict], dict]] = {
    **{name: measured(prepare) for name, prepare in CONTENDERS.items()},
    "round-robin": round_robin,
}
MiB = 2**20


def worker(spec: dict) -> dict:
    """Entry point of each isolated child process (module level so that it pickles by name)."""
    return serve(spec, build, METHODS)


# ---------------------------------------------------------------- parent: sweep, compare, report

def compare(path: str | None, reference_path: str | None) -> float | None:
    """Worst relative error over layers and statistics of a method's result against fimlora's."""
    if not path or not reference_path:
        return None
    got, reference = torch.load(path), torch.load(reference_path)
    worst = 0.0
    for name, ref in reference.items():
        if "sum" in got[name]:  # a batch gradient: compare it with fimlora's sum over samples
            worst = max(worst, relative_error(got[name]["sum"], ref["mean"] * ref["count"]))
            continue
        for key in ("mean", "fisher"):
            worst = max(worst, relative_error(got[name][key], ref[key]))
    return worst


def lora_bytes(stats_path: str | None, rank: int, n: int, length: int) -> tuple[int, int]:
    """(statistics, h buffers) in bytes for fimlora, from its statistics file: mean + M2 of
    d_out x r per layer (float32), and the h = A x each layer keeps from its forward to its
    backward (N x L x r, float32)."""
    if not stats_path:
        return 0, 0
    stats = torch.load(stats_path)
    mean_bytes = sum(s["mean"].numel() * s["mean"].element_size() for s in stats.values())
    return 2 * mean_bytes, len(stats) * n * length * rank * 4


def point_rows(model: str, rank: int, n: int, length: int, memory: dict[str, dict], timing: dict,
               env: dict) -> list[dict]:
    """One row per contender at (N, L): time from the round-robin process, memory and statistics
    from the contender's own process. The time ratios use the best pass, in CPU seconds when each
    process has one thread (what another process's load changes least), else wall seconds."""
    ok = {m: r for m, r in memory.items() if r["status"] == "ok"}
    reference = next((r.get("stats_path") for m, r in ok.items() if m.startswith("fimlora")), None)
    floor_peak = ok["floor"]["peak_extra_bytes"] if "floor" in ok else None
    stats_bytes, h_bytes = lora_bytes(reference, rank, n, length)
    threads = timing.get("threads", 0)
    clock = timing.get("cpu" if threads == 1 else "wall", {})
    rows = []
    for method, result in memory.items():
        status, reason = result["status"], result.get("reason", "")
        if status == "ok" and method in timing.get("errors", {}):
            status, reason = "error", timing["errors"][method]
        row = {"method": method, "model": model, "N": n, "L": length, "tokens": n * length, "rank": rank,
               "status": status, "reason": reason}
        if clock.get(method):
            seconds = min(clock[method])
            row.update({"time_s": round(seconds, 4), "clock": "cpu" if threads == 1 else "wall",
                        "rounds_s": ";".join(f"{t:.4f}" for t in clock[method]),
                        "wall_s": round(min(timing["wall"][method]), 4), "cpu_s": round(min(timing["cpu"][method]), 4),
                        "tokens_per_s": round(n * length / seconds, 1),
                        "x_floor": round(paired_ratio(clock[method], clock["floor"]), 3) if clock.get("floor") else ""})
        if method in ok:
            peak = result["peak_extra_bytes"]
            row.update({
                "peak_extra_MiB": round(peak / MiB, 2),
                "over_floor_MiB": round((peak - floor_peak) / MiB, 2) if floor_peak is not None else "",
                "stats_MiB": round(stats_bytes / MiB, 3) if method not in ("floor", "peft") else 0,
                "h_MiB": round(h_bytes / MiB, 3) if method.startswith("fimlora") or method == "bmm" else "",
                "rel_err": f"{compare(result.get('stats_path'), reference):.1e}" if method != "floor" and reference else "",
                "peak_reset": result["peak_reset"], "allocator": result.get("allocator", ""),
                "memory_load": result.get("load", ""),
            })
        rows.append({**row, "threads": threads, "timing_load": timing.get("load", ""), **env})
    return rows


HEADLINE = (8, 256)  # the bars' shape: N=8 sequences of L=256 tokens
PER_SAMPLE_RIVALS = ("bmm", "opacus", "backpack", "torch.func")


def sweep(smoke: bool) -> list[tuple[int, int]]:
    """(N, L) points: N swept at L=64, and L swept at N=8; the headline point among them. Sized to
    take about 10 minutes on 2 shared cores."""
    if smoke:
        return [(2, 16), (4, 16)]
    by_n = [(n, 64) for n in (4, 8, 16, 32)]
    by_length = [(8, length) for length in (64, 128, 256)]
    return list(dict.fromkeys(by_n + by_length))


def primary_fimlora(rows: list[dict]) -> str:
    """The backend fimlora's ``auto`` picks on CPU, if it ran; else the first that did."""
    auto = f"fimlora-{backends.resolve_backend('auto', 'cpu')}"
    ran = [r["method"] for r in rows if r["method"].startswith("fimlora") and r["status"] == "ok"]
    return auto if auto in ran else (ran[0] if ran else auto)


def rounds(row: dict) -> list[float]:
    """A row's per-round times (the round-robin's order is the same for every method)."""
    return [float(t) for t in row["rounds_s"].split(";")]


def bar_rows(rows: list[dict], headline: tuple[int, int], headline_timing: dict) -> list[dict]:
    """The issue's bars, each with the ratio measured in this run and a verdict."""
    at = {(r["method"], r["N"], r["L"]): r for r in rows if r["status"] == "ok"}
    ours = primary_fimlora(rows)
    bars = []

    def add(bar: str, measured, target: str, passed: bool, note: str = "") -> None:
        bars.append({"bar": bar, "measured": measured, "target": target, "verdict": "PASS" if passed else "FAIL",
                     "note": note})

    n0, l0 = headline
    clock = "cpu" if headline_timing.get("threads") == 1 else "wall"
    candidates = [m for m in headline_timing.get(clock, {}) if m.startswith("fimlora")]
    for name in sorted(candidates, key=lambda m: m != ours):  # the backend users get first
        ratios = [t / f for t, f in zip(headline_timing[clock][name], headline_timing[clock]["floor"], strict=True)]
        ratio = statistics.median(ratios)
        add(f"{name} time / floor time, N={n0} L={l0}", round(ratio, 3), "<= 1.10", ratio <= 1.10,
            f"median of {len(ratios)} rounds run back to back in one process ({clock} s; per round "
            f"{min(ratios):.3f}..{max(ratios):.3f}; floor {statistics.median(headline_timing[clock]['floor']):.3f} s)")
    growth = [(r["N"], r["L"], r["over_floor_MiB"], r["h_MiB"]) for r in rows
              if r["method"] == ours and r.get("over_floor_MiB", "") != ""]
    if len(growth) > 1:
        over = [g[2] for g in growth]
        by_point = ", ".join(f"N={n} L={length}: {o:+.2f}" for n, length, o, _ in growth)
        stats = next(r["stats_MiB"] for r in rows if r["method"] == ours and "stats_MiB" in r)
        add(f"{ours} peak - floor peak: growth across the sweep (MiB)", round(max(over) - min(over), 2),
            "<= 2 MiB (no growth beyond the statistics, which do not depend on N or L)", max(over) - min(over) <= 2.0,
            f"by point: {by_point}; statistics {stats:.2f} MiB; the h = A x buffers (N*L*r floats per layer) "
            f"grow from {min(g[3] for g in growth):.2f} to {max(g[3] for g in growth):.2f} MiB")
    for length in sorted({key[2] for key in at if key[1] == n0}):
        if ("bs1", n0, length) in at and (ours, n0, length) in at and "time_s" in at[(ours, n0, length)]:
            ratio = paired_ratio(rounds(at[("bs1", n0, length)]), rounds(at[(ours, n0, length)]))
            add(f"bs1 loop time / {ours} time, N={n0} L={length}", round(ratio, 2), ">= 5", ratio >= 5)
    for rival in PER_SAMPLE_RIVALS:
        for n, length in sorted({(key[1], key[2]) for key in at if key[1] >= 16}):
            mine, theirs = at.get((ours, n, length)), at.get((rival, n, length))
            if not mine or not theirs or "time_s" not in mine or "time_s" not in theirs:
                continue
            speed = paired_ratio(rounds(theirs), rounds(mine))
            lean = theirs["peak_extra_MiB"] - mine["peak_extra_MiB"]
            add(f"{rival} vs {ours}, N={n} L={length}: time ratio; extra peak MiB", f"{speed:.2f}x; {lean:+.1f} MiB",
                "> 1x and > 0 MiB", speed > 1 and lean > 0)
    return bars


def plot(rows: list[dict], path: Path, headline: tuple[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and "peak_extra_MiB" in r]
    n0 = headline[0]
    l_fixed = max((r["L"] for r in ok if r["N"] != n0), default=None)  # the L at which N is swept
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    for method in dict.fromkeys(r["method"] for r in ok):
        for column, (key, fixed, fixed_value) in enumerate((("N", "L", l_fixed), ("L", "N", n0))):
            points = sorted((r[key], r) for r in ok if r["method"] == method and r[fixed] == fixed_value)
            if len(points) < 2:
                continue
            style = dict(marker="o", lw=2.5 if method.startswith("fimlora") else 1.2,
                         ls="--" if method == "floor" else "-", label=method)
            timed_points = [(x, r) for x, r in points if "time_s" in r]
            axes[0][column].plot([x for x, _ in timed_points], [r["time_s"] for _, r in timed_points], **style)
            extra = [(x, r["over_floor_MiB"]) for x, r in points if r.get("over_floor_MiB", "") != ""]
            axes[1][column].plot([x for x, _ in extra], [v for _, v in extra], **style)
    for column, (key, fixed, value) in enumerate((("N", "L", l_fixed), ("L", "N", n0))):
        axes[0][column].set_title(f"sweep {key} at {fixed}={value}")
        axes[1][column].set_xlabel(key)
        axes[0][column].set_yscale("log")
        # the contenders' extra memory spans 0.5 MiB to hundreds, and bs1's is negative
        axes[1][column].set_yscale("symlog", linthresh=1.0)
        for ax in (axes[0][column], axes[1][column]):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
    clock = next((r["clock"] for r in ok if "clock" in r), "wall")
    axes[0][0].set_ylabel(f"{clock} seconds per batch (best round)")
    axes[1][0].set_ylabel("peak RSS - floor's peak RSS (MiB)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][1].get_legend_handles_labels()
    if handles:
        axes[0][1].legend(handles, labels, fontsize=8)
    fig.suptitle(f"calibration overhead, {ok[0]['model'] if ok else ''}, CPU float32, rank {ok[0]['rank'] if ok else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2-layer tiny Llama, N=2..4, L=16, one repeat")
    parser.add_argument("--model", default=None, choices=MEASURED_MODELS)
    parser.add_argument("--points", default=None, help="N:L pairs to run, e.g. 8:256,16:128 (default: the sweep)")
    parser.add_argument("--methods", default=",".join(CONTENDERS), help="comma-separated subset of the contenders")
    parser.add_argument("--rank", type=int, default=8, help="calibration LoRA rank (fimlora's default, 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (after one warm-up round)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a process is given up")
    parser.add_argument("--jobs", type=int, default=2, help="memory processes at once (timing runs alone)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: on a shared machine a second thread mostly "
                             "waits for a core, and timings become noise)")
    args = parser.parse_args()
    model = args.model or ("smoke-llama" if args.smoke else "small-llama")
    repeats = args.repeats or (1 if args.smoke else 2)
    timeout = args.timeout or (120 if args.smoke else 900)
    points = [tuple(int(v) for v in p.split(":")) for p in args.points.split(",")] if args.points else sweep(args.smoke)
    headline = points[-1] if args.smoke else HEADLINE
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(CONTENDERS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    custom = args.points or args.model or methods != list(CONTENDERS) or args.rank != 8 or args.repeats
    # alpha = 2 * rank: PEFT's scale is 2, so a contender that dropped it would show in rel_err
    base = {"model": model, "batches": 1, "rank": args.rank, "alpha": 2.0 * args.rank, "mode": "lora",
            "threads": args.threads}
    env = {**without_threads(environment("cpu")), **package_versions(*VERSIONS), "dtype": "float32"}
    isolated = Isolated(PRELOAD)
    started = time.perf_counter()
    print(f"calibration overhead: {model}, rank {args.rank}, points {points}, {args.threads} thread(s) per process, "
          f"load {machine_load()}")
    with tempfile.TemporaryDirectory() as workdir:
        print("memory and statistics: one fresh process per method and shape, one pass each")
        specs = [{**base, "method": m, "N": n, "L": length, "repeats": 0, "stats_path": f"{workdir}/{m}_{n}_{length}.pt"}
                 for n, length in points for m in methods]
        unavailable = {m: reason for m in methods if (reason := backend_unavailable(m))}
        for method, reason in unavailable.items():
            print(f"  {method}: skipped ({reason})")
        runnable = [spec for spec in specs if spec["method"] not in unavailable]
        outcomes = iter(run_all(isolated, worker, runnable, jobs=args.jobs, timeout=timeout))
        memory = [{"status": "skipped", "reason": unavailable[spec["method"]]} if spec["method"] in unavailable
                  else next(outcomes) for spec in specs]
        methods = [m for m in methods if m not in unavailable]
        print(f"time: one process per shape, every method in turn, 1 warm-up + {repeats} timed rounds "
              f"({2 * repeats} at N >= 16)")
        # the rivals' bar is at N >= 16, where some margins are ~10%: twice the rounds there
        timing_specs = [{**base, "method": "round-robin", "contenders": methods, "N": n, "L": length,
                         "repeats": repeats * (2 if n >= 16 and not args.smoke else 1), "pin_allocator": False}
                        for n, length in points]
        timing = run_all(isolated, worker, timing_specs, jobs=1, timeout=timeout)
        ours = [m for m in methods if m.startswith("fimlora")]
        headline_spec = {**base, "method": "round-robin", "contenders": ["floor", *ours], "N": headline[0],
                         "L": headline[1], "repeats": 2 if args.smoke else 6, "pin_allocator": False}
        print(f"headline: floor and fimlora at N={headline[0]} L={headline[1]}, {headline_spec['repeats']} rounds")
        headline_timing = run_all(isolated, worker, [headline_spec], jobs=1, timeout=timeout)[0] if ours else {}
        rows = []
        for (n, length), clock in zip(points, timing, strict=True):
            at_point = {s["method"]: r for s, r in zip(specs, memory, strict=True) if (s["N"], s["L"]) == (n, length)}
            rows.extend(point_rows(model, args.rank, n, length, at_point, clock, env))
    print_table(rows, ["method", "N", "L", "status", "time_s", "tokens_per_s", "x_floor", "peak_extra_MiB",
                       "over_floor_MiB", "stats_MiB", "rel_err"])
    for row in rows:
        if row["status"] != "ok":
            print(f"  {row['method']} at N={row['N']} L={row['L']}: {row['status']}: {row['reason']}")
    bars = bar_rows(rows, headline, headline_timing if headline_timing.get("status") == "ok" else {})
    print(f"\nbars (ratios from this run; {time.perf_counter() - started:.0f} s):")
    print_table(bars, ["bar", "measured", "target", "verdict"])
    # only the default runs write the committed result files; anything else goes to *_custom
    stem = "calibration_overhead_smoke" if args.smoke else ("calibration_overhead_custom" if custom else
                                                            "calibration_overhead")
    print(f"wrote {write_csv(rows, stem + '.csv')}")
    print(f"wrote {write_csv([{**b, **env} for b in bars], stem + '_bars.csv')}")
    plot(rows, RESULTS / f"{stem}.png", headline)
    print(f"wrote {RESULTS / (stem + '.png')}")


if __name__ == "__main__":
    main()
