// CPU kernel of fimlora::accumulate_sample_stats (schema and argument checks in ../ops.cpp).
//
// Work is split over blocks of d_out rows with at::parallel_for. For one block of rows and
// one sample, the block of that sample's gradient is a small matrix product (BLAS, single-
// threaded inside the parallel region) into a per-task buffer and is folded into the batch's
// running moments of those rows; once every sample has passed, the batch is merged into the
// state rows. The buffers and the state rows stay in cache while the samples pass, every
// element of dy is read once, and the (S, d_out, r) stack of gradients never exists.
// Arithmetic is in the dtype of the state (float32 or float64), as in the torch backend.
//
// Numerics (shared with the CUDA kernel): the batch's moments are those of the deviations
// x_n = G_n - mean_old from the state's current mean, by Welford's update, then merged with
// Chan's formula. The deviations are of the order of the spread, not of the mean, so a
// float32 state keeps the variance even where |mean| is 1e4 times the standard deviation,
// and the mean is rounded once per call rather than once per sample.
//
// Per-sample squared norms (optional `sample_sq`): the tasks own whole groups of kGroupRows
// rows, and each group's sum of squares of each sample's gradient goes to its own slot of a
// (S, groups) buffer in float64; the slots are then summed in group order. The result is thus
// the same whatever the thread count, and no task ever writes another's slot.
//
// The product is formed transposed, G^T[:, rows] = h[seg]^T dy[seg, rows] (r x rows): the
// long dimension is then BLAS's contiguous one, about twice as fast with MKL for small r as
// the (rows x r) orientation, which is the layout of torch.bmm(dY^T, H).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../accumulate.h"

