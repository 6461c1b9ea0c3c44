// CUDA glue of the routing ops: host-side checks of everything that does not
// need index values (shared with the CPU kernels, csrc/common/routing_checks.h),
// allocation through the caching allocator (CUDA-graph safe), one call into
// the torch-free launchers on the current stream. No host synchronisation:
// value errors are device-side asserts (csrc/cuda/device_check.cuh).
#include <torch/csrc/stable/ops.h>

#include <limits>

#include "common/op_checks.h"
#include "common/routing_checks.h"
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/launchers.h"

namespace moe_ext::cuda {
namespace {

using ops::ScalarType;

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

FloatType float_type(const Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case ScalarType::Float: return FloatType::kFloat32;
    case ScalarType::Half: return FloatType::kFloat16;
    case ScalarType::BFloat16: return FloatType::kBFloat16;
    case ScalarType::Double: return FloatType::kFloat64;
    default: break;
  }
  MOE_THROW_TYPE("moe_ext: unsupported floating type ", ops::dtype_str(tensor.scalar_type()));
}

int64_t row_bytes(const Tensor& matrix) {
  return matrix.size(1) * static_cast<int64_t>(matrix.element_size());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> moe_permute(
    const Tensor& hidden_states, const Tensor& topk_ids, int64_t num_experts,
    int64_t active_start, int64_t active_end, const std::optional<Tensor>& expert_map,
    bool counts_cumsum) {
  constexpr const char* op = "moe_permute";
  ops::check_permute_args(hidden_states, topk_ids, num_experts, active_start, active_end, expert_map);
  MOE_CHECK_VALUE(active_end - active_start <= permute_max_active_experts(), op,
                    ": the CUDA kernel supports at most ", permute_max_active_experts(),
                    " experts in the active range, got ", active_end - active_start);
  const DeviceGuard device(hidden_states);
  const Tensor hidden = ops::make_contiguous(hidden_states);
  const Tensor ids = ops::make_contiguous(topk_ids);
  std::optional<Tensor> map;
  if (expert_map.has_value()) map = ops::make_contiguous(*expert_map);
  const int64_t num_tokens = ids.size(0), topk = ids.size(1), rows = num_tokens * topk;

  Tensor permuted = torch::stable::new_empty(hidden, {rows, hidden.size(1)});
  Tensor expanded_row_idx = torch::stable::new_empty(ids, {rows}, ScalarType::Int);
  Tensor expert_tokens = torch::stable::new_empty(ids, {active_end - active_start}, ScalarType::Long);
  Tensor workspace = torch::stable::new_empty(
      ids, {static_cast<int64_t>(permute_workspace_bytes(rows, active_end - active_start))},
      ScalarType::Byte);
  MOE_CUDA_CHECK(op, launch_moe_permute(
                         hidden.data_ptr(), row_bytes(hidden), ids.data_ptr(), ids.scalar_type() == ScalarType::Long,
                         num_tokens, topk, num_experts, map.has_value() ? map->data_ptr() : nullptr,
                         map.has_value() && map->scalar_type() == ScalarType::Long, active_start, active_end,
                         counts_cumsum, permuted.data_ptr(), expanded_row_idx.mutable_data_ptr<int32_t>(),
                         expert_tokens.mutable_data_ptr<int64_t>(), workspace.data_ptr(),
                         device.stream()));
  return {permuted, expanded_row_idx, expert_tokens};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_permute_padded(
    const Tensor& hidden_states, const std::optional<Tensor>& scales, const Tensor& topk_ids,
    int64_t num_experts, int64_t active_start, int64_t active_end,
    const std::optional<Tensor>& expert_map, bool counts_cumsum, int64_t alignment) {
  constexpr const char* op = "moe_permute";
  const int64_t bound = ops::check_permute_padded_args(hidden_states, scales, topk_ids, num_experts,
                                                       active_start, active_end, expert_map, alignment);
  MOE_CHECK_VALUE(active_end - active_start <= permute_max_active_experts(), op,
                  ": the CUDA kernel supports at most ", permute_max_active_experts(),
                  " experts in the active range, got ", active_end - active_start);
  const DeviceGuard device(hidden_states);
  const Tensor hidden = ops::make_contiguous(hidden_states);
  const Tensor ids = ops::make_contiguous(topk_ids);
  std::optional<Tensor> map;
  if (expert_map.has_value()) map = ops::make_contiguous(*expert_map);
  std::optional<Tensor> row_scales;
  if (scales.has_value()) row_scales = ops::make_contiguous(*scales);
  const int64_t num_tokens = ids.size(0), topk = ids.size(1), rows = num_tokens * topk;
  const int64_t range = active_end - active_start;

  Tensor permuted = torch::stable::new_empty(hidden, {bound, hidden.size(1)});
  Tensor permuted_scales =
      row_scales.has_value()
          ? (row_scales->dim() == 1 ? torch::stable::new_empty(*row_scales, {bound})
                                    : torch::stable::new_empty(*row_scales, {bound, row_scales->size(1)}))
          : torch::stable::new_empty(ids, {0}, ScalarType::Float);
  Tensor expanded_row_idx = torch::stable::new_empty(ids, {rows}, ScalarType::Int);
  Tensor expert_tokens = torch::stable::new_empty(ids, {range}, ScalarType::Long);
  Tensor expert_tokens_unpadded = torch::stable::new_empty(ids, {range}, ScalarType::Long);
  Tensor workspace = torch::stable::new_empty(
      ids, {static_cast<int64_t>(permute_padded_workspace_bytes(rows, range))}, ScalarType::Byte);
  const int64_t scale_row_bytes =
      row_scales.has_value()
          ? (row_scales->dim() == 1 ? 1 : row_scales->size(1)) * static_cast<int64_t>(row_scales->element_size())
          : 0;
  MOE_CUDA_CHECK(op, launch_moe_permute_padded(
                         hidden.data_ptr(), row_bytes(hidden),
                         row_scales.has_value() ? row_scales->data_ptr() : nullptr, scale_row_bytes,
                         ids.data_ptr(), ids.scalar_type() == ScalarType::Long, num_tokens, topk,
                         num_experts, map.has_value() ? map->data_ptr() : nullptr,
                         map.has_value() && map->scalar_type() == ScalarType::Long, active_start,
                         active_end, alignment, counts_cumsum, permuted.data_ptr(),
                         row_scales.has_value() ? permuted_scales.data_ptr() : nullptr,
                         expanded_row_idx.mutable_data_ptr<int32_t>(),
                         expert_tokens.mutable_data_ptr<int64_t>(),
                         expert_tokens_unpadded.mutable_data_ptr<int64_t>(), workspace.data_ptr(),
                         device.stream()));
  return {permuted, permuted_scales, expanded_row_idx, expert_tokens, expert_tokens_unpadded};
}

Tensor moe_unpermute(const Tensor& permuted, const Tensor& expanded_row_idx,
                         const std::optional<Tensor>& probs, int64_t topk) {
  constexpr const char* op = "moe_unpermute";
  const int64_t num_tokens = ops::check_unpermute_args(permuted, expanded_row_idx, probs, topk, op);
  const DeviceGuard device(permuted);
  const Tensor source = ops::make_contiguous(permuted);
  const Tensor rows = ops::make_contiguous(expanded_row_idx);
  std::optional<Tensor> weights;
  if (probs.has_value()) weights = ops::make_contiguous(*probs);
  Tensor out = torch::stable::new_empty(source, {num_tokens, source.size(1)});
  MOE_CUDA_CHECK(op, launch_moe_unpermute(
                         float_type(source), source.data_ptr(), source.size(0), source.size(1),
                         rows.data_ptr(), rows.scalar_type() == ScalarType::Long,
                         weights.has_value() ? weights->data_ptr() : nullptr,
                         weights.has_value() && weights->scalar_type() == ScalarType::Float, num_tokens, topk,
                         out.data_ptr(), device.stream()));
  return out;
}

std::tuple<Tensor, Tensor> moe_unpermute_backward(const Tensor& grad_output,
                                                          const Tensor& permuted,
                                                          const Tensor& expanded_row_idx,
                                                          const std::optional<Tensor>& probs,
                                                          int64_t topk, bool compute_grad_probs) {
  constexpr const char* op = "moe_unpermute_backward";
  const int64_t num_tokens =
      ops::check_unpermute_backward_args(grad_output, permuted, expanded_row_idx, probs, topk, op);
  MOE_CHECK_VALUE(expanded_row_idx.numel() <= kInt32Max, op,
                    ": expanded_row_idx must have fewer than 2^31 entries, got ", expanded_row_idx.numel());
  const DeviceGuard device(permuted);
  const Tensor source = ops::make_contiguous(permuted);
  const Tensor grad = ops::make_contiguous(grad_output);
  const Tensor rows = ops::make_contiguous(expanded_row_idx);
  std::optional<Tensor> weights;
  if (probs.has_value()) weights = ops::make_contiguous(*probs);
  const bool with_probs = weights.has_value();
  Tensor grad_permuted = torch::stable::empty_like(source);
  Tensor grad_probs = with_probs ? (compute_grad_probs ? torch::stable::new_empty(*weights, {num_tokens, topk})
                                                       : torch::stable::new_zeros(*weights, {num_tokens, topk}))
                                 : torch::stable::new_empty(source, {0});
  Tensor inverse = torch::stable::new_empty(rows, {source.size(0)}, ScalarType::Int);
  MOE_CUDA_CHECK(op, launch_moe_unpermute_backward(
                         float_type(source), grad.data_ptr(), source.data_ptr(), source.size(0),
                         source.size(1), rows.data_ptr(), rows.scalar_type() == ScalarType::Long,
                         with_probs ? weights->data_ptr() : nullptr,
                         with_probs && weights->scalar_type() == ScalarType::Float, num_tokens, topk,
                         grad_permuted.data_ptr(),
                         with_probs && compute_grad_probs ? grad_probs.data_ptr() : nullptr,
                         inverse.mutable_data_ptr<int32_t>(), device.stream()));
  return {grad_permuted, grad_probs};
}

Tensor expert_histogram(const Tensor& topk_ids, int64_t num_experts) {
  constexpr const char* op = "expert_histogram";
  ops::check_index(topk_ids, op, "topk_ids");
  MOE_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  const DeviceGuard device(topk_ids);
  const Tensor ids = ops::make_contiguous(topk_ids);
  Tensor counts = torch::stable::new_empty(ids, {num_experts}, ScalarType::Long);
  MOE_CUDA_CHECK(op, launch_expert_histogram(ids.data_ptr(), ids.scalar_type() == ScalarType::Long, ids.numel(),
                                             num_experts, counts.mutable_data_ptr<int64_t>(),
                                             device.stream()));
  return counts;
}

Tensor gather_rows(const Tensor& x, const Tensor& indices) {
  constexpr const char* op = "gather_rows";
  ops::check_rows_args(x, indices, op, "x");
  const DeviceGuard device(x);
  const Tensor source = ops::make_contiguous(x);
  const Tensor rows = ops::make_contiguous(indices);
  Tensor out = torch::stable::new_empty(source, {rows.numel(), source.size(1)});
  MOE_CUDA_CHECK(op, launch_gather_rows(source.data_ptr(), source.size(0), row_bytes(source), rows.data_ptr(),
                                        rows.scalar_type() == ScalarType::Long, rows.numel(), out.data_ptr(),
                                        device.stream()));
  return out;
}

Tensor scatter_rows(const Tensor& x, const Tensor& indices, int64_t num_rows) {
  constexpr const char* op = "scatter_rows";
  ops::check_scatter_rows_args(x, indices, num_rows, op);
  MOE_CHECK_VALUE(indices.numel() <= kInt32Max, op, ": indices must have fewer than 2^31 entries, got ",
                    indices.numel());
  const DeviceGuard device(x);
  const Tensor source = ops::make_contiguous(x);
  const Tensor rows = ops::make_contiguous(indices);
  Tensor out = torch::stable::new_empty(source, {num_rows, source.size(1)});
  Tensor inverse = torch::stable::new_empty(rows, {num_rows}, ScalarType::Int);
  MOE_CUDA_CHECK(op, launch_scatter_rows(source.data_ptr(), source.size(0), row_bytes(source), rows.data_ptr(),
                                         rows.scalar_type() == ScalarType::Long, num_rows, out.data_ptr(),
                                         inverse.mutable_data_ptr<int32_t>(), device.stream()));
  return out;
}

}  // namespace moe_ext::cuda
