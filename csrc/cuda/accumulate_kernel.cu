// CUDA kernel of fimlora::accumulate_sample_stats. Plain CUDA, no torch headers (see
// accumulate_kernel.h); the torch glue is accumulate_cuda.cpp.
//
// Each thread block owns a kTileRows x kTileCols tile of the (d_out, r) state. It walks the
// samples in order; for each it stages the sample's tokens of dy (tile rows) and h (tile
// columns) in shared memory, a chunk at a time, converting to float32, and every thread
// accumulates its elements of the sample's gradient G_n in float32 registers. Each finished
// G_n updates the thread's running (mean, M2) of this batch with Welford's step (in the
// state's dtype), and at the end the batch is merged into the state in place with Chan's
// formula. Nothing proportional to S * d_out * r is ever stored.
//
// Per-sample squared norms (optional): each warp reduces its threads' squares of the finished
// G_n with shuffles and its lane 0 writes one partial per (warp, sample) to a buffer that the
// glue sums over warps in a fixed order: no atomics, so the norms are deterministic.
//
// Numerics match the CPU kernel: the batch moments are those of the deviations
// G_n - mean_old from the state's mean at the start of the call, which are of the order of
// the spread, so a float32 state keeps the variance even when |mean| >> std.
//
// Written for correctness and clarity first; tiling, vectorised loads and splitting long
// batches across blocks are left for tuning on a GPU.

#include "accumulate_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kTileRows = 32;                           // state rows (d_out) per block
constexpr int kTileCols = 16;                           // state columns (r) per block
constexpr int kThreads = 128;
constexpr int kRowGroups = kThreads / kTileCols;        // threads sharing one column
constexpr int kRowsPerThread = kTileRows / kRowGroups;  // state elements per thread
constexpr int kChunk = 32;                              // tokens staged in shared memory at a time
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;            // partial norms per block and sample

static_assert(kThreads % kTileCols == 0, "a whole number of row groups");
static_assert(kTileRows % kRowGroups == 0, "every thread owns the same number of rows");
static_assert(kThreads % kWarpSize == 0, "whole warps");

__device__ __forceinline__ float load_as_float(const void* base, int64_t offset, fimlora_dtype dtype) {
  // dtype is the same for all threads, so this switch never diverges.
  switch (dtype) {
    case FIMLORA_FLOAT16:
      return __half2float(static_cast<const __half*>(base)[offset]);
    case FIMLORA_BFLOAT16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[offset]);
    default:
      return static_cast<const float*>(base)[offset];
  }
}