namespace fimlora {
namespace {

constexpr const char* kOp = "fimlora::accumulate_sample_stats: ";

// Elements (r x rows) of the state a task holds at a time: 64 Ki, so the float32 gradient
// buffer (256 KiB), the batch moments and the state's mean (768 KiB) stay in L2 while the
// samples pass, and each BLAS call is long (r=16: 4096 rows). On N=8, L=512, d_out=4096,
// r=16 with MKL, 32-64 Ki ran a few percent faster than 8-16 Ki (a shared, noisy 2-core VM).
constexpr int64_t kBlockElements = 64 * 1024;
// Elements (tokens x rows) of dy converted to the state dtype at a time, when dy is not
// already in it (bf16/fp16 inputs, or float32 inputs with a float64 state): 1 MiB in float32.
constexpr int64_t kStagedElements = 256 * 1024;
// Rows per group: tasks split d_out only at group boundaries, and each group keeps its own
// partial sum of squares per sample (see the header comment).
constexpr int64_t kGroupRows = 16;

struct Segment {
  int64_t start;
  int64_t end;
};

std::vector<Segment> read_segments(const at::Tensor& segments, int64_t num_tokens) {
  const auto ranges = segments.accessor<int64_t, 2>();
  std::vector<Segment> result(static_cast<size_t>(segments.size(0)));
  for (int64_t n = 0; n < segments.size(0); ++n) {
    const int64_t start = ranges[n][0];
    const int64_t end = ranges[n][1];
    TORCH_CHECK(0 <= start && start <= end && end <= num_tokens, kOp, "segments[", n, "] = [", start, ", ", end,
                ") is not a [start, end) range within the ", num_tokens, " tokens of dy");
    result[static_cast<size_t>(n)] = {start, end};
  }
  return result;
}

// A non-owning view of `data` (no dispatcher call, unlike narrow/slice): these are made per
// block and sample, so they must be cheap.
at::Tensor view(const void* data, at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  return at::from_blob(const_cast<void*>(data), sizes, strides, options);
}

// Welford's update of the batch moments (batch_mean, batch_m2) of `rows` x `r` elements,
// row-major, with the n-th deviation x = scale * grad_t^T - mean_old (grad_t is r x rows).
// When `group_sq` is given (this sample's slots, one per group of kGroupRows rows of d_out),
// each row's sum of (scale * grad)^2 is added to the slot of its group; `row0` is the first
// row's index in d_out. A template flag, so that the loop without norms stays as it was (a
// float reduction in the inner loop would keep it from vectorising).
template <typename acc_t, bool with_norms>
void welford_step(acc_t* batch_mean, acc_t* batch_m2, const acc_t* mean_old, const acc_t* grad_t, int64_t rows,
                  int64_t r, acc_t scale, int64_t n, double* group_sq, int64_t row0) {
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  for (int64_t i = 0; i < rows; ++i) {
    acc_t row_sq = 0;
    for (int64_t j = 0; j < r; ++j) {
      const int64_t e = i * r + j;
      const acc_t g = scale * grad_t[j * rows + i];
      const acc_t x = g - mean_old[e];
      const acc_t delta = x - batch_mean[e];
      batch_mean[e] += delta * inv_n;
      batch_m2[e] += delta * (x - batch_mean[e]);
      if constexpr (with_norms) {
        row_sq += g * g;
      }
    }
    if constexpr (with_norms) {
      group_sq[(row0 + i) / kGroupRows] += static_cast<double>(row_sq);
    }
  }
}

// Chan et al.'s merge of a batch of `batch` gradients, whose mean is mean + batch_mean, into
// `count` earlier ones, in place, for `size` elements.
template <typename acc_t>
void chan_merge(acc_t* mean, acc_t* m2, const acc_t* batch_mean, const acc_t* batch_m2, int64_t size, int64_t count,
                int64_t batch) {
  const double total = static_cast<double>(count) + static_cast<double>(batch);
  const acc_t mean_weight = static_cast<acc_t>(static_cast<double>(batch) / total);
  const acc_t m2_weight = static_cast<acc_t>(static_cast<double>(count) * static_cast<double>(batch) / total);
  for (int64_t e = 0; e < size; ++e) {
    const acc_t delta = batch_mean[e];
    mean[e] += delta * mean_weight;
    m2[e] += batch_m2[e] + delta * delta * m2_weight;
  }
}

template <typename acc_t>
void accumulate_cpu(
    const at::Tensor& dy,
    const at::Tensor& h,
    const std::vector<Segment>& segments,
    double scale,
    int64_t count,
    at::Tensor& mean,
    at::Tensor& m2,
    double* group_sq) {  // (S, groups) zeroed partial sums of squares, or nullptr
  const int64_t num_tokens = dy.size(0);
  const int64_t d_out = dy.size(1);
  const int64_t r = h.size(1);
  const at::TensorOptions acc_options = mean.options();

  // h is small (T x r): bring it to the state dtype once, for all blocks.
  const at::Tensor h_acc = h.to(mean.scalar_type());
  const char* h_data = static_cast<const char*>(h_acc.const_data_ptr());
  const int64_t h_stride0 = h_acc.stride(0);
  const int64_t h_stride1 = h_acc.stride(1);
  const int64_t h_elem = static_cast<int64_t>(h_acc.element_size());

  // dy is large (T x d_out): used in place when it is in the state dtype, else converted a
  // chunk of tokens x block rows at a time.
  const bool dy_direct = dy.scalar_type() == mean.scalar_type();
  const char* dy_data = static_cast<const char*>(dy.const_data_ptr());
  const int64_t dy_stride0 = dy.stride(0);
  const int64_t dy_stride1 = dy.stride(1);
  const int64_t dy_elem = static_cast<int64_t>(dy.element_size());
  const at::TensorOptions dy_options = dy.options();

  acc_t* mean_data = mean.data_ptr<acc_t>();
  acc_t* m2_data = m2.data_ptr<acc_t>();
  const acc_t scale_acc = static_cast<acc_t>(scale);

  // Below about 32k multiply-adds a task is not worth a thread. Tasks get whole groups of rows.
  const int64_t grain_rows = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, num_tokens * r));
  const int64_t num_groups = (d_out + kGroupRows - 1) / kGroupRows;
  const int64_t grain_groups = (grain_rows + kGroupRows - 1) / kGroupRows;

