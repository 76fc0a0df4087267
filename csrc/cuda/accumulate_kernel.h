/* C interface of the CUDA kernel of fimlora::accumulate_sample_stats.
 *
 * Deliberately free of torch: accumulate_kernel.cu includes only this header and the CUDA
 * toolkit's, so `nvcc -arch=sm_90 -c accumulate_kernel.cu` works as a quick compile check
 * without a torch install, and the torch-facing glue (accumulate_cuda.cpp) stays in a file
 * the host compiler builds. */
#ifndef FIMLORA_ACCUMULATE_KERNEL_H_
#define FIMLORA_ACCUMULATE_KERNEL_H_

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum fimlora_dtype {
  FIMLORA_FLOAT32 = 0,
  FIMLORA_FLOAT16 = 1,
  FIMLORA_BFLOAT16 = 2,
  FIMLORA_FLOAT64 = 3,
} fimlora_dtype;

/* Element strides, as torch reports them. All pointers are device pointers. */
typedef struct fimlora_accumulate_args {
  const void* dy;           /* (num_tokens, d_out), float32/float16/bfloat16 */
  fimlora_dtype dy_dtype;
  int64_t dy_stride0;
  int64_t dy_stride1;
  const void* h;            /* (num_tokens, r), float32/float16/bfloat16 */
  fimlora_dtype h_dtype;
  int64_t h_stride0;
  int64_t h_stride1;
  const int64_t* segments;  /* (num_segments, 2) [start, end) token ranges */
  int64_t segments_stride0;
  int64_t segments_stride1;
  int64_t num_segments;
  int64_t num_tokens;
  int64_t d_out;
  int64_t r;
  double scale;
  int64_t count;            /* gradients already folded into (mean, m2) */
  void* mean;               /* (d_out, r) contiguous, float32/float64, updated in place */
  void* m2;                 /* (d_out, r) contiguous, same dtype as mean */
  fimlora_dtype state_dtype;
  /* Optional (NULL: not computed): (fimlora_accumulate_sample_sq_rows(d_out, r), num_segments)
   * row-major float32 partial sums of squares of each sample's gradient; every entry is
   * written, and summing the rows gives each sample's ||G_n||_F^2. */
  float* sample_sq_partials;
} fimlora_accumulate_args;

/* Rows of the sample_sq_partials buffer for a (d_out, r) state: one per warp of the grid. */
int64_t fimlora_accumulate_sample_sq_rows(int64_t d_out, int64_t r);

/* Enqueues the update on `stream`. Returns cudaSuccess, cudaErrorInvalidValue for an
 * unsupported dtype, or the launch error. Does not synchronise. */
cudaError_t fimlora_accumulate_sample_stats_cuda(const fimlora_accumulate_args* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FIMLORA_ACCUMULATE_KERNEL_H_ */
