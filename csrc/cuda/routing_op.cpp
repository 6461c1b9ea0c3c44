// CUDA glue of the routing ops: host-side checks of everything that does not
// need index values (shared with the CPU kernels, csrc/common/routing_checks.h),
// allocation through the caching allocator (CUDA-graph safe), one call into
// the torch-free launchers on the current stream. No host synchronisation:
// value errors are device-side asserts (csrc/cuda/device_check.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "common/op_checks.h"
#include "common/routing_checks.h"
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/launchers.h"

namespace moe_ext::cuda {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

FloatType float_type(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kDouble: return FloatType::kFloat64;
    default: break;
  }
  MOE_THROW_C10(TypeError, "moe_ext: unsupported floating type ", ops::dtype_str(tensor.scalar_type()));
}

int64_t row_bytes(const at::Tensor& matrix) {
  return matrix.size(1) * static_cast<int64_t>(matrix.element_size());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& hidden_states, const at::Tensor& topk_ids, int64_t num_experts,
    int64_t active_start, int64_t active_end, const std::optional<at::Tensor>& expert_map,
    bool counts_cumsum) {
  constexpr const char* op = "moe_permute";
  ops::check_permute_args(hidden_states, topk_ids, num_experts, active_start, active_end, expert_map);
  MOE_CHECK_VALUE(active_end - active_start <= permute_max_active_experts(), op,
                    ": the CUDA kernel supports at most ", permute_max_active_experts(),
                    " experts in the active range, got ", active_end - active_start);
  const c10::cuda::CUDAGuard device_guard(hidden_states.device());
  const at::Tensor hidden = hidden_states.contiguous();
  const at::Tensor ids = topk_ids.contiguous();
  std::optional<at::Tensor> map;
  if (expert_map.has_value()) map = expert_map->contiguous();
  const int64_t num_tokens = ids.size(0), topk = ids.size(1), rows = num_tokens * topk;

  at::Tensor permuted = at::empty({rows, hidden.size(1)}, hidden.options());
  at::Tensor expanded_row_idx = at::empty({rows}, ids.options().dtype(at::kInt));
  at::Tensor expert_tokens = at::empty({active_end - active_start}, ids.options().dtype(at::kLong));
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(permute_workspace_bytes(rows, active_end - active_start))},
      ids.options().dtype(at::kByte));
  MOE_CUDA_CHECK(op, launch_moe_permute(
                         hidden.data_ptr(), row_bytes(hidden), ids.data_ptr(), ids.scalar_type() == at::kLong,
                         num_tokens, topk, num_experts, map.has_value() ? map->data_ptr() : nullptr,
                         map.has_value() && map->scalar_type() == at::kLong, active_start, active_end,
                         counts_cumsum, permuted.data_ptr(), expanded_row_idx.data_ptr<int32_t>(),
                         expert_tokens.data_ptr<int64_t>(), workspace.data_ptr(),
                         c10::cuda::getCurrentCUDAStream()));
  return {permuted, expanded_row_idx, expert_tokens};
}

