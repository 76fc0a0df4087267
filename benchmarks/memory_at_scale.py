"""Computed (not measured) per-GPU memory of calibrating LLaMA-3-8B-shaped models.

The model is built on the meta device from its published config numbers (``LLAMA_SHAPES`` in
benchmarks/_workloads.py; no weights, no hub access), fimlora's own target discovery lists the
adapted layers, and the bytes of each part are counted exactly: weights, fimlora's statistics (mean + M2 per LoRA-B element), the
calibration A matrices, and the h = A x activations kept from forward to backward. The
activation floor of forward + activation-only backward is the model's own and is estimated
with the formula printed beside it (labelled as an estimate); measure it on a GPU with
benchmarks/gpu_check.sh when one is available.

    python benchmarks/memory_at_scale.py [--smoke]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_csv  # noqa: E402
from _workloads import AT_SCALE_MODELS, meta_llama  # noqa: E402

from fimlora.targets import find_targets, layer_shape  # noqa: E402

GIB = 2**30


def account(name: str, *, n: int, length: int, rank: int, checkpointing: bool) -> dict:
    model = meta_llama(name)
    config = model.config
    shapes = [layer_shape(m) for m in find_targets(model, "all-linear").values()]
    tokens = n * length
    weights = sum(p.numel() for p in model.parameters()) * 2  # bf16
    stats = sum(d_out * rank for _, d_out in shapes) * 2 * 4  # mean + M2, fp32
    a_matrices = sum(d_in * rank for d_in, _ in shapes) * 4  # fp32
    h_kept = len(shapes) * tokens * rank * 2  # bf16, one per layer from forward to backward
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    # Estimate of the model's own activations kept for the backward in bf16: about 10 hidden-size
    # and 3 intermediate-size tensors per block (norms, q/k/v/o, residuals; gate, up, act); with
    # checkpointing, one hidden state per block plus one block's worth. Logits and their
    # gradient are fp32 over the vocabulary.
    per_block = tokens * (10 * hidden + 3 * inter) * 2
    kept = (layers * tokens * hidden * 2 + per_block) if checkpointing else layers * per_block
    logits = 2 * tokens * config.vocab_size * 4
    floor = weights + kept + logits
    return {
        "model": name, "N": n, "L": length, "calib_rank": rank, "checkpointing": checkpointing,
        "target_layers": len(shapes),
        "weights_GiB": round(weights / GIB, 2),
        "fimlora_stats_MiB": round(stats / 2**20, 1),
        "fimlora_A_MiB": round(a_matrices / 2**20, 1),
        "fimlora_h_MiB": round(h_kept / 2**20, 1),
        "fimlora_total_MiB": round((stats + a_matrices + h_kept) / 2**20, 1),
        "floor_estimate_GiB": round(floor / GIB, 1),
        "total_estimate_GiB": round((floor + stats + a_matrices + h_kept) / GIB, 1),
        "kind": "computed",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    grid = [("llama-3-8b", 8, 2048, 8, True)] if args.smoke else [
        (model, 8, 2048, r, ckpt) for model in AT_SCALE_MODELS for r in (8, 16) for ckpt in (True, False)
    ]
    rows = [account(m, n=n, length=length, rank=r, checkpointing=c) for m, n, length, r, c in grid]
    print_table(rows, list(rows[0]))
    print(f"wrote {write_csv(rows, 'memory_at_scale_smoke.csv' if args.smoke else 'memory_at_scale.csv')}")


if __name__ == "__main__":
    main()
