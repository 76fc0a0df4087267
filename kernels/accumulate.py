"""Fused per-sample LoRA-B gradient statistics: matmul + Welford in one Triton kernel.

Op
--
For tokens t with output gradients dy_t (d_out) and LoRA activations h_t (r), and S samples given
as disjoint [start, end) token ranges, the per-sample gradient of B is

    G_n = scale * sum_{t in [start_n, end_n)} dy_t h_t^T            (d_out x r)

and ``accumulate_sample_stats`` folds G_1..G_S into a running (count, mean, M2) in place and,
when given an (S,) float32 ``sample_sq``, writes each sample's squared Frobenius norm ||G_n||^2
into it (what fimlora.confidence resamples).

The kernel and how it works: ``accumulate_kernel.py``. This module is the launcher: it
validates the inputs, picks tiles and sample splits, runs the kernel and merges the splits.

Limits
------
- tl.dot needs every tile dimension >= 16 on a GPU, so block sizes are powers of two >= 16 and
  smaller d_out / r / segments are padded with masks (r = 1 works, at 1/16 efficiency).
- r is tiled too, so r in the thousands (h = x, full-weight per-sample statistics) works.
- Pointer offsets are int64, so tensors above 2**31 elements are fine.
- Samples are processed one after another inside a program: a very long sample is not split
  across programs (the token loop is sequential), only the d/r tiles and the samples are.
- Segment values are validated on the host (one device sync) so that a bad range cannot read
  out of bounds; overlapping ranges are not detected (they are counted twice).
- Block sizes come from a small fixed table, not from autotuning.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from .accumulate_kernel import INTERPRET as _INTERPRET  # the mode the kernel was decorated in
from .accumulate_kernel import accumulate_tile_kernel

__all__ = ["accumulate_sample_stats"]

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_DTYPES = (torch.float32, torch.float64)
_MIN_BLOCK = 16  # tl.dot's minimum tile dimension on GPUs

# One fixed configuration under the interpreter: it is slow per program, not per element, so
# moderately large tiles keep the tests fast.
_INTERPRETER_BLOCKS = (32, 32, 32)  # (BLOCK_D, BLOCK_R, BLOCK_T)


def _check_block(name: str, value: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, int) or value < _MIN_BLOCK or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}, got {value!r}")


def _pow2_clamp(n: int, low: int, high: int) -> int:
    """The next power of two >= n, clamped to [low, high]."""
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


def _default_blocks(d_out: int, r: int, half_inputs: bool) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R, BLOCK_T). A small table, not autotuned.

    The three fp32 register tiles (G, mean, M2) of BLOCK_D x BLOCK_R dominate register use, so the
    state tile is capped at 64 x 64; BLOCK_T is the dot's K dimension, larger for 2-byte inputs
    because a chunk then costs half the shared memory.
    """
    if _INTERPRET:
        return _INTERPRETER_BLOCKS
    block_d = _pow2_clamp(d_out, _MIN_BLOCK, 64)
    block_r = _pow2_clamp(r, _MIN_BLOCK, 64)
    block_t = 64 if half_inputs else 32
    return block_d, block_r, block_t


def _default_num_splits(n_samples: int, n_tiles: int, device: torch.device) -> int:
    """Enough sample splits that d-tiles x r-tiles x splits fills the device about twice over."""
    if _INTERPRET or device.type != "cuda":
        return min(2, n_samples)
    return max(1, min(n_samples, math.ceil(2 * _sm_count(device.index) / n_tiles)))


@functools.cache
def _sm_count(index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free per call)."""
    return torch.cuda.get_device_properties(
        index if index is not None else torch.cuda.current_device()
    ).multi_processor_count


def _as_row_major(name: str, x: torch.Tensor) -> torch.Tensor:
    """x unchanged when its inner stride is 1 (any leading stride), else a contiguous copy."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    return x


