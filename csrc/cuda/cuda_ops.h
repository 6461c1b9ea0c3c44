// CUDA kernels of the moe_ext ops as torch functions (registered in
// csrc/torch_ops.cpp). Built only when the torch in use has CUDA.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace moe_ext::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> generate_permute_indices(
    const at::Tensor& tokens_per_expert_group, int64_t experts_per_rank, int64_t num_ranks,
    int64_t max_len, int64_t alignment);

}  // namespace moe_ext::cuda
