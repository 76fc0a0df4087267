"""Worker for the 2-process gloo tests (spawned; must be importable by the children)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from models import batches_of, random_samples, tiny_llama

import fimlora

SAMPLES = 8


def shares(case: str, rank: int):
    samples = random_samples(SAMPLES, seed=11)
    if case == "unequal":  # 3 samples on rank 0, 5 on rank 1: different numbers of batches too
        return samples[:3] if rank == 0 else samples[3:]
    return samples[rank::2]


def wrap(model, wrapper: str):
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if wrapper == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


CASES = [("equal", "none"), ("unequal", "none"), ("equal", "ddp"), ("equal", "fsdp2")]


GATHER_LENGTHS = [(3, 5), (0, 2), (4, 0)]  # per layer: how many norms rank 0 and rank 1 keep


def gather_variable_lengths(rank: int) -> list[torch.Tensor]:
    """all_gather_sample_sq on layers whose ranks keep different numbers of norms (none, too):
    rank k's i-th norm of layer l is 100 k + 10 l + i, so the result shows the order."""
    from fimlora.distributed import all_gather_sample_sq
    from fimlora.stats import LayerStats

    states = []
    for layer, lengths in enumerate(GATHER_LENGTHS):
        state = LayerStats.zeros(2, 1, track_samples=True)
        state.add_sample_sq_(100.0 * rank + 10 * layer + torch.arange(lengths[rank], dtype=torch.float32))
        states.append(state)
    states.append(LayerStats.zeros(2, 1))  # a layer without norms on every rank is left alone
    all_gather_sample_sq(states)
    return [s._kept_sample_sq().clone() for s in states[:-1]]


def auto_stop(rank: int) -> dict:
    """num_batches="auto" with different data on each rank: the ranks must stop together, on the
    merged statistics, and write the same plan."""
    from peft import LoraConfig

    samples = random_samples(96, seed=5)[rank::2]
    plan = fimlora.plan_model(tiny_llama(), batches_of(samples, 4), LoraConfig(r=4, target_modules="all-linear"),
                              num_batches="auto", max_batches=12, progress=False)
    return {"stop": plan.calibration["stop"], "ranks": plan.ranks, "samples": plan.calibration["samples"]}


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Every case in one process group (one spawn: starting processes is the slow part)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        warnings.simplefilter("ignore")
        for case, wrapper in CASES:
            model = wrap(tiny_llama(), wrapper)
            result = fimlora.calibrate(model, batches_of(shares(case, rank), 2), num_batches=8, progress=False)
            plan = fimlora.make_plan(result, base_rank=4)
            stats = {name: (s.count, s.mean, s.m2) for name, s in result.stats.items()}
            sample_sq = {name: s.sample_sq().clone() for name, s in result.stats.items()}
            out = {"stats": stats, "sample_sq": sample_sq, "ranks": plan.ranks, "settings": result.settings.to_dict()}
            torch.save(out, f"{out_dir}/{case}-{wrapper}-{rank}.pt")
        torch.save(gather_variable_lengths(rank), f"{out_dir}/gather-{rank}.pt")
        torch.save(auto_stop(rank), f"{out_dir}/auto-{rank}.pt")
    finally:
        dist.destroy_process_group()