def _validate(
    dy: torch.Tensor,
    h: torch.Tensor,
    segments: torch.Tensor,
    count: int,
    mean: torch.Tensor,
    m2: torch.Tensor,
) -> None:
    if dy.shape[0] != h.shape[0]:
        raise ValueError(
            f"dy and h must have the same number of tokens T; got {dy.shape[0]} and {h.shape[0]}"
        )
    shape = (dy.shape[1], h.shape[1])
    for name, x in (("mean", mean), ("m2", m2)):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape (d_out, r) = {shape}, got {tuple(x.shape)}")
        if x.dtype not in _STATE_DTYPES:
            raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    if mean.dtype != m2.dtype:
        raise ValueError(f"mean and m2 must share a dtype, got {mean.dtype} and {m2.dtype}")
    if segments.dim() != 2 or segments.shape[1] != 2:
        raise ValueError(f"segments must be (S, 2) [start, end) ranges, got shape {tuple(segments.shape)}")
    if segments.dtype != torch.int64:
        raise ValueError(f"segments must be int64, got {segments.dtype}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    device = dy.device
    for name, x in (("h", h), ("segments", segments), ("mean", mean), ("m2", m2)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but dy is on {device}; put all tensors on one device")
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"dy is on {device}: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "triton is imported to run them on CPU"
        )
    if segments.shape[0]:
        starts, ends = segments[:, 0], segments[:, 1]
        # One sync; it keeps a bad range from reading out of bounds inside the kernel.
        if bool(((starts < 0) | (ends < starts) | (ends > dy.shape[0])).any()):
            raise ValueError(f"segments must satisfy 0 <= start <= end <= T = {dy.shape[0]}")


def accumulate_sample_stats(
    dy: torch.Tensor,
    h: torch.Tensor,
    segments: torch.Tensor,
    scale: float,
    count: int,
    mean: torch.Tensor,
    m2: torch.Tensor,
    *,
    block_d: int | None = None,
    block_r: int | None = None,
    block_t: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    sample_sq: torch.Tensor | None = None,
) -> None:
    """Fold the per-sample gradients G_n = scale * dy[seg_n]^T h[seg_n] into (mean, m2) in place.

    Args:
        dy: (T, d_out) output gradients, float32/float16/bfloat16, inner stride 1 preferred.
        h: (T, r) LoRA activations A x (or x itself for full-weight statistics), same dtypes.
        segments: (S, 2) int64 [start, end) token ranges, one per sample, non-overlapping, any
            order; tokens outside every range are ignored and an empty range is a zero gradient.
        scale: multiplies every G_n (the LoRA scaling alpha / r, or a loss normalisation).
        count: number of gradients already folded into (mean, m2); the caller adds S afterwards.
        mean, m2: (d_out, r) float32/float64 running mean and sum of squared deviations; written in
            place (their storage is kept).
        block_d, block_r, block_t: tile sizes (powers of two >= 16); default from a small table.
        num_splits: how many contiguous shares the samples are split into for parallelism;
            default fills the GPU (1 or 2 under the interpreter).
        num_warps: warps per program (1, 2, 4, 8 or 16); default 8 for 64 x 64 state tiles and
            larger, else 4.
        sample_sq: optional (S,) float32 contiguous tensor on dy's device, overwritten with each
            sample's squared Frobenius norm ||G_n||^2; None computes nothing extra.

    Raises:
        ValueError: naming the offending argument when a shape, dtype, device or range is wrong.
    """
    dy = _as_row_major("dy", dy)
    h = _as_row_major("h", h)
    _validate(dy, h, segments, count, mean, m2)
    _validate_sample_sq(sample_sq, segments, mean, m2)
    for name, value in (("block_d", block_d), ("block_r", block_r), ("block_t", block_t)):
        _check_block(name, value)
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1
    ):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps!r}")

    n_samples = segments.shape[0]
    d_out, r = mean.shape
    if n_samples == 0:
        return
    if mean.numel() == 0:
        if sample_sq is not None:
            sample_sq.zero_()  # a gradient without elements has norm 0
        return

    # Native 2-byte dot only when both operands share the dtype and a real GPU runs the kernel.
    half_inputs = dy.dtype == h.dtype and dy.dtype in (torch.float16, torch.bfloat16)
    dot_fp32 = _INTERPRET or not half_inputs
    default_d, default_r, default_t = _default_blocks(d_out, r, half_inputs)
    block_d, block_r, block_t = block_d or default_d, block_r or default_r, block_t or default_t
    n_tiles = triton.cdiv(d_out, block_d) * triton.cdiv(r, block_r)

    if num_splits is None:
        num_splits = _default_num_splits(n_samples, n_tiles, dy.device)
    # Contiguous shares of equal size; recount so that no split is empty.
    per_split = triton.cdiv(n_samples, min(num_splits, n_samples))
    num_splits = triton.cdiv(n_samples, per_split)

    in_place = num_splits == 1
    if in_place:
        total = count + n_samples
        w_new, w_cross = n_samples / total, count * n_samples / total
        ws_mean = ws_m2 = mean  # unused by the kernel in this mode
    else:
        w_new = w_cross = 0.0
        ws_mean = torch.empty(num_splits, d_out, r, device=dy.device, dtype=torch.float32)
        ws_m2 = torch.empty_like(ws_mean)

    # one partial sum of squares per (tile, sample), summed over tiles below; a single tile
    # writes the norms themselves
    if sample_sq is None:
        ws_sq = mean  # unused by the kernel in this mode
    elif n_tiles == 1:
        ws_sq = sample_sq
    else:
        ws_sq = torch.empty(n_tiles, n_samples, device=dy.device, dtype=torch.float32)

    grid = (triton.cdiv(d_out, block_d), triton.cdiv(r, block_r), num_splits)
    accumulate_tile_kernel[grid](
        dy,
        h,
        segments,
        mean,
        m2,
        ws_mean,
        ws_m2,
        ws_sq,
        d_out,
        r,
        n_samples,
        per_split,
        float(scale),
        w_new,
        w_cross,
        dy.stride(0),
        dy.stride(1),
        h.stride(0),
        h.stride(1),
        segments.stride(0),
        segments.stride(1),
        mean.stride(0),
        mean.stride(1),
        m2.stride(0),
        m2.stride(1),
        d_out * r,
        r,
        BLOCK_D=block_d,
        BLOCK_R=block_r,
        BLOCK_T=block_t,
        DOT_FP32=dot_fp32,
        IN_PLACE=in_place,
        WITH_NORMS=sample_sq is not None,
        # Three fp32 BLOCK_D x BLOCK_R register tiles: spread the largest over 8 warps.
        num_warps=num_warps or (8 if block_d * block_r >= 64 * 64 else 4),
    )
    if not in_place:
        _merge_splits_(ws_mean, ws_m2, n_samples, per_split, count, mean, m2)
    if sample_sq is not None and n_tiles > 1:
        torch.sum(ws_sq, dim=0, out=sample_sq)


