// CUDA kernels of the moe_ext ops as torch functions (registered in
// csrc/torch_ops.cpp). Built only when the torch in use has CUDA.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <tuple>

namespace moe_ext::cuda {

using Tensor = torch::stable::Tensor;

std::tuple<Tensor, Tensor, Tensor> generate_permute_indices(
    const Tensor& tokens_per_expert_group, int64_t experts_per_rank, int64_t num_ranks,
    int64_t max_len, int64_t alignment);

// Token routing (csrc/cuda/routing_*_op.cpp); contracts in python/moe_ext/ops/routing.py.
std::tuple<Tensor, Tensor, Tensor> moe_permute(
    const Tensor& hidden_states, const Tensor& topk_ids, int64_t num_experts,
    int64_t active_start, int64_t active_end, const std::optional<Tensor>& expert_map,
    bool counts_cumsum);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_permute_padded(
    const Tensor& hidden_states, const std::optional<Tensor>& scales, const Tensor& topk_ids,
    int64_t num_experts, int64_t active_start, int64_t active_end,
    const std::optional<Tensor>& expert_map, bool counts_cumsum, int64_t alignment);
Tensor moe_unpermute(const Tensor& permuted, const Tensor& expanded_row_idx,
                         const std::optional<Tensor>& probs, int64_t topk);
std::tuple<Tensor, Tensor> moe_unpermute_backward(const Tensor& grad_output,
                                                          const Tensor& permuted,
                                                          const Tensor& expanded_row_idx,
                                                          const std::optional<Tensor>& probs,
                                                          int64_t topk, bool compute_grad_probs);
Tensor expert_histogram(const Tensor& topk_ids, int64_t num_experts);
Tensor gather_rows(const Tensor& x, const Tensor& indices);
Tensor scatter_rows(const Tensor& x, const Tensor& indices, int64_t num_rows);

}  // namespace moe_ext::cuda
