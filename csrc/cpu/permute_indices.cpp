// CPU kernel of generate_permute_indices: argument checks, then the core.
#include "common/permute_indices_args.h"
#include "core/permute_indices.h"
#include "cpu/cpu_ops.h"

namespace moe_ext::cpu {

std::tuple<Tensor, Tensor, Tensor> generate_permute_indices(
    const Tensor& tokens_per_expert_group, int64_t experts_per_rank, int64_t num_ranks,
    int64_t max_len, int64_t alignment) {
  auto call = ops::prepare_permute_indices(tokens_per_expert_group, experts_per_rank, num_ranks,
                                          max_len, alignment);
  const Tensor& counts = call.counts;
  auto* indices = call.permuted_indices.mutable_data_ptr<int32_t>();
  auto* sizes = call.m_sizes.mutable_data_ptr<int32_t>();
  auto* offsets = call.m_offsets.mutable_data_ptr<int32_t>();
  if (counts.scalar_type() == ops::ScalarType::Int) {
    core::generate_permute_indices(counts.const_data_ptr<int32_t>(), experts_per_rank, num_ranks,
                                   max_len, alignment, indices, sizes, offsets);
  } else {
    core::generate_permute_indices(counts.const_data_ptr<int64_t>(), experts_per_rank, num_ranks,
                                   max_len, alignment, indices, sizes, offsets);
  }
  return {call.permuted_indices, call.m_sizes, call.m_offsets};
}

}  // namespace moe_ext::cpu
