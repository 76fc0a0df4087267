"""Data-parallel calibration on an existing torch.distributed process group (DESIGN §8).

Each rank calibrates on its own batches; after the last batch the per-layer moments are merged
across ranks with Chan's formula, in float64, with two all-reduces over one flat buffer:
first the counts and sums (giving the global mean), then each rank's M2 plus its count times
the squared distance of its mean to the global mean (no cancellation, unlike summing raw
second moments). Every rank then holds identical statistics and computes the identical plan.
Per-sample squared norms (statistics with ``track_samples``) are all-gathered, variable-length
vectors padded to the longest rank's and trimmed again, so that every rank holds all samples'
norms in the same order: rank 0's samples, then rank 1's, and so on.
Works with any launcher that sets up the process group: torchrun, accelerate, DDP, FSDP (the
command line joins the group a launcher describes: ``fimlora.cli.launch``).
"""

from __future__ import annotations

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
    all_gather_sample_sq(states)


def all_gather_sample_sq(states: Sequence[LayerStats]) -> None:
    """Replace each tracking state's per-sample squared norms with those of every rank, in rank
    order, on every rank. Two all-gathers: the lengths (per rank and layer; -1 for a state that
    keeps none), then one flat float32 buffer with each layer's norms padded to its longest rank.
    Every rank must pass the same layers; a layer tracked on some ranks only raises on all."""
    if not is_distributed() or not states:
        return
    device = _collective_device()
    world = dist.get_world_size()
    local = torch.tensor([s.num_sample_norms if s.track_samples else -1 for s in states], dtype=torch.int64,
                         device=device)
    gathered_lengths = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered_lengths, local)
    lengths = torch.stack(gathered_lengths).cpu()  # (world, layers)
    tracked = lengths >= 0
    if not bool(tracked.any()):
        return
    if not bool(tracked.all(dim=0).eq(tracked.any(dim=0)).all()):
        raise RuntimeError("per-sample norms are kept on some ranks but not on others; "
                           "calibrate with the same confidence= setting on every rank")
    widths = lengths.clamp(min=0).max(dim=0).values.tolist()  # per layer: the longest rank's
    offsets = [0]
    for width in widths:
        offsets.append(offsets[-1] + width)
    if offsets[-1] == 0:
        return  # nothing kept anywhere
    flat = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
    for i, state in enumerate(states):
        if state.track_samples:
            flat[offsets[i] : offsets[i] + state.num_sample_norms] = state._kept_sample_sq().to(device)
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    for i, state in enumerate(states):
        if state.track_samples:
            parts = [everyone[k][offsets[i] : offsets[i] + int(lengths[k, i])] for k in range(world)]
            state.set_sample_sq_(torch.cat(parts))
