// CPU kernel of generate_permute_indices: argument checks, then the core.
#include <ATen/ATen.h>

#include "common/op_checks.h"
#include "core/permute_indices.h"
#include "cpu/cpu_ops.h"

namespace moe_ext::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> generate_permute_indices(
    const at::Tensor& tokens_per_expert_group, int64_t experts_per_rank, int64_t num_ranks,
    int64_t max_len, int64_t alignment) {
  constexpr const char* op = "generate_permute_indices";
  ops::check_dim(tokens_per_expert_group, op, "tokens_per_expert_group", 1);
  ops::check_dtype(tokens_per_expert_group, op, "tokens_per_expert_group", {at::kInt, at::kLong});
  ops::call_core([&] {
    core::check_permute_indices_shape(tokens_per_expert_group.numel(), experts_per_rank, num_ranks,
                                      max_len, alignment);
  });
  const at::Tensor counts = tokens_per_expert_group.contiguous();
  const auto int32_options = counts.options().dtype(at::kInt);
  at::Tensor permuted_indices = at::empty({max_len}, int32_options);
  at::Tensor m_sizes = at::empty({experts_per_rank}, int32_options);
  at::Tensor m_offsets = at::empty({experts_per_rank}, int32_options);
  ops::call_core([&] {
    auto* indices = permuted_indices.data_ptr<int32_t>();
    auto* sizes = m_sizes.data_ptr<int32_t>();
    auto* offsets = m_offsets.data_ptr<int32_t>();
    if (counts.scalar_type() == at::kInt) {
      core::generate_permute_indices(counts.data_ptr<int32_t>(), experts_per_rank, num_ranks, max_len,
                                     alignment, indices, sizes, offsets);
    } else {
      core::generate_permute_indices(counts.data_ptr<int64_t>(), experts_per_rank, num_ranks, max_len,
                                     alignment, indices, sizes, offsets);
    }
  });
  return {permuted_indices, m_sizes, m_offsets};
}

}  // namespace moe_ext::cpu
