// CPU kernels of moe_permute and expert_histogram: the index maths is the
// core's counting sort (csrc/core/routing_layout.cpp); the row copy is in
// scatter form (each token row read once, written to each of its
// destinations), parallel over tokens.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "common/op_checks.h"
#include "common/routing_checks.h"
#include "core/routing_layout.h"
#include "cpu/cpu_ops.h"

namespace moe_ext::cpu {
namespace {

template <typename IdT>
int64_t build_layout(const IdT* ids, const at::Tensor& topk_ids, int64_t num_experts,
                     const std::optional<at::Tensor>& expert_map, int64_t active_start,
                     int64_t active_end, bool counts_cumsum, at::Tensor& expanded_row_idx,
                     at::Tensor& expert_tokens) {
  const int64_t num_tokens = topk_ids.size(0), topk = topk_ids.size(1);
  int32_t* positions = expanded_row_idx.data_ptr<int32_t>();
  int64_t* counts = expert_tokens.data_ptr<int64_t>();
  if (!expert_map.has_value()) {
    return core::build_routing_layout<IdT, int32_t>(ids, num_tokens, topk, num_experts, nullptr,
                                                    active_start, active_end, counts_cumsum,
                                                    positions, counts);
  }
  if (expert_map->scalar_type() == at::kInt) {
    return core::build_routing_layout(ids, num_tokens, topk, num_experts,
                                      expert_map->data_ptr<int32_t>(), active_start, active_end,
                                      counts_cumsum, positions, counts);
  }
  return core::build_routing_layout(ids, num_tokens, topk, num_experts,
                                    expert_map->data_ptr<int64_t>(), active_start, active_end,
                                    counts_cumsum, positions, counts);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& hidden_states, const at::Tensor& topk_ids, int64_t num_experts,
    int64_t active_start, int64_t active_end, const std::optional<at::Tensor>& expert_map,
    bool counts_cumsum) {
  ops::check_permute_args(hidden_states, topk_ids, num_experts, active_start, active_end,
                          expert_map);
  const at::Tensor hidden = hidden_states.contiguous();
  const at::Tensor ids = topk_ids.contiguous();
  std::optional<at::Tensor> map;
  if (expert_map.has_value()) map = expert_map->contiguous();
  const int64_t num_tokens = ids.size(0), topk = ids.size(1), hidden_size = hidden.size(1);

  at::Tensor permuted = at::empty({num_tokens * topk, hidden_size}, hidden.options());
  at::Tensor expanded_row_idx = at::empty({num_tokens * topk}, ids.options().dtype(at::kInt));
  at::Tensor expert_tokens = at::empty({active_end - active_start}, ids.options().dtype(at::kLong));
  ops::call_core([&] {
    if (ids.scalar_type() == at::kInt) {
      build_layout(ids.data_ptr<int32_t>(), ids, num_experts, map, active_start, active_end,
                   counts_cumsum, expanded_row_idx, expert_tokens);
    } else {
      build_layout(ids.data_ptr<int64_t>(), ids, num_experts, map, active_start, active_end,
                   counts_cumsum, expanded_row_idx, expert_tokens);
    }
  });

  // Only rows below the valid count are written; the rest stay as allocated.
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(hidden.element_size());
  if (row_bytes == 0 || num_tokens == 0) return {permuted, expanded_row_idx, expert_tokens};
  const auto* source = static_cast<const char*>(hidden.data_ptr());
  auto* destination = static_cast<char*>(permuted.data_ptr());
  const int32_t* positions = expanded_row_idx.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (row_bytes * topk));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const char* row = source + t * row_bytes;
      for (int64_t k = 0; k < topk; ++k) {
        const int64_t position = positions[t * topk + k];
        if (position >= 0) std::memcpy(destination + position * row_bytes, row, static_cast<size_t>(row_bytes));
      }
    }
  });
  return {permuted, expanded_row_idx, expert_tokens};
}

at::Tensor expert_histogram(const at::Tensor& topk_ids, int64_t num_experts) {
  constexpr const char* op = "expert_histogram";
  ops::check_index(topk_ids, op, "topk_ids");
  MOE_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  const at::Tensor ids = topk_ids.contiguous();
  at::Tensor counts = at::empty({num_experts}, ids.options().dtype(at::kLong));
  ops::call_core([&] {
    if (ids.scalar_type() == at::kInt) {
      core::expert_histogram(ids.data_ptr<int32_t>(), ids.numel(), num_experts,
                             counts.data_ptr<int64_t>());
    } else {
      core::expert_histogram(ids.data_ptr<int64_t>(), ids.numel(), num_experts,
                             counts.data_ptr<int64_t>());
    }
  });
  return counts;
}

}  // namespace moe_ext::cpu
