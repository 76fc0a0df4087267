"""Which tokens form each sample of a batch (DESIGN §2: a sample is one row of a padded batch
or one segment of a packed row).

A batch's layout is a per-token sample id (-1 for padding) and, equivalently, one contiguous
[start, end) range per sample in the flattened (N * L) token order: the ``segments`` that the
accumulate op takes. Packed rows are recognised from ``position_ids`` that restart (a new
sample starts where the position does not increase) or from flash-attention style
``cu_seq_lens`` offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CU_SEQLEN_KEYS = ("cu_seq_lens", "cu_seqlens", "cu_seq_lens_q")


@dataclass
class SampleLayout:
    index: torch.Tensor  # (N, L) long: sample id of each token, -1 where the token is in no sample
    segments: torch.Tensor  # (S, 2) long: [start, end) of each sample in the flattened N * L order
    packed: bool  # True when a row can hold several samples

    @property
    def num_samples(self) -> int:
        return int(self.segments.shape[0])


def _starts_from_packing(batch: dict, mask: torch.Tensor) -> torch.Tensor | None:
    """Boolean (N, L): where a packed sample starts, or None when the batch is not packed."""
    for key in _CU_SEQLEN_KEYS:
        if key in batch:
            offsets = batch[key].flatten().long().to(mask.device)
            starts = torch.zeros(mask.numel() + 1, dtype=torch.bool, device=mask.device)
            starts[offsets] = True
            return starts[: mask.numel()].view_as(mask)
    positions = batch.get("position_ids")
    if positions is None or positions.shape != mask.shape:
        return None
    restart = torch.ones_like(mask)
    restart[:, 1:] = positions[:, 1:] <= positions[:, :-1]
    if not bool((restart[:, 1:] & mask[:, 1:] & mask[:, :-1]).any()):
        return None  # positions never restart inside real tokens: one sample per row
    return restart


def sample_layout(batch: dict) -> SampleLayout:
    """The layout of ``batch`` (its ``attention_mask``, and ``position_ids``/``cu_seq_lens`` if packed)."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    n, length = mask.shape
    starts = _starts_from_packing(batch, mask)
    packed = starts is not None
    if packed:
        # a sample also starts after any padding, so every sample's tokens are contiguous
        previous_real = torch.zeros_like(mask)
        previous_real[:, 1:] = mask[:, :-1]
        begins = mask & (starts | ~previous_real)
    else:
        lengths = mask.sum(dim=1)
        positions = torch.arange(length, device=mask.device).expand(n, length)
        first = torch.where(mask, positions, length).min(dim=1).values
        last = torch.where(mask, positions, -1).max(dim=1).values
        if bool(((last - first + 1 != lengths) & (lengths > 0)).any()):
            raise ValueError(
                "attention_mask rows must be contiguous (left or right padding only); a row has a gap. "
                "For packed rows pass position_ids that restart at each sample, or cu_seq_lens"
            )
        # every row is one sample, even an empty one, so that sample i is row i
        begins = torch.zeros_like(mask)
        begins[torch.arange(n, device=mask.device), torch.where(lengths > 0, first, 0)] = True
    flat_begins = begins.flatten()
    index = torch.cumsum(flat_begins.long(), dim=0) - 1
    index = torch.where(mask.flatten(), index, torch.full_like(index, -1)).view(n, length)
    begin_positions = flat_begins.nonzero().flatten()
    counts = torch.bincount(index.flatten()[index.flatten() >= 0], minlength=begin_positions.numel())
    segments = torch.stack([begin_positions, begin_positions + counts], dim=1)
    return SampleLayout(index=index, segments=segments, packed=packed)


def row_segments(num_rows: int, device=None) -> torch.Tensor:
    """Segments for layers that see one position per row (after pooling): row i is [i, i+1)."""
    rows = torch.arange(num_rows, device=device)
    return torch.stack([rows, rows + 1], dim=1)


def whole_rows(num_rows: int, length: int, device=None) -> torch.Tensor:
    """Segments that make each row of ``length`` positions one sample: row i is [i*L, (i+1)*L)."""
    starts = torch.arange(num_rows, device=device) * length
    return torch.stack([starts, starts + length], dim=1)
