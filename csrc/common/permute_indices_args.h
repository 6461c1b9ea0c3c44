// What the CPU and CUDA kernels of generate_permute_indices share: the checks
// that need no count values, and the allocation of the three outputs.
#pragma once

#include <ATen/ATen.h>

#include "common/op_checks.h"
#include "core/permute_indices.h"

namespace moe_ext::ops {

struct PermuteIndicesCall {
  at::Tensor counts;  // contiguous int32 or int64
  at::Tensor permuted_indices, m_sizes, m_offsets;
};

inline PermuteIndicesCall prepare_permute_indices(const at::Tensor& tokens_per_expert_group,
                                                  int64_t experts_per_rank, int64_t num_ranks,
                                                  int64_t max_len, int64_t alignment) {
  constexpr const char* op = "generate_permute_indices";
  check_dim(tokens_per_expert_group, op, "tokens_per_expert_group", 1);
  check_dtype(tokens_per_expert_group, op, "tokens_per_expert_group", {at::kInt, at::kLong});
  call_core([&] {
    core::check_permute_indices_shape(tokens_per_expert_group.numel(), experts_per_rank, num_ranks,
                                      max_len, alignment);
  });
  PermuteIndicesCall call;
  call.counts = tokens_per_expert_group.contiguous();
  const auto int32_options = call.counts.options().dtype(at::kInt);
  call.permuted_indices = at::empty({max_len}, int32_options);
  call.m_sizes = at::empty({experts_per_rank}, int32_options);
  call.m_offsets = at::empty({experts_per_rank}, int32_options);
  return call;
}

}  // namespace moe_ext::ops
