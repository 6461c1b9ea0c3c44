// CPU kernels of moe_permute and expert_histogram: the index maths is the
// core's counting sort (csrc/core/routing_layout.cpp); the row copy is in
// scatter form (each token row read once, written to each of its
// destinations), parallel over tokens.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/op_checks.h"
#include "common/routing_checks.h"
#include "core/routing_layout.h"
#include "cpu/cpu_ops.h"

namespace moe_ext::cpu {
namespace {

using ops::ScalarType;

template <typename IdT>
int64_t build_layout(const IdT* ids, const Tensor& topk_ids, int64_t num_experts,
                     const std::optional<Tensor>& expert_map, int64_t active_start,
                     int64_t active_end, bool counts_cumsum, Tensor& expanded_row_idx,
                     Tensor& expert_tokens) {
  const int64_t num_tokens = topk_ids.size(0), topk = topk_ids.size(1);
  int32_t* positions = expanded_row_idx.mutable_data_ptr<int32_t>();
  int64_t* counts = expert_tokens.mutable_data_ptr<int64_t>();
  if (!expert_map.has_value()) {
    return core::build_routing_layout<IdT, int32_t>(ids, num_tokens, topk, num_experts, nullptr,
                                                    active_start, active_end, counts_cumsum,
                                                    positions, counts);
  }
  if (expert_map->scalar_type() == ScalarType::Int) {
    return core::build_routing_layout(ids, num_tokens, topk, num_experts,
                                      expert_map->const_data_ptr<int32_t>(), active_start, active_end,
                                      counts_cumsum, positions, counts);
  }
  return core::build_routing_layout(ids, num_tokens, topk, num_experts,
                                    expert_map->const_data_ptr<int64_t>(), active_start, active_end,
                                    counts_cumsum, positions, counts);
}

template <typename IdT>
int64_t build_padded_layout(const IdT* ids, const Tensor& topk_ids, int64_t num_experts,
                            const std::optional<Tensor>& expert_map, int64_t active_start,
                            int64_t active_end, int64_t alignment, bool counts_cumsum,
                            Tensor& expanded_row_idx, Tensor& padded_counts, Tensor& counts,
                            std::vector<int64_t>& block_starts) {
  const int64_t num_tokens = topk_ids.size(0), topk = topk_ids.size(1);
  int32_t* positions = expanded_row_idx.mutable_data_ptr<int32_t>();
  int64_t* padded = padded_counts.mutable_data_ptr<int64_t>();
  int64_t* unpadded = counts.mutable_data_ptr<int64_t>();
  if (!expert_map.has_value()) {
    return core::build_padded_routing_layout<IdT, int32_t>(
        ids, num_tokens, topk, num_experts, nullptr, active_start, active_end, alignment,
        counts_cumsum, positions, padded, unpadded, block_starts.data());
  }
  if (expert_map->scalar_type() == ScalarType::Int) {
    return core::build_padded_routing_layout(
        ids, num_tokens, topk, num_experts, expert_map->const_data_ptr<int32_t>(), active_start,
        active_end, alignment, counts_cumsum, positions, padded, unpadded, block_starts.data());
  }
  return core::build_padded_routing_layout(
      ids, num_tokens, topk, num_experts, expert_map->const_data_ptr<int64_t>(), active_start,
      active_end, alignment, counts_cumsum, positions, padded, unpadded, block_starts.data());
}

// Copies token rows (row_bytes each) of `source` to their positions in
// `destination` (scatter form, each source row read once), parallel over tokens.
void scatter_token_rows(const Tensor& source_tensor, Tensor& destination_tensor, int64_t row_bytes,
                        int64_t num_tokens, int64_t topk, const int32_t* positions) {
  if (row_bytes == 0 || num_tokens == 0) return;
  const auto* source = static_cast<const char*>(source_tensor.const_data_ptr());
  auto* destination = static_cast<char*>(destination_tensor.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (row_bytes * topk));
  torch::stable::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const char* row = source + t * row_bytes;
      for (int64_t k = 0; k < topk; ++k) {
        const int64_t position = positions[t * topk + k];
        if (position >= 0)
          std::memcpy(destination + position * row_bytes, row, static_cast<size_t>(row_bytes));
      }
    }
  });
}

