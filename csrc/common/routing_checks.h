// Host-side argument checks of the routing ops, shared by the CPU kernels and
// the CUDA glue: everything that does not need to read index values (those
// are checked by the CPU kernels on the host and by device asserts on CUDA).
#pragma once

#include <optional>

#include "common/op_checks.h"
#include "core/routing_layout.h"

namespace moe_ext::ops {

// The checks both permute layouts make of the ids, the expert map and the
// active range against hidden_states [T, H] (its dtype is checked by the caller).
inline void check_routed_ids(const Tensor& hidden_states, const Tensor& topk_ids, int64_t num_experts,
                             int64_t active_start, int64_t active_end,
                             const std::optional<Tensor>& expert_map, const char* op) {
  check_dim(topk_ids, op, "topk_ids", 2);
  check_index(topk_ids, op, "topk_ids");
  check_same_device(topk_ids, hidden_states, op, "topk_ids", "hidden_states");
  MOE_CHECK_VALUE(topk_ids.size(0) == hidden_states.size(0), op,
                  ": topk_ids and hidden_states must have the same number of tokens, got ",
                  topk_ids.size(0), " and ", hidden_states.size(0));
  if (expert_map.has_value()) {
    check_dim(*expert_map, op, "expert_map", 1);
    check_index(*expert_map, op, "expert_map");
    check_same_device(*expert_map, hidden_states, op, "expert_map", "hidden_states");
  }
  core::check_routing_shape(topk_ids.size(0), topk_ids.size(1), num_experts,
                            expert_map.has_value() ? expert_map->numel() : -1, active_start,
                            active_end);
}

inline void check_permute_args(const Tensor& hidden_states, const Tensor& topk_ids,
                               int64_t num_experts, int64_t active_start, int64_t active_end,
                               const std::optional<Tensor>& expert_map) {
  constexpr const char* op = "moe_permute";
  check_dim(hidden_states, op, "hidden_states", 2);
  check_floating(hidden_states, op, "hidden_states");
  check_routed_ids(hidden_states, topk_ids, num_experts, active_start, active_end, expert_map, op);
}

// Checks of moe_permute_padded beyond moe_permute's: hidden_states may also be
// float8 (e4m3fn / e5m2: rows are moved as bytes); scales, when given, are
// float32 [T], [T, 1] (per token) or [T, ceil(H / 128)] (per 128-column block);
// alignment >= 1 with a padded bound that fits int32 positions. Returns the
// padded bound T * K + (active_end - active_start) * (alignment - 1).
inline int64_t check_permute_padded_args(const Tensor& hidden_states, const std::optional<Tensor>& scales,
                                         const Tensor& topk_ids, int64_t num_experts,
                                         int64_t active_start, int64_t active_end,
                                         const std::optional<Tensor>& expert_map, int64_t alignment) {
  constexpr const char* op = "moe_permute";
  check_dim(hidden_states, op, "hidden_states", 2);
  check_dtype(hidden_states, op, "hidden_states",
              {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16, ScalarType::Double,
               ScalarType::Float8_e4m3fn, ScalarType::Float8_e5m2});
  check_routed_ids(hidden_states, topk_ids, num_experts, active_start, active_end, expert_map, op);
  if (scales.has_value()) {
    check_dtype(*scales, op, "scales", {ScalarType::Float});
    check_same_device(*scales, hidden_states, op, "scales", "hidden_states");
    const int64_t blocks = (hidden_states.size(1) + 127) / 128;
    const bool per_token = (scales->dim() == 1 && scales->size(0) == hidden_states.size(0)) ||
                           (scales->dim() == 2 && scales->size(0) == hidden_states.size(0) &&
                            scales->size(1) == 1);
    const bool per_block = scales->dim() == 2 && scales->size(0) == hidden_states.size(0) &&
                           scales->size(1) == blocks;
    MOE_CHECK_VALUE(per_token || per_block, op, ": scales must be [T], [T, 1] or [T, ceil(H / 128)] = [",
                    hidden_states.size(0), ", ", blocks, "] for hidden_states of shape ",
                    shape_str(hidden_states), ", got ", shape_str(*scales));
  }
  return core::padded_rows_bound(topk_ids.size(0), topk_ids.size(1), active_end - active_start,
                                 alignment);
}

// Returns the number of tokens T = expanded_row_idx.numel() / topk.
inline int64_t check_unpermute_args(const Tensor& permuted, const Tensor& expanded_row_idx,
                                    const std::optional<Tensor>& probs, int64_t topk,
                                    const char* op) {
  check_dim(permuted, op, "permuted", 2);
  check_floating(permuted, op, "permuted");
  check_dim(expanded_row_idx, op, "expanded_row_idx", 1);
  check_index(expanded_row_idx, op, "expanded_row_idx");
  check_same_device(expanded_row_idx, permuted, op, "expanded_row_idx", "permuted");
  MOE_CHECK_VALUE(topk >= 1, op, ": topk must be >= 1, got ", topk);
  MOE_CHECK_VALUE(expanded_row_idx.numel() % topk == 0, op, ": expanded_row_idx has ",
                    expanded_row_idx.numel(), " entries, not a multiple of topk = ", topk);
  const int64_t num_tokens = expanded_row_idx.numel() / topk;
  if (probs.has_value()) {
    check_dim(*probs, op, "probs", 2);
    check_floating(*probs, op, "probs");
    check_same_device(*probs, permuted, op, "probs", "permuted");
    MOE_CHECK_VALUE(probs->size(0) == num_tokens && probs->size(1) == topk, op,
                      ": probs must be [T, K] = [", num_tokens, ", ", topk,
                      "] to match expanded_row_idx (T * K = ", expanded_row_idx.numel(), "), got ",
                      shape_str(*probs));
    MOE_CHECK_TYPE(probs->scalar_type() == permuted.scalar_type() ||
                         probs->scalar_type() == ScalarType::Float,
                     op, ": probs must be float32 or the dtype of permuted (",
                   dtype_str(permuted.scalar_type()), "), got ", dtype_str(probs->scalar_type()));
  }
  return num_tokens;
}

inline void check_rows_args(const Tensor& x, const Tensor& indices, const char* op,
                            const char* x_name) {
  check_dim(x, op, x_name, 2);
  check_dim(indices, op, "indices", 1);
  check_index(indices, op, "indices");
  check_same_device(indices, x, op, "indices", x_name);
}

// moe_unpermute_backward: the forward's checks plus grad_output [T, H] of permuted's dtype.
inline int64_t check_unpermute_backward_args(const Tensor& grad_output, const Tensor& permuted,
                                             const Tensor& expanded_row_idx,
                                             const std::optional<Tensor>& probs, int64_t topk,
                                             const char* op) {
  const int64_t num_tokens = check_unpermute_args(permuted, expanded_row_idx, probs, topk, op);
  check_dim(grad_output, op, "grad_output", 2);
  check_same_device(grad_output, permuted, op, "grad_output", "permuted");
  MOE_CHECK_VALUE(grad_output.size(0) == num_tokens && grad_output.size(1) == permuted.size(1), op,
                  ": grad_output must be [T, H] = [", num_tokens, ", ", permuted.size(1), "], got ",
                  shape_str(grad_output));
  MOE_CHECK_TYPE(grad_output.scalar_type() == permuted.scalar_type(), op,
                 ": grad_output must have the dtype of permuted (", dtype_str(permuted.scalar_type()),
                 "), got ", dtype_str(grad_output.scalar_type()));
  return num_tokens;
}

// scatter_rows: one index per row of x, and a non-negative output row count.
inline void check_scatter_rows_args(const Tensor& x, const Tensor& indices, int64_t num_rows,
                                    const char* op) {
  check_rows_args(x, indices, op, "x");
  MOE_CHECK_VALUE(indices.numel() == x.size(0), op, ": indices must have one entry per row of x (",
                  x.size(0), "), got ", indices.numel());
  MOE_CHECK_VALUE(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
}

}  // namespace moe_ext::ops
