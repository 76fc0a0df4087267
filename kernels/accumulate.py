"""Fused per-sample LoRA-B gradient statistics: matmul + Welford in one Triton kernel.

Op
--
For tokens t with output gradients dy_t (d_out) and LoRA activations h_t (r), and S samples given
as disjoint [start, end) token ranges, the per-sample gradient of B is

    G_n = scale * sum_{t in [start_n, end_n)} dy_t h_t^T            (d_out x r)

and ``accumulate_sample_stats`` folds G_1..G_S into a running (count, mean, M2) in place and,
when given an (S,) float32 ``sample_sq``, writes each sample's squared Frobenius norm ||G_n||^2
into it (what fimlora.confidence resamples).

What is fused
-------------
One program owns a BLOCK_D x BLOCK_R tile of the statistics. For each of its samples it walks the
sample's tokens in BLOCK_T chunks, accumulates ``dy_chunk^T @ h_chunk`` with ``tl.dot`` into fp32
registers, scales the result and folds it into a running (n, mean, M2) tile with Welford's
update, still in registers. The per-sample tensor (S, d_out, r) therefore never exists in memory,
and nothing but the statistics (or a small per-split partial) is ever written.

What is read once
-----------------
Each token's dy row is read once per r-tile (exactly once when r fits one tile, the LoRA case)
and each h row once per d-tile; h is r/d_out the size of dy, so the re-reads are cheap. Tokens in
no segment (padding) are never read. Each sample belongs to exactly one split, so splitting the
samples for parallelism adds no reads.

Per-sample squared norms
------------------------
With ``sample_sq``, each program also reduces its finished G_n tile to the tile's sum of squares
(the tile is already in registers) and stores it to a (d-tiles x r-tiles, S) fp32 workspace; one
``sum`` over tiles afterwards gives the norms, in a fixed order (no atomics: deterministic).
With a single tile the program writes ``sample_sq`` itself. Without it nothing extra runs (the
branch is a compile-time constant).

Parallelism and the split merge
-------------------------------
The grid is (d-tiles, r-tiles, sample splits). A small d_out x r gives few tiles, so the samples
are also split into ``num_splits`` contiguous shares. With one split the kernel merges its
(n, mean, M2) tile straight into the state with Chan's formula, in place. With more, each split
writes its partial (mean, M2) to an fp32 workspace of shape (num_splits, d_out, r) (its count is
known on the host) and the partials and the previous state are merged afterwards by a handful of
vectorised torch ops over that workspace (the multi-group form of Chan's formula), still writing
the state tensors in place.

Numerics
--------
Loads are in the storage dtype; all statistics are fp32 (or the state's fp64 for the final
merge). fp32 inputs use ``input_precision="ieee"`` so the dot is exact-ish against a float64
oracle rather than TF32. fp16/bf16 inputs (both the same dtype) dot in their native dtype with
fp32 accumulation on a GPU; mixed input dtypes are upcast to fp32. Triton's CPU interpreter has no
bf16 arithmetic, so under TRITON_INTERPRET=1 every load is cast to fp32 right away. Welford/Chan
keep the variance accurate when |mean| >> std, where a sum of squares cancels catastrophically.

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
import os

import torch
import triton
import triton.language as tl

__all__ = ["accumulate_sample_stats"]

# triton.jit decides at decoration time (this import) whether kernels are interpreted, so read the
# environment at the same moment: that is the mode the kernels below actually run in.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_DTYPES = (torch.float32, torch.float64)
_MIN_BLOCK = 16  # tl.dot's minimum tile dimension on GPUs

# One fixed configuration under the interpreter: it is slow per program, not per element, so
# moderately large tiles keep the tests fast.
_INTERPRETER_BLOCKS = (32, 32, 32)  # (BLOCK_D, BLOCK_R, BLOCK_T)


@triton.jit
def _accumulate_kernel(
    dy_ptr,
    h_ptr,
    seg_ptr,
    mean_ptr,
    m2_ptr,
    ws_mean_ptr,
    ws_m2_ptr,
    sq_ptr,
    D,
    R,
    S,
    samples_per_split,
    scale,
    w_new,
    w_cross,
    stride_dy_t,
    stride_dy_d,
    stride_h_t,
    stride_h_r,
    stride_seg_s,
    stride_seg_c,
    stride_mean_d,
    stride_mean_r,
    stride_m2_d,
    stride_m2_r,
    stride_ws_s,
    stride_ws_d,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IN_PLACE: tl.constexpr,
    WITH_NORMS: tl.constexpr,
):
    """One BLOCK_D x BLOCK_R tile of the statistics over one contiguous share of the samples.

    IN_PLACE: merge into (mean, m2) with Chan's weights w_new = n/(count+n) and
    w_cross = count*n/(count+n); otherwise write this split's partial mean and M2 to the workspace.
    DOT_FP32: upcast loads to fp32 and use an IEEE fp32 dot; otherwise dot in the storage dtype.
    WITH_NORMS: store each sample's sum of squares over this tile at sq_ptr[tile * S + sample].
    """
    # int64 before any multiplication by a stride: offsets can exceed 2**31.
    pid_d = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_d = offs_d < D
    mask_r = offs_r < R
    arange_t = tl.arange(0, BLOCK_T)

    s_begin = pid_s * samples_per_split
    s_end = tl.minimum(s_begin + samples_per_split, S)

    mean = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    for k in range(s_begin, s_end):
        start = tl.load(seg_ptr + k * stride_seg_s)
        end = tl.load(seg_ptr + k * stride_seg_s + stride_seg_c)
        g = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs_t = t0 + arange_t  # int64: start is int64
            mask_t = offs_t < end
            # Both tiles are loaded token-major (rows of dy and h are contiguous in memory).
            dy = tl.load(
                dy_ptr + offs_t[:, None] * stride_dy_t + offs_d[None, :] * stride_dy_d,
                mask=mask_t[:, None] & mask_d[None, :],
                other=0.0,
            )
            h = tl.load(
                h_ptr + offs_t[:, None] * stride_h_t + offs_r[None, :] * stride_h_r,
                mask=mask_t[:, None] & mask_r[None, :],
                other=0.0,
            )
            if DOT_FP32:
                g = tl.dot(tl.trans(dy.to(tl.float32)), h.to(tl.float32), g, input_precision="ieee")
            else:
                g = tl.dot(tl.trans(dy), h, g)  # fp16/bf16 tensor cores, fp32 accumulator
        g = g * scale
        if WITH_NORMS:
            # masked rows/columns of g are exact zeros: the sum is over this tile's real elements
            tile = pid_d * tl.num_programs(1) + pid_r
            tl.store(sq_ptr + tile * S + k, tl.sum(tl.sum(g * g, axis=1), axis=0))
        # Welford: n-th sample of this split, counted from 1.
        n = (k - s_begin + 1).to(tl.float32)
        delta = g - mean
        mean += delta / n
        m2 += delta * (g - mean)

    if IN_PLACE:
        mask = mask_d[:, None] & mask_r[None, :]
        mean_ptrs = mean_ptr + offs_d[:, None] * stride_mean_d + offs_r[None, :] * stride_mean_r
        m2_ptrs = m2_ptr + offs_d[:, None] * stride_m2_d + offs_r[None, :] * stride_m2_r
        # Chan's merge in the state's own dtype (fp32 or fp64).
        old_mean = tl.load(mean_ptrs, mask=mask, other=0.0)
        old_m2 = tl.load(m2_ptrs, mask=mask, other=0.0)
        delta = mean.to(old_mean.dtype) - old_mean
        new_m2 = old_m2 + m2.to(old_m2.dtype) + delta * delta * w_cross
        new_mean = old_mean + delta * w_new
        tl.store(m2_ptrs, new_m2.to(m2_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptrs, new_mean.to(mean_ptr.dtype.element_ty), mask=mask)
    else:
        mask = mask_d[:, None] & mask_r[None, :]
        # The workspace is contiguous (splits, D, R): its inner stride is 1.
        offs = pid_s * stride_ws_s + offs_d[:, None] * stride_ws_d + offs_r[None, :]
        tl.store(ws_mean_ptr + offs, mean, mask=mask)
        tl.store(ws_m2_ptr + offs, m2, mask=mask)


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
    _accumulate_kernel[grid](
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