  at::parallel_for(0, num_groups, grain_groups, [&](int64_t group_begin, int64_t group_end) {
    const int64_t begin = group_begin * kGroupRows;
    const int64_t end = std::min(group_end * kGroupRows, d_out);
    // a multiple of kGroupRows, so that every block but a task's last covers whole groups
    const int64_t block_rows = std::max<int64_t>(kGroupRows, kBlockElements / r / kGroupRows * kGroupRows);
    const int64_t max_rows = std::min(block_rows, end - begin);
    at::Tensor grad_buffer = at::empty({r, max_rows}, acc_options);
    at::Tensor batch_buffer = at::empty({2, max_rows * r}, acc_options);  // batch mean and m2
    acc_t* batch_mean = batch_buffer.data_ptr<acc_t>();
    acc_t* batch_m2 = batch_mean + max_rows * r;
    const int64_t chunk_tokens = std::max<int64_t>(16, kStagedElements / max_rows);
    at::Tensor staged_buffer;
    if (!dy_direct) {
      staged_buffer = at::empty({chunk_tokens, max_rows}, acc_options);
    }
    acc_t* grad_data = grad_buffer.data_ptr<acc_t>();

    for (int64_t row0 = begin; row0 < end; row0 += block_rows) {
      const int64_t rows = std::min(block_rows, end - row0);
      at::Tensor grad_t = view(grad_data, {r, rows}, {rows, 1}, acc_options);  // G^T[:, rows]
      std::fill(batch_mean, batch_mean + rows * r, acc_t(0));
      std::fill(batch_m2, batch_m2 + rows * r, acc_t(0));

      for (size_t n = 0; n < segments.size(); ++n) {
        const int64_t start = segments[n].start;
        const int64_t len = segments[n].end - start;
        if (len == 0) {
          grad_t.zero_();  // a sample without tokens has a zero gradient, and it still counts
        } else if (dy_direct) {
          // h[start:end]^T (r x len, strides swapped: no copy) times dy[start:end, row0:row0+rows]
          const at::Tensor h_seg_t =
              view(h_data + start * h_stride0 * h_elem, {r, len}, {h_stride1, h_stride0}, acc_options);
          const at::Tensor dy_block = view(dy_data + (start * dy_stride0 + row0 * dy_stride1) * dy_elem,
                                           {len, rows}, {dy_stride0, dy_stride1}, dy_options);
          at::cpu::mm_out(grad_t, h_seg_t, dy_block);
        } else {
          for (int64_t t0 = start; t0 < start + len; t0 += chunk_tokens) {
            const int64_t chunk = std::min(chunk_tokens, start + len - t0);
            at::Tensor staged = view(staged_buffer.data_ptr(), {chunk, rows}, {rows, 1}, acc_options);
            staged.copy_(view(dy_data + (t0 * dy_stride0 + row0 * dy_stride1) * dy_elem, {chunk, rows},
                              {dy_stride0, dy_stride1}, dy_options));
            const at::Tensor h_seg_t =
                view(h_data + t0 * h_stride0 * h_elem, {r, chunk}, {h_stride1, h_stride0}, acc_options);
            if (t0 == start) {
              at::cpu::mm_out(grad_t, h_seg_t, staged);
            } else {
              at::cpu::addmm_out(grad_t, grad_t, h_seg_t, staged);
            }
          }
        }
        if (group_sq == nullptr) {
          welford_step<acc_t, false>(batch_mean, batch_m2, mean_data + row0 * r, grad_data, rows, r, scale_acc,
                                     static_cast<int64_t>(n) + 1, nullptr, row0);
        } else {
          welford_step<acc_t, true>(batch_mean, batch_m2, mean_data + row0 * r, grad_data, rows, r, scale_acc,
                                    static_cast<int64_t>(n) + 1, group_sq + static_cast<int64_t>(n) * num_groups,
                                    row0);
        }
      }
      chan_merge<acc_t>(mean_data + row0 * r, m2_data + row0 * r, batch_mean, batch_m2, rows * r, count,
                        static_cast<int64_t>(segments.size()));
    }
  });
}

void accumulate_sample_stats_cpu(
    const at::Tensor& dy,
    const at::Tensor& h,
    const at::Tensor& segments,
    double scale,
    int64_t count,
    at::Tensor& mean,
    at::Tensor& m2,
    const std::optional<at::Tensor>& sample_sq) {
  check_accumulate_inputs(dy, h, segments, count, mean, m2, sample_sq, c10::DeviceType::CPU);
  const std::vector<Segment> ranges = read_segments(segments, dy.size(0));
  if (ranges.empty()) {
    return;
  }
  if (mean.numel() == 0) {
    if (sample_sq.has_value()) {
      sample_sq->zero_();  // a gradient without elements has norm 0
    }
    return;
  }
  const int64_t num_groups = (dy.size(1) + kGroupRows - 1) / kGroupRows;
  std::vector<double> group_sq(sample_sq.has_value() ? ranges.size() * static_cast<size_t>(num_groups) : 0, 0.0);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "accumulate_sample_stats_cpu", [&] {
    accumulate_cpu<scalar_t>(dy, h, ranges, scale, count, mean, m2, group_sq.empty() ? nullptr : group_sq.data());
  });
  if (sample_sq.has_value()) {
    float* out = sample_sq->data_ptr<float>();
    for (size_t n = 0; n < ranges.size(); ++n) {
      const double* slots = group_sq.data() + n * static_cast<size_t>(num_groups);
      double total = 0;
      for (int64_t g = 0; g < num_groups; ++g) {
        total += slots[g];
      }
      out[n] = static_cast<float>(total);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fimlora, CPU, m) {
  m.impl("accumulate_sample_stats", &accumulate_sample_stats_cpu);
}

}  // namespace fimlora
