"""How stable is a FIM-LoRA rank map? Calibration only, no training.

For each task: calibrate on K disjoint subsets of the training subsample (same calibration-A
seed and head), on one subset with K different A seeds, and with K different classifier-head
initialisations (the head is random at calibration time); compare the score maps and the rank maps
pairwise (Spearman, Kendall tau-b). Also variance vs fisher on the same calibration. Saves the
seed-0 plans as JSON and their heatmaps (layers x module types) as PNG.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import write_csv
from _quality_methods import BASE_ALPHA, BASE_RANK, TARGETS
from _quality_stats import agreement, pairwise_agreement
from _quality_train import load_classifier

from fimlora import calibrate, make_plan
from fimlora.data import make_batches

SCORES = ("variance", "fisher")


def _calibrate(model, features, pad: int, batch_size: int, num_batches: int, seed: int):
    batches = make_batches(features, batch_size=batch_size, pad_token_id=pad, num_batches=num_batches)
    return calibrate(model, batches, targets=TARGETS, task="seq-cls", num_batches=num_batches, seed=seed,
                     progress=False)


def run_stability(specs, cache, cfg, results: Path, prefix: str, *, repeats: int = 4, num_batches: int = 8) -> Path:
    """Write ``<prefix>_stability.csv`` (one row per task x factor x score x map kind) and the heatmaps."""
    from quality import model_dir

    rows = []
    for spec in specs:
        data, features = cache.get(spec)
        model = load_classifier(model_dir(), data, seed=0)  # head seed 0, as in the main table's seed 0
        train = features["train"]
        batches = min(num_batches, len(train) // (repeats * cfg.batch_size))
        if batches < 1:
            raise ValueError(f"{spec.name}: {len(train)} training examples cannot make {repeats} disjoint subsets")
        # Disjoint subsets: a fixed shuffle of the subsample, cut into consecutive chunks.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(777)).tolist()
        chunk = cfg.batch_size * batches
        subsets = [[train[i] for i in order[k * chunk:(k + 1) * chunk]] for k in range(repeats)]
        started = time.perf_counter()
        by_data = [_calibrate(model, s, cache.pad, cfg.batch_size, batches, seed=0) for s in subsets]
        by_seed = [by_data[0]] + [_calibrate(model, subsets[0], cache.pad, cfg.batch_size, batches, seed=s)
                                  for s in range(1, repeats)]
        # The classifier head is freshly drawn before calibration, so its seed is a third factor.
        by_head = [by_data[0]] + [_calibrate(load_classifier(model_dir(), data, seed=h), subsets[0], cache.pad,
                                             cfg.batch_size, batches, seed=0) for h in range(1, repeats)]
        seconds = (time.perf_counter() - started) / (3 * repeats - 2)
        for score in SCORES:
            plans = {factor: [make_plan(r, base_rank=BASE_RANK, base_alpha=BASE_ALPHA, score=score) for r in results_]
                     for factor, results_ in (("data", by_data), ("calib_seed", by_seed), ("head_seed", by_head))}
            for factor, factor_plans in plans.items():
                for kind in ("scores", "ranks"):
                    maps = [[getattr(lp, kind[:-1]) for lp in p.layers] for p in factor_plans]
                    rows.append({"task": spec.name, "factor": factor, "score": score, "map": kind,
                                 **pairwise_agreement(maps), "calib_seconds": round(seconds, 2)})
            plan = plans["data"][0]
            plan.calibration["model"] = "all-MiniLM-L6-v2"
            plan.save(results / f"{prefix}_plan_{spec.name}_{score}.json")
            plan.plot(results / f"{prefix}_rankmap_{spec.name}_{score}.png",
                      title=f"{spec.name}: FIM-LoRA ({score}) ranks, all-MiniLM-L6-v2, budget = uniform r=8")
        # The two scores on the very same calibration: do they even disagree?
        for kind in ("scores", "ranks"):
            pairs = []
            for r in by_data:
                v = make_plan(r, base_rank=BASE_RANK, base_alpha=BASE_ALPHA, score="variance")
                f = make_plan(r, base_rank=BASE_RANK, base_alpha=BASE_ALPHA, score="fisher")
                pairs.append(agreement([getattr(lp, kind[:-1]) for lp in v.layers],
                                       [getattr(lp, kind[:-1]) for lp in f.layers]))
            rows.append({"task": spec.name, "factor": "variance_vs_fisher", "score": "both", "map": kind,
                         "pairs": len(pairs), "spearman_mean": sum(p[0] for p in pairs) / len(pairs),
                         "spearman_min": min(p[0] for p in pairs), "kendall_mean": sum(p[1] for p in pairs) / len(pairs),
                         "kendall_min": min(p[1] for p in pairs), "calib_seconds": round(seconds, 2)})
        print(f"stability {spec.name}: {3 * repeats - 2} calibrations, {seconds:.1f}s each", flush=True)
    return write_csv(rows, f"{prefix}_stability.csv", results)
