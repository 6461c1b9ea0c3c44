// CPU kernels of the moe_ext ops (registered in csrc/torch_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace moe_ext::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> generate_permute_indices(
    const at::Tensor& tokens_per_expert_group, int64_t experts_per_rank, int64_t num_ranks,
    int64_t max_len, int64_t alignment);

}  // namespace moe_ext::cpu
