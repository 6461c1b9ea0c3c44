// CUDA kernels of the moe_ext ops as torch functions (registered in
// csrc/torch_ops.cpp). Built only when the torch in use has CUDA.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace moe_ext::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> generate_permute_indices(
    const at::Tensor& tokens_per_expert_group, int64_t experts_per_rank, int64_t num_ranks,
    int64_t max_len, int64_t alignment);

// Token routing (csrc/cuda/routing_*_op.cpp); contracts in python/moe_ext/ops/routing.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute(
    const at::Tensor& hidden_states, const at::Tensor& topk_ids, int64_t num_experts,
    int64_t active_start, int64_t active_end, const std::optional<at::Tensor>& expert_map,
    bool counts_cumsum);
at::Tensor moe_unpermute(const at::Tensor& permuted, const at::Tensor& expanded_row_idx,
                         const std::optional<at::Tensor>& probs, int64_t topk);
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward(const at::Tensor& grad_output,
                                                          const at::Tensor& permuted,
                                                          const at::Tensor& expanded_row_idx,
                                                          const std::optional<at::Tensor>& probs,
                                                          int64_t topk, bool compute_grad_probs);
at::Tensor expert_histogram(const at::Tensor& topk_ids, int64_t num_experts);
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& indices);
at::Tensor scatter_rows(const at::Tensor& x, const at::Tensor& indices, int64_t num_rows);

}  // namespace moe_ext::cuda