// Zeroes the pad rows of every block: [block_starts[e] + count_e, block_starts[e + 1]).
void zero_pad_rows(Tensor& data, int64_t row_bytes, const std::vector<int64_t>& block_starts,
                   const int64_t* counts, bool counts_cumsum) {
  if (row_bytes == 0) return;
  auto* base = static_cast<char*>(data.mutable_data_ptr());
  const int64_t range = static_cast<int64_t>(block_starts.size()) - 1;
  for (int64_t e = 0; e < range; ++e) {
    const int64_t count = counts_cumsum ? counts[e] - (e > 0 ? counts[e - 1] : 0) : counts[e];
    const int64_t first = block_starts[static_cast<size_t>(e)] + count;
    const int64_t end = block_starts[static_cast<size_t>(e) + 1];
    if (end > first)
      std::memset(base + first * row_bytes, 0, static_cast<size_t>((end - first) * row_bytes));
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_permute_padded(
    const Tensor& hidden_states, const std::optional<Tensor>& scales, const Tensor& topk_ids,
    int64_t num_experts, int64_t active_start, int64_t active_end,
    const std::optional<Tensor>& expert_map, bool counts_cumsum, int64_t alignment) {
  const int64_t bound = ops::check_permute_padded_args(hidden_states, scales, topk_ids, num_experts,
                                                       active_start, active_end, expert_map, alignment);
  const Tensor hidden = ops::make_contiguous(hidden_states);
  const Tensor ids = ops::make_contiguous(topk_ids);
  std::optional<Tensor> map;
  if (expert_map.has_value()) map = ops::make_contiguous(*expert_map);
  std::optional<Tensor> row_scales;
  if (scales.has_value()) row_scales = ops::make_contiguous(*scales);
  const int64_t num_tokens = ids.size(0), topk = ids.size(1), hidden_size = hidden.size(1);
  const int64_t range = active_end - active_start;

  Tensor permuted = torch::stable::new_empty(hidden, {bound, hidden_size});
  Tensor permuted_scales =
      row_scales.has_value()
          ? (row_scales->dim() == 1 ? torch::stable::new_empty(*row_scales, {bound})
                                    : torch::stable::new_empty(*row_scales, {bound, row_scales->size(1)}))
          : torch::stable::new_empty(ids, {0}, ScalarType::Float);
  Tensor expanded_row_idx = torch::stable::new_empty(ids, {num_tokens * topk}, ScalarType::Int);
  Tensor expert_tokens = torch::stable::new_empty(ids, {range}, ScalarType::Long);
  Tensor expert_tokens_unpadded = torch::stable::new_empty(ids, {range}, ScalarType::Long);
  std::vector<int64_t> block_starts(static_cast<size_t>(range) + 1, 0);
  if (ids.scalar_type() == ScalarType::Int) {
    build_padded_layout(ids.const_data_ptr<int32_t>(), ids, num_experts, map, active_start, active_end,
                        alignment, counts_cumsum, expanded_row_idx, expert_tokens,
                        expert_tokens_unpadded, block_starts);
  } else {
    build_padded_layout(ids.const_data_ptr<int64_t>(), ids, num_experts, map, active_start, active_end,
                        alignment, counts_cumsum, expanded_row_idx, expert_tokens,
                        expert_tokens_unpadded, block_starts);
  }
  // One pass: rows go straight to their padded positions; only the pad rows
  // are zeroed; rows past the padded total are not written.
  const int32_t* positions = expanded_row_idx.const_data_ptr<int32_t>();
  const int64_t* counts = expert_tokens_unpadded.const_data_ptr<int64_t>();
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(hidden.element_size());
  scatter_token_rows(hidden, permuted, row_bytes, num_tokens, topk, positions);
  zero_pad_rows(permuted, row_bytes, block_starts, counts, counts_cumsum);
  if (row_scales.has_value()) {
    const int64_t scale_bytes = (row_scales->dim() == 1 ? 1 : row_scales->size(1)) *
                                static_cast<int64_t>(row_scales->element_size());
    scatter_token_rows(*row_scales, permuted_scales, scale_bytes, num_tokens, topk, positions);
    zero_pad_rows(permuted_scales, scale_bytes, block_starts, counts, counts_cumsum);
  }
  return {permuted, permuted_scales, expanded_row_idx, expert_tokens, expert_tokens_unpadded};
}

std::tuple<Tensor, Tensor, Tensor> moe_permute(
    const Tensor& hidden_states, const Tensor& topk_ids, int64_t num_experts,
    int64_t active_start, int64_t active_end, const std::optional<Tensor>& expert_map,
    bool counts_cumsum) {
  ops::check_permute_args(hidden_states, topk_ids, num_experts, active_start, active_end,
                          expert_map);
  const Tensor hidden = ops::make_contiguous(hidden_states);
  const Tensor ids = ops::make_contiguous(topk_ids);
  std::optional<Tensor> map;
  if (expert_map.has_value()) map = ops::make_contiguous(*expert_map);
  const int64_t num_tokens = ids.size(0), topk = ids.size(1), hidden_size = hidden.size(1);

  Tensor permuted = torch::stable::new_empty(hidden, {num_tokens * topk, hidden_size});
  Tensor expanded_row_idx = torch::stable::new_empty(ids, {num_tokens * topk}, ScalarType::Int);
  Tensor expert_tokens = torch::stable::new_empty(ids, {active_end - active_start}, ScalarType::Long);
  if (ids.scalar_type() == ScalarType::Int) {
    build_layout(ids.const_data_ptr<int32_t>(), ids, num_experts, map, active_start, active_end,
                 counts_cumsum, expanded_row_idx, expert_tokens);
  } else {
    build_layout(ids.const_data_ptr<int64_t>(), ids, num_experts, map, active_start, active_end,
                 counts_cumsum, expanded_row_idx, expert_tokens);
  }

  // Only rows below the valid count are written; the rest stay as allocated.
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(hidden.element_size());
  if (row_bytes == 0 || num_tokens == 0) return {permuted, expanded_row_idx, expert_tokens};
  const auto* source = static_cast<const char*>(hidden.const_data_ptr());
  auto* destination = static_cast<char*>(permuted.mutable_data_ptr());
  const int32_t* positions = expanded_row_idx.const_data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (row_bytes * topk));
  torch::stable::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
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

Tensor expert_histogram(const Tensor& topk_ids, int64_t num_experts) {
  constexpr const char* op = "expert_histogram";
  ops::check_index(topk_ids, op, "topk_ids");
  MOE_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  const Tensor ids = ops::make_contiguous(topk_ids);
  Tensor counts = torch::stable::new_empty(ids, {num_experts}, ScalarType::Long);
  if (ids.scalar_type() == ScalarType::Int) {
    core::expert_histogram(ids.const_data_ptr<int32_t>(), ids.numel(), num_experts,
                           counts.mutable_data_ptr<int64_t>());
  } else {
    core::expert_histogram(ids.const_data_ptr<int64_t>(), ids.numel(), num_experts,
                           counts.mutable_data_ptr<int64_t>());
  }
  return counts;
}

}  // namespace moe_ext::cpu
