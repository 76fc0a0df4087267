"""Calibration at LLaMA-3-8B scale on one GPU (issue 7): step time and peak memory against the
floor, peak memory against a full-model diagonal Fisher, and the time for the default 8 batches.

The model is LLaMA-3-8B-shaped (published config numbers, `_workloads.LLAMA_SHAPES`) with random
bf16 weights made on the device (no download, no float32 copy). On the same batches of N x L
random tokens, side by side in one process:

- floor: forward + activation-only backward with no statistic at all (the embeddings' output
  requires grad), what any method of per-sample gradients must run at least;
- fimlora: ``fimlora.calibrate`` (hooks, h = A x, fused accumulate) with the default backend;
- fisher: ``fimlora.full_fisher`` (h = x, per-sample statistics of every full weight), with
  fimlora and the floor again at its own, smaller batch, since its statistics alone take
  8 bytes per weight.

Time: CUDA-synchronised wall clock of whole passes over the batches, the methods taking turns
(``--repeats`` rounds after one warm-up round); per step = pass / batches. Memory:
``torch.cuda.max_memory_allocated`` over one pass, minus what was allocated before it (the
model). A method that runs out of memory is recorded as such. Gradient checkpointing
(non-reentrant) is on by default, as an 8 x 2048 calibration of an 8B model would use.

    python benchmarks/calibration_at_scale.py                 # the GPU run (about 3 minutes on an H200)
    python benchmarks/calibration_at_scale.py --smoke         # tiny model, CPU, checks the plumbing
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, paired_ratio, print_table, synchronize, write_csv  # noqa: E402
from _contenders import floor_pass  # noqa: E402
from _memory import measure_peak  # noqa: E402
from _workloads import AT_SCALE_MODELS, freeze, llama_config, token_batches  # noqa: E402

import fimlora  # noqa: E402

GIB = 2**30
STEP_GOAL = 1.03  # calibration step / floor step
TOTAL_GOAL_S = 60.0  # 8 batches of 8 x 2048 tokens


def build_model(name: str, *, device: str, dtype: torch.dtype, length: int, checkpointing: bool, seed: int = 0):
    """A Llama with random weights made directly on ``device`` in ``dtype``: the module tree is
    built on the meta device, then given storage and filled (N(0, 0.02) matrices, unit norms)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(name, max_position_embeddings=max(length, 2048), attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)  # cast while on meta: no float32 copy is ever allocated
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            else:
                parameter.fill_(1.0)  # RMSNorm weights
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # to_empty left its buffers unset
    freeze(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in train mode; Llama has no dropout
    else:
        model.eval()
    return model


def measure(name: str, run, device: str) -> dict:
    """Seconds and peak extra bytes (``_memory.measure_peak``) of one pass; 'oom' when the device
    runs out of memory, 'error' when the method fails."""

    def timed() -> float:
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        return time.perf_counter() - started

    try:
        seconds, memory = measure_peak(timed, device)
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()  # what the failed pass cached must not crowd the next contender
        return {"method": name, "status": "oom", "error": str(error).splitlines()[0][:200]}
    except Exception as error:  # a backend that fails here must not cost the other measurements
        return {"method": name, "status": "error", "error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
    return {"method": name, "status": "ok", "seconds": seconds, "peak_extra_bytes": memory["peak_extra_bytes"]}


def methods(model, batches, *, rank: int, train: bool, fisher: bool, backend: str) -> dict:
    def calibrate():
        fimlora.calibrate(model, batches, num_batches=len(batches), rank=rank, train=train, backend=backend,
                          progress=False)

    def full_fisher():
        fimlora.full_fisher(model, batches, num_batches=len(batches), backend=backend, progress=False)

    chosen = {"floor": lambda: floor_pass(model, batches, "causal-lm"), "fimlora": calibrate}
    if fisher:
        chosen["full-fisher"] = full_fisher
    return chosen


def run_point(model, batches, *, label: str, rank: int, train: bool, fisher: bool, repeats: int, device: str,
              backend: str = "auto") -> list[dict]:
    """Every method once to warm up, then ``repeats`` rounds taking turns: the median pass, and
    time ratios to the floor paired round by round (``paired_ratio``). When
    the chosen backend fails in the warm-up, the point is measured with the torch backend instead
    (and says so), so that one broken kernel does not cost the run."""
    contenders = methods(model, batches, rank=rank, train=train, fisher=fisher, backend=backend)
    warmup = {name: measure(name, run, device) for name, run in contenders.items()}
    failed = {name: r["error"] for name, r in warmup.items() if r["status"] == "error" and name != "floor"}
    if failed and backend != "torch":
        print(f"{label}: backend {backend!r} failed ({failed}); measuring with backend 'torch' instead")
        rows = run_point(model, batches, label=label, rank=rank, train=train, fisher=fisher, repeats=repeats,
                         device=device, backend="torch")
        return [{**row, "note": f"backend {backend!r} failed: {failed.get(row['method'], '')}"} for row in rows]
    records: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            records[name].append(measure(name, run, device))
    n, length = batches[0]["input_ids"].shape
    rows = []
    complete = {name: all(r["status"] == "ok" for r in results) for name, results in records.items()}
    for name, results in records.items():
        row = {"point": label, "method": name, "N": n, "L": length, "batches": len(batches), "backend": backend}
        if not complete[name]:
            bad = next(r for r in results if r["status"] != "ok")
            rows.append({**row, "status": bad["status"], "note": bad["error"]})
            continue
        seconds = statistics.median(r["seconds"] for r in results)
        peak = max(r["peak_extra_bytes"] for r in results)
        rows.append({**row, "status": "ok", "pass_s": round(seconds, 4), "step_s": round(seconds / len(batches), 4),
                     "peak_extra_GiB": round(peak / GIB, 3)})
        if complete.get("floor"):
            floor = records["floor"]
            row = rows[-1]
            row["x_floor_time"] = round(paired_ratio([r["seconds"] for r in results], [r["seconds"] for r in floor]), 3)
            row["over_floor_GiB"] = round((peak - max(r["peak_extra_bytes"] for r in floor)) / GIB, 3)
    return rows


def verdicts(rows: list[dict], *, full_size: bool) -> list[str]:
    lines = []
    main = {r["method"]: r for r in rows if r["point"] == "main" and r["status"] == "ok"}
    if "fimlora" in main and "floor" in main:
        # the goals are set for LLaMA-3-8B at 8 batches of 8 x 2048 tokens: no verdict elsewhere
        def verdict(ok: bool) -> str:
            return ("PASS" if ok else "FAIL") if full_size else "n/a (not the full-size point)"

        ratio, total = main["fimlora"]["x_floor_time"], main["fimlora"]["pass_s"]
        lines.append(f"calibration step / floor step: {ratio:.3f}x (goal <= {STEP_GOAL}x): {verdict(ratio <= STEP_GOAL)}")
        lines.append(f"fimlora, {main['fimlora']['batches']} batches: {total:.2f} s (goal < {TOTAL_GOAL_S:.0f} s): "
                     f"{verdict(total < TOTAL_GOAL_S)}")
    fisher = {r["method"]: r for r in rows if r["point"] == "fisher"}
    if fisher.get("full-fisher", {}).get("status") == "oom":
        lines.append("full-model Fisher ran out of device memory at its batch: " + fisher["full-fisher"]["note"])
    elif all(fisher.get(m, {}).get("over_floor_GiB", "") != "" for m in ("full-fisher", "fimlora")):
        ours, theirs = fisher["fimlora"]["over_floor_GiB"], fisher["full-fisher"]["over_floor_GiB"]
        lines.append(f"memory over the floor at the Fisher batch: fimlora {ours:.3f} GiB, full Fisher {theirs:.2f} GiB"
                     + (f" ({theirs / ours:.0f}x)" if ours > 0 else ""))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2 batches of 2 x 16")
    parser.add_argument("--model", default="llama-3-8b", choices=AT_SCALE_MODELS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=8, help="samples per batch")
    parser.add_argument("--length", type=int, default=2048, help="tokens per sample")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches (fimlora's default, 8)")
    parser.add_argument("--fisher-n", type=int, default=1, help="samples per batch of the full-Fisher point")
    parser.add_argument("--fisher-batches", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="calibration rank")
    parser.add_argument("--backend", default="auto", help="accumulate backend (falls back to torch if it fails)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up round")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--no-fisher", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.n, args.length, args.batches, args.repeats = "smoke-llama", "cpu", 2, 16, 2, 1
    elif not args.device.startswith("cuda"):
        print(f"{args.model} needs a CUDA device (its bf16 weights alone are tens of GB); use --smoke on a CPU",
              file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32  # no bf16 matmuls on small CPUs
    full_size = args.model == "llama-3-8b" and (args.n, args.length, args.batches) == (8, 2048, 8)
    checkpointing = not args.no_checkpointing
    print(f"{args.model} on {args.device} ({dtype}), gradient checkpointing {'on' if checkpointing else 'off'}")
    started = time.perf_counter()
    model = build_model(args.model, device=args.device, dtype=dtype, length=args.length, checkpointing=checkpointing)
    weights = sum(p.numel() for p in model.parameters())
    print(f"built {weights / 1e9:.2f}B parameters in {time.perf_counter() - started:.1f} s")
    vocab = model.config.vocab_size
    to_device = lambda batches: [{k: v.to(args.device) for k, v in b.items()} for b in batches]  # noqa: E731
    batches = to_device(token_batches(args.n, args.length, args.batches, vocab))
    name = "calibration_at_scale_smoke.csv" if args.smoke else f"calibration_at_scale_{args.device.split(':')[0]}.csv"
    extra = dict(model=args.model, params=weights, dtype=str(dtype).removeprefix("torch."), **environment(args.device))

    def save(rows: list[dict]) -> Path:  # after every point: a run cut short keeps what it measured
        return write_csv([{**row, **extra, "checkpointing": checkpointing and row["point"] == "main"} for row in rows],
                         name)

    rows = run_point(model, batches, label="main", rank=args.rank, train=checkpointing, fisher=False,
                     repeats=args.repeats, device=args.device, backend=args.backend)
    path = save(rows)
    if not args.no_fisher:
        # full_fisher runs the model as it is: without checkpointing, at a batch its statistics leave room for
        if checkpointing:
            model.gradient_checkpointing_disable()
            model.eval()
        fisher_batches = to_device(token_batches(args.fisher_n, args.length, args.fisher_batches, vocab, seed=1))
        rows += run_point(model, fisher_batches, label="fisher", rank=args.rank, train=False, fisher=True,
                          repeats=1, device=args.device, backend=args.backend)
        path = save(rows)
    print_table(rows, ["point", "method", "backend", "N", "L", "batches", "status", "pass_s", "step_s", "x_floor_time",
                       "peak_extra_GiB", "over_floor_GiB"])
    for line in verdicts(rows, full_size=full_size):
        print(line)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
