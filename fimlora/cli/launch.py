"""Joining the process group a launcher describes (torchrun, accelerate, MPI), for the command line.

The library itself never creates a process group: it works on whatever group the caller's job
set up (``fimlora.distributed``). The CLI is its own job, so it joins one when launched by several
processes, and takes its share of the calibration examples.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..distributed import rank, world_size

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


def shard(items: Sequence) -> list:
    """This rank's share of ``items`` (every world_size-th item from its rank): no overlap, nothing lost."""
    return list(items[rank() :: world_size()])
