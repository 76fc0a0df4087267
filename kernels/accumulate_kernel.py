"""The fused Triton kernel of ``accumulate_sample_stats`` (its launcher is ``accumulate.py``).

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
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["INTERPRET", "accumulate_tile_kernel"]

# triton.jit decides at decoration time (this import) whether kernels are interpreted, so read the
# environment at the same moment: that is the mode the kernel below actually runs in.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def accumulate_tile_kernel(
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
