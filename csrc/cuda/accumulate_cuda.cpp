// CUDA kernel registration of fimlora::accumulate_sample_stats: checks the arguments, picks
// the device and the current stream, and hands raw pointers and strides to the torch-free
// launcher in accumulate_kernel.cu. Built by the host compiler; only CUDA extensions
// (FIMLORA_FORCE_CUDA=1 or a CUDA torch) compile this file.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../accumulate.h"
#include "accumulate_kernel.h"

namespace fimlora {
namespace {

fimlora_dtype to_kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return FIMLORA_FLOAT32;
    case at::kHalf:
      return FIMLORA_FLOAT16;
    case at::kBFloat16:
      return FIMLORA_BFLOAT16;
    case at::kDouble:
      return FIMLORA_FLOAT64;
    default:
      // check_accumulate_inputs has refused every other dtype already.
      TORCH_CHECK(false, "fimlora::accumulate_sample_stats: unsupported dtype ", dtype);
  }
}

void accumulate_sample_stats_cuda(
    const at::Tensor& dy,
    const at::Tensor& h,
    const at::Tensor& segments,
    double scale,
    int64_t count,
    at::Tensor& mean,
    at::Tensor& m2,
    const std::optional<at::Tensor>& sample_sq) {
  check_accumulate_inputs(dy, h, segments, count, mean, m2, sample_sq, c10::DeviceType::CUDA);
  // Kernels launch on the current device: make it dy's, and use that device's current stream
  // so the update is ordered after whatever produced dy (e.g. the backward pass).
  const c10::cuda::CUDAGuard device_guard(dy.device());

  fimlora_accumulate_args args{};
  args.dy = dy.const_data_ptr();
  args.dy_dtype = to_kernel_dtype(dy.scalar_type());
  args.dy_stride0 = dy.stride(0);
  args.dy_stride1 = dy.stride(1);
  args.h = h.const_data_ptr();
  args.h_dtype = to_kernel_dtype(h.scalar_type());
  args.h_stride0 = h.stride(0);
  args.h_stride1 = h.stride(1);
  args.segments = segments.const_data_ptr<int64_t>();
  args.segments_stride0 = segments.stride(0);
  args.segments_stride1 = segments.stride(1);
  args.num_segments = segments.size(0);
  args.num_tokens = dy.size(0);
  args.d_out = dy.size(1);
  args.r = h.size(1);
  args.scale = scale;
  args.count = count;
  args.mean = mean.data_ptr();
  args.m2 = m2.data_ptr();
  args.state_dtype = to_kernel_dtype(mean.scalar_type());
  args.sample_sq_partials = nullptr;

  // Per-sample norms: the kernel writes one partial per (warp, sample), summed here in a fixed
  // order (deterministic, unlike atomics). A state without elements gives norms of 0.
  const bool with_norms = sample_sq.has_value() && args.num_segments > 0;
  const bool no_elements = args.d_out == 0 || args.r == 0;
  at::Tensor partials;
  if (with_norms && !no_elements) {
    partials = at::empty({fimlora_accumulate_sample_sq_rows(args.d_out, args.r), args.num_segments},
                         mean.options().dtype(at::kFloat));
    args.sample_sq_partials = partials.data_ptr<float>();
  }

  C10_CUDA_CHECK(fimlora_accumulate_sample_stats_cuda(&args, c10::cuda::getCurrentCUDAStream().stream()));
  if (with_norms) {
    if (no_elements) {
      sample_sq->zero_();
    } else {
      sample_sq->copy_(partials.sum(0));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fimlora, CUDA, m) {
  m.impl("accumulate_sample_stats", &accumulate_sample_stats_cuda);
}

}  // namespace fimlora
