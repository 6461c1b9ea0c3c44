// What the CPU and CUDA kernels of generate_permute_indices share: the checks
// that need no count values, and the allocation of the three outputs.
#pragma once

#include <torch/csrc/stable/ops.h>

#include "common/op_checks.h"
#include "core/permute_indices.h"

namespace moe_ext::ops {

struct PermuteIndicesCall {
  Tensor counts;  // contiguous int32 or int64
  Tensor permuted_indices, m_sizes, m_offsets;
};

inline PermuteIndicesCall prepare_permute_indices(const Tensor& tokens_per_expert_group,
                                                  int64_t experts_per_rank, int64_t num_ranks,
                                                  int64_t max_len, int64_t alignment) {
  constexpr const char* op = "generate_permute_indices";
  check_dim(tokens_per_expert_group, op, "tokens_per_expert_group", 1);
  check_dtype(tokens_per_expert_group, op, "tokens_per_expert_group", {ScalarType::Int, ScalarType::Long});
  core::check_permute_indices_shape(tokens_per_expert_group.numel(), experts_per_rank, num_ranks,
                                    max_len, alignment);
  Tensor counts = make_contiguous(tokens_per_expert_group);
  Tensor permuted_indices = torch::stable::new_empty(counts, {max_len}, ScalarType::Int);
  Tensor m_sizes = torch::stable::new_empty(counts, {experts_per_rank}, ScalarType::Int);
  Tensor m_offsets = torch::stable::new_empty(counts, {experts_per_rank}, ScalarType::Int);
  return {std::move(counts), std::move(permuted_indices), std::move(m_sizes), std::move(m_offsets)};
}

}  // namespace moe_ext::ops