// No __launch_bounds__: with it, nvcc 13 capped registers at 64 and spilled; without, the
// kernel uses 72 (float state) or 96 (double) registers and spills nothing.
template <typename state_t>
__global__ void accumulate_kernel(const fimlora_accumulate_args args, state_t mean_weight, state_t m2_weight) {
  __shared__ float dy_tile[kChunk][kTileRows];
  __shared__ float h_tile[kChunk][kTileCols];

  const int col_in_tile = threadIdx.x % kTileCols;
  const int row_group = threadIdx.x / kTileCols;  // this thread's rows: row_group + k * kRowGroups
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTileCols;
  const state_t scale = static_cast<state_t>(args.scale);

  state_t* mean = static_cast<state_t*>(args.mean);
  state_t* m2 = static_cast<state_t*>(args.m2);
  const int64_t col = col0 + col_in_tile;

  // For the thread's elements: the state's mean before this call, and the Welford moments of
  // this batch's deviations from it.
  state_t mean_old[kRowsPerThread];
  state_t batch_mean[kRowsPerThread];
  state_t batch_m2[kRowsPerThread];
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t row = row0 + row_group + k * kRowGroups;
    mean_old[k] = (row < args.d_out && col < args.r) ? mean[row * args.r + col] : state_t(0);
    batch_mean[k] = 0;
    batch_m2[k] = 0;
  }

  for (int64_t n = 0; n < args.num_segments; ++n) {
    // A kernel cannot report bad bounds without a synchronisation, so they are clamped to the
    // tokens that exist: nothing outside dy and h is ever read. (The CPU kernel raises.)
    int64_t start = args.segments[n * args.segments_stride0];
    int64_t end = args.segments[n * args.segments_stride0 + args.segments_stride1];
    start = min(max(start, static_cast<int64_t>(0)), args.num_tokens);
    end = min(max(end, start), args.num_tokens);

    float grad[kRowsPerThread];
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      grad[k] = 0.f;
    }

    for (int64_t t0 = start; t0 < end; t0 += kChunk) {
      const int len = static_cast<int>(min(static_cast<int64_t>(kChunk), end - t0));
      // Consecutive threads take consecutive rows of one token: coalesced when dy is row-major.
      for (int i = threadIdx.x; i < kChunk * kTileRows; i += kThreads) {
        const int t = i / kTileRows;
        const int64_t row = row0 + i % kTileRows;
        dy_tile[t][i % kTileRows] =
            (t < len && row < args.d_out)
                ? load_as_float(args.dy, (t0 + t) * args.dy_stride0 + row * args.dy_stride1, args.dy_dtype)
                : 0.f;
      }
      for (int i = threadIdx.x; i < kChunk * kTileCols; i += kThreads) {
        const int t = i / kTileCols;
        const int64_t h_col = col0 + i % kTileCols;
        h_tile[t][i % kTileCols] =
            (t < len && h_col < args.r)
                ? load_as_float(args.h, (t0 + t) * args.h_stride0 + h_col * args.h_stride1, args.h_dtype)
                : 0.f;
      }
      __syncthreads();
      for (int t = 0; t < len; ++t) {
        const float h_value = h_tile[t][col_in_tile];
#pragma unroll
        for (int k = 0; k < kRowsPerThread; ++k) {
          grad[k] = fmaf(dy_tile[t][row_group + k * kRowGroups], h_value, grad[k]);
        }
      }
      __syncthreads();  // the tiles are overwritten by the next chunk
    }

    // Welford's step with G_n - mean_old, the (n + 1)-th deviation of this batch. An empty
    // sample counts too, with a zero gradient.
    const state_t inv_count = state_t(1) / static_cast<state_t>(n + 1);
    float sq = 0.f;  // this thread's share of ||G_n||^2 (padding elements are exactly 0)
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const state_t g = static_cast<state_t>(grad[k]) * scale;
      const state_t x = g - mean_old[k];
      const state_t delta = x - batch_mean[k];
      batch_mean[k] += delta * inv_count;
      batch_m2[k] += delta * (x - batch_mean[k]);
      sq = fmaf(static_cast<float>(g), static_cast<float>(g), sq);
    }
    if (args.sample_sq_partials != nullptr) {  // the same for every thread: no divergence
      // Every thread of the block runs every sample, so the full mask is valid.
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        sq += __shfl_down_sync(0xffffffffu, sq, offset);
      }
      if (threadIdx.x % kWarpSize == 0) {
        const int64_t block = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
        const int64_t row = block * kWarps + threadIdx.x / kWarpSize;
        args.sample_sq_partials[row * args.num_segments + n] = sq;
      }
    }
  }

  // Chan et al.'s merge of the batch (S gradients, mean mean_old + batch_mean) into the state
  // (count gradients), in place. Each element has exactly one owner thread.
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t row = row0 + row_group + k * kRowGroups;
    if (row < args.d_out && col < args.r) {
      const int64_t index = row * args.r + col;
      const state_t delta = batch_mean[k];
      mean[index] = mean_old[k] + delta * mean_weight;
      m2[index] += batch_m2[k] + delta * delta * m2_weight;
    }
  }
}

int64_t row_tiles_of(int64_t d_out) { return (d_out + kTileRows - 1) / kTileRows; }
int64_t col_tiles_of(int64_t r) { return (r + kTileCols - 1) / kTileCols; }

bool is_input_dtype(fimlora_dtype dtype) {
  return dtype == FIMLORA_FLOAT32 || dtype == FIMLORA_FLOAT16 || dtype == FIMLORA_BFLOAT16;
}

}  // namespace

extern "C" cudaError_t fimlora_accumulate_sample_stats_cuda(const fimlora_accumulate_args* args,
                                                           cudaStream_t stream) {
  if (args == nullptr || !is_input_dtype(args->dy_dtype) || !is_input_dtype(args->h_dtype) ||
      (args->state_dtype != FIMLORA_FLOAT32 && args->state_dtype != FIMLORA_FLOAT64) || args->count < 0) {
    return cudaErrorInvalidValue;
  }
  if (args->num_segments == 0 || args->d_out == 0 || args->r == 0) {
    return cudaSuccess;  // nothing to fold
  }
  const int64_t row_tiles = row_tiles_of(args->d_out);
  const int64_t col_tiles = col_tiles_of(args->r);
  if (row_tiles > 0x7fffffff || col_tiles > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));

  // Chan's weights, from integer counts, in double: S / (count + S) and count * S / (count + S).
  const double batch = static_cast<double>(args->num_segments);
  const double total = static_cast<double>(args->count) + batch;
  const double mean_weight = batch / total;
  const double m2_weight = static_cast<double>(args->count) * batch / total;

  if (args->state_dtype == FIMLORA_FLOAT64) {
    accumulate_kernel<double><<<grid, kThreads, 0, stream>>>(*args, mean_weight, m2_weight);
  } else {
    accumulate_kernel<float><<<grid, kThreads, 0, stream>>>(*args, static_cast<float>(mean_weight),
                                                            static_cast<float>(m2_weight));
  }
  return cudaGetLastError();
}

extern "C" int64_t fimlora_accumulate_sample_sq_rows(int64_t d_out, int64_t r) {
  return row_tiles_of(d_out) * col_tiles_of(r) * kWarps;
}