at::Tensor moe_unpermute(const at::Tensor& permuted, const at::Tensor& expanded_row_idx,
                         const std::optional<at::Tensor>& probs, int64_t topk) {
  constexpr const char* op = "moe_unpermute";
  const int64_t num_tokens = ops::check_unpermute_args(permuted, expanded_row_idx, probs, topk, op);
  const c10::cuda::CUDAGuard device_guard(permuted.device());
  const at::Tensor source = permuted.contiguous();
  const at::Tensor rows = expanded_row_idx.contiguous();
  std::optional<at::Tensor> weights;
  if (probs.has_value()) weights = probs->contiguous();
  at::Tensor out = at::empty({num_tokens, source.size(1)}, source.options());
  MOE_CUDA_CHECK(op, launch_moe_unpermute(
                         float_type(source), source.data_ptr(), source.size(0), source.size(1),
                         rows.data_ptr(), rows.scalar_type() == at::kLong,
                         weights.has_value() ? weights->data_ptr() : nullptr,
                         weights.has_value() && weights->scalar_type() == at::kFloat, num_tokens, topk,
                         out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward(const at::Tensor& grad_output,
                                                          const at::Tensor& permuted,
                                                          const at::Tensor& expanded_row_idx,
                                                          const std::optional<at::Tensor>& probs,
                                                          int64_t topk, bool compute_grad_probs) {
  constexpr const char* op = "moe_unpermute_backward";
  const int64_t num_tokens =
      ops::check_unpermute_backward_args(grad_output, permuted, expanded_row_idx, probs, topk, op);
  MOE_CHECK_VALUE(expanded_row_idx.numel() <= kInt32Max, op,
                    ": expanded_row_idx must have fewer than 2^31 entries, got ", expanded_row_idx.numel());
  const c10::cuda::CUDAGuard device_guard(permuted.device());
  const at::Tensor source = permuted.contiguous();
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor rows = expanded_row_idx.contiguous();
  std::optional<at::Tensor> weights;
  if (probs.has_value()) weights = probs->contiguous();
  const bool with_probs = weights.has_value();
  at::Tensor grad_permuted = at::empty_like(source);
  at::Tensor grad_probs = with_probs ? (compute_grad_probs ? at::empty({num_tokens, topk}, weights->options())
                                                           : at::zeros({num_tokens, topk}, weights->options()))
                                     : at::empty({0}, source.options());
  at::Tensor inverse = at::empty({source.size(0)}, rows.options().dtype(at::kInt));
  MOE_CUDA_CHECK(op, launch_moe_unpermute_backward(
                         float_type(source), grad.data_ptr(), source.data_ptr(), source.size(0),
                         source.size(1), rows.data_ptr(), rows.scalar_type() == at::kLong,
                         with_probs ? weights->data_ptr() : nullptr,
                         with_probs && weights->scalar_type() == at::kFloat, num_tokens, topk,
                         grad_permuted.data_ptr(),
                         with_probs && compute_grad_probs ? grad_probs.data_ptr() : nullptr,
                         inverse.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()));
  return {grad_permuted, grad_probs};
}

at::Tensor expert_histogram(const at::Tensor& topk_ids, int64_t num_experts) {
  constexpr const char* op = "expert_histogram";
  ops::check_index(topk_ids, op, "topk_ids");
  MOE_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  at::Tensor counts = at::empty({num_experts}, ids.options().dtype(at::kLong));
  MOE_CUDA_CHECK(op, launch_expert_histogram(ids.data_ptr(), ids.scalar_type() == at::kLong, ids.numel(),
                                             num_experts, counts.data_ptr<int64_t>(),
                                             c10::cuda::getCurrentCUDAStream()));
  return counts;
}

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& indices) {
  constexpr const char* op = "gather_rows";
  ops::check_rows_args(x, indices, op, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor source = x.contiguous();
  const at::Tensor rows = indices.contiguous();
  at::Tensor out = at::empty({rows.numel(), source.size(1)}, source.options());
  MOE_CUDA_CHECK(op, launch_gather_rows(source.data_ptr(), source.size(0), row_bytes(source), rows.data_ptr(),
                                        rows.scalar_type() == at::kLong, rows.numel(), out.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor scatter_rows(const at::Tensor& x, const at::Tensor& indices, int64_t num_rows) {
  constexpr const char* op = "scatter_rows";
  ops::check_scatter_rows_args(x, indices, num_rows, op);
  MOE_CHECK_VALUE(indices.numel() <= kInt32Max, op, ": indices must have fewer than 2^31 entries, got ",
                    indices.numel());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor source = x.contiguous();
  const at::Tensor rows = indices.contiguous();
  at::Tensor out = at::empty({num_rows, source.size(1)}, source.options());
  at::Tensor inverse = at::empty({num_rows}, rows.options().dtype(at::kInt));
  MOE_CUDA_CHECK(op, launch_scatter_rows(source.data_ptr(), source.size(0), row_bytes(source), rows.data_ptr(),
                                         rows.scalar_type() == at::kLong, num_rows, out.data_ptr(),
                                         inverse.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace moe_ext::cuda