def _validate_sample_sq(
    sample_sq: torch.Tensor | None, segments: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> None:
    if sample_sq is None:
        return
    if sample_sq.dtype != torch.float32:
        raise ValueError(f"sample_sq must be float32, got {sample_sq.dtype}")
    if sample_sq.dim() != 1 or sample_sq.shape[0] != segments.shape[0]:
        raise ValueError(
            f"sample_sq must have shape (S,) = ({segments.shape[0]},), one entry per segment, "
            f"got {tuple(sample_sq.shape)}"
        )
    if not sample_sq.is_contiguous():
        raise ValueError("sample_sq must be contiguous (it is written in place)")
    if sample_sq.device != mean.device:
        raise ValueError(f"sample_sq is on {sample_sq.device} but the state is on {mean.device}")
    if sample_sq.numel() and any(
        sample_sq.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in (mean, m2)
    ):
        raise ValueError("sample_sq must not share memory with mean or m2")


def _merge_splits_(
    ws_mean: torch.Tensor,
    ws_m2: torch.Tensor,
    n_samples: int,
    per_split: int,
    count: int,
    mean: torch.Tensor,
    m2: torch.Tensor,
) -> None:
    """Chan-merge the per-split partials, then the result into (mean, m2) in place.

    Vectorised torch ops over the small workspace: the splits' combined mean is the
    count-weighted mean of their means, and their combined M2 is the sum of their M2s plus each
    split's count times its squared distance to the combined mean (the multi-group Chan formula).
    """
    num_splits = ws_mean.shape[0]
    dtype = mean.dtype
    counts = torch.full((num_splits, 1, 1), float(per_split), device=mean.device, dtype=dtype)
    counts[-1] = n_samples - per_split * (num_splits - 1)  # the last share may be short
    part_mean, part_m2 = ws_mean.to(dtype), ws_m2.to(dtype)
    batch_mean = (counts * part_mean).sum(dim=0) / n_samples
    batch_m2 = part_m2.sum(dim=0) + (counts * (part_mean - batch_mean).square()).sum(dim=0)

    total = count + n_samples
    delta = batch_mean - mean
    m2.add_(batch_m2).add_(delta.square(), alpha=count * n_samples / total)
    mean.add_(delta, alpha=n_samples / total)
