// Shared declarations of the fimlora::accumulate_sample_stats op (see ops.cpp for the schema).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>

namespace fimlora {

// Validates the arguments of accumulate_sample_stats for a kernel of `device_type`, with
// messages that name the offending argument. Every kernel calls it first, so the CPU and CUDA
// kernels reject exactly the same inputs. `sample_sq`, when given, must be a contiguous float32
// (S,) tensor on dy's device that shares no memory with mean or m2.
void check_accumulate_inputs(
    const at::Tensor& dy,
    const at::Tensor& h,
    const at::Tensor& segments,
    int64_t count,
    const at::Tensor& mean,
    const at::Tensor& m2,
    const std::optional<at::Tensor>& sample_sq,
    c10::DeviceType device_type);

}  // namespace fimlora
