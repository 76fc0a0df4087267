"""Data-parallel calibration on an existing torch.distributed process group (DESIGN §8).

Each rank calibrates on its own batches; after the last batch the per-layer moments are merged
across ranks with Chan's formula, in float64, with two all-reduces over one flat buffer:
first the counts and sums (giving the global mean), then each rank's M2 plus its count times
the squared distance of its mean to the global mean (no cancellation, unlike summing raw
second moments). Every rank then holds identical statistics and computes the identical plan.
Works with any launcher that sets up the process group: torchrun, accelerate, DDP, FSDP.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .stats import LayerStats


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


# Launchers announce the world size in different variables: torchrun (and accelerate on GPUs) in
# WORLD_SIZE; MPI, which `accelerate launch --cpu --num_processes N` uses, in its own.
_MPI_WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    for name in ("WORLD_SIZE", *_MPI_WORLD_SIZE_VARIABLES):
        if name in os.environ:
            return int(os.environ[name])
    return 1


def init_from_environment() -> bool:
    """Join the process group that torchrun, accelerate or MPI describe in the environment.
    Returns True when this call created it (the caller then destroys it)."""
    if launched_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if "WORLD_SIZE" not in os.environ:
        _init_with_accelerate()
        return True
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def _init_with_accelerate() -> None:
    """An MPI launch: accelerate knows how to turn its variables into a process group."""
    try:
        from accelerate import PartialState
    except ImportError as error:
        raise RuntimeError(
            f"launched by MPI with {launched_world_size()} processes, but joining an MPI launch needs accelerate: "
            "pip install accelerate, or launch with torchrun"
        ) from error
    # MPI is accelerate's launcher for CPU processes; PartialState reads the CPU choice from its argument
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" or not torch.cuda.is_available()
    PartialState(cpu=on_cpu)
    if not dist.is_initialized():
        raise RuntimeError(
            f"accelerate did not set up a process group for this MPI launch of {launched_world_size()} processes; "
            "launch with `accelerate launch --cpu ...` or torchrun"
        )


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_counts(values: Sequence[int]) -> list[int]:
    """Sum small integer counters (samples, tokens, batches) over all ranks."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def all_reduce_stats(states: Sequence[LayerStats]) -> None:
    """Merge every rank's statistics in place so that all ranks hold the statistics of all data."""
    if not is_distributed() or not states:
        return
    device = _collective_device()
    sizes = [s.mean.numel() for s in states]
    counts = torch.tensor([float(s.count) for s in states], dtype=torch.float64, device=device)
    local_counts = counts.repeat_interleave(torch.tensor(sizes, device=device))
    local_means = torch.cat([s.mean.detach().to(device, torch.float64).flatten() for s in states])
    sums = local_means * local_counts
    dist.all_reduce(counts)
    dist.all_reduce(sums)
    total = counts.repeat_interleave(torch.tensor(sizes, device=device))
    global_means = sums / total.clamp(min=1)
    spread = torch.cat([s.m2.detach().to(device, torch.float64).flatten() for s in states])
    spread += local_counts * (local_means - global_means).square()
    dist.all_reduce(spread)
    for state, mean, m2, count in zip(states, global_means.split(sizes), spread.split(sizes), counts.tolist(), strict=True):
        state.mean.copy_(mean.view_as(state.mean))
        state.m2.copy_(m2.view_as(state.m2))
        state.count = int(count)


def shard(items: Sequence) -> list:
    """This rank's share of ``items`` (every world_size-th item from its rank): no overlap, nothing lost."""
    return list(items[rank() :: world_size()])
