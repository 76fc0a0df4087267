// The fimlora operator library: one schema, shared by the CPU and CUDA kernels.
//
// accumulate_sample_stats folds the per-sample LoRA-B gradients
//     G_n = scale * sum_{t in [start_n, end_n)} dy_t^T h_t          (d_out x r)
// of one batch into running moments (mean, m2) of `count` earlier gradients, in place, without
// materialising the (S, d_out, r) stack. The caller increments its count by S afterwards.
// When the optional `sample_sq` (S,) float32 is given, it is overwritten with each sample's
// squared Frobenius norm ||G_n||_F^2 (the bootstrap of fimlora.confidence resamples these);
// None costs nothing extra. The kernels reduce each sample's partial sums of squares in a
// fixed order, so the norms do not depend on thread counts or scheduling.
// mean, m2 and sample_sq are mutated (the `!` annotations) so that torch.compile /
// functionalization and torch.library.opcheck know about the in-place update; the op returns
// nothing.

#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "accumulate.h"

namespace fimlora {
namespace {

constexpr const char* kOp = "fimlora::accumulate_sample_stats: ";

bool is_input_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& dy, c10::DeviceType device_type) {
  // The dispatcher picks the kernel from the "highest" device among the tensors, so a mix
  // (say segments on the CPU, dy on the GPU) reaches the CUDA kernel and is refused here.
  TORCH_CHECK(t.device().type() == device_type && t.device() == dy.device(), kOp, name,
              " must be on the device of dy (", dy.device(), "), got ", t.device());
}

}  // namespace

void check_accumulate_inputs(
    const at::Tensor& dy,
    const at::Tensor& h,
    const at::Tensor& segments,
    int64_t count,
    const at::Tensor& mean,
    const at::Tensor& m2,
    const std::optional<at::Tensor>& sample_sq,
    c10::DeviceType device_type) {
  TORCH_CHECK(dy.dim() == 2, kOp, "dy must be 2-D (T, d_out), got shape ", dy.sizes());
  TORCH_CHECK(h.dim() == 2, kOp, "h must be 2-D (T, r), got shape ", h.sizes());
  TORCH_CHECK(dy.size(0) == h.size(0), kOp, "dy and h must have the same number of tokens T, got dy of shape ",
              dy.sizes(), " and h of shape ", h.sizes());
  TORCH_CHECK(is_input_dtype(dy.scalar_type()), kOp, "dy must be float32, float16 or bfloat16, got ",
              dy.scalar_type());
  TORCH_CHECK(is_input_dtype(h.scalar_type()), kOp, "h must be float32, float16 or bfloat16, got ",
              h.scalar_type());

  TORCH_CHECK(segments.scalar_type() == at::kLong, kOp, "segments must be int64 (torch.long), got ",
              segments.scalar_type());
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 2, kOp,
              "segments must have shape (S, 2) of [start, end) token ranges, got shape ", segments.sizes());

  const int64_t d_out = dy.size(1);
  const int64_t r = h.size(1);
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, kOp,
              "mean must be float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(m2.scalar_type() == mean.scalar_type(), kOp, "m2 must have the dtype of mean (",
              mean.scalar_type(), "), got ", m2.scalar_type());
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == d_out && mean.size(1) == r, kOp,
              "mean must have shape (d_out, r) = (", d_out, ", ", r, ") given by dy and h, got ", mean.sizes());
  TORCH_CHECK(m2.dim() == 2 && m2.size(0) == d_out && m2.size(1) == r, kOp,
              "m2 must have shape (d_out, r) = (", d_out, ", ", r, ") given by dy and h, got ", m2.sizes());
  // The kernels write the state through raw row-major pointers.
  TORCH_CHECK(mean.is_contiguous(), kOp, "mean must be contiguous (it is updated in place), got strides ",
              mean.strides());
  TORCH_CHECK(m2.is_contiguous(), kOp, "m2 must be contiguous (it is updated in place), got strides ",
              m2.strides());
  const auto overlap = at::get_overlap_status(mean, m2);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, kOp,
              "mean and m2 must not share memory");
  TORCH_CHECK(count >= 0, kOp, "count must be >= 0, got ", count);

  check_device(dy, "dy", dy, device_type);
  check_device(h, "h", dy, device_type);
  check_device(segments, "segments", dy, device_type);
  check_device(mean, "mean", dy, device_type);
  check_device(m2, "m2", dy, device_type);

  if (sample_sq.has_value()) {
    const at::Tensor& sq = *sample_sq;
    TORCH_CHECK(sq.scalar_type() == at::kFloat, kOp, "sample_sq must be float32, got ", sq.scalar_type());
    TORCH_CHECK(sq.dim() == 1 && sq.size(0) == segments.size(0), kOp,
                "sample_sq must have shape (S,) = (", segments.size(0), ",), one entry per segment, got ",
                sq.sizes());
    TORCH_CHECK(sq.is_contiguous(), kOp, "sample_sq must be contiguous (it is written in place), got strides ",
                sq.strides());
    for (const at::Tensor* other : {&mean, &m2}) {
      const auto with_state = at::get_overlap_status(sq, *other);
      TORCH_CHECK(with_state != at::MemOverlapStatus::Full && with_state != at::MemOverlapStatus::Partial, kOp,
                  "sample_sq must not share memory with mean or m2");
    }
    check_device(sq, "sample_sq", dy, device_type);
  }
}

TORCH_LIBRARY(fimlora, m) {
  m.def(
      "accumulate_sample_stats(Tensor dy, Tensor h, Tensor segments, float scale, int count, "
      "Tensor(a!) mean, Tensor(b!) m2, Tensor(c!)? sample_sq=None) -> ()");
}

}  // namespace fimlora
