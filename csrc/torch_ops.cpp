// The one place where the moe_ext op library declares its schemas and binds
// each backend's kernel. Kernels live in csrc/cpu and csrc/cuda; fake (meta)
// kernels and autograd are registered from Python, beside each op's wrapper in
// python/moe_ext/ops/.
//
// Everything here goes through PyTorch's stable ABI (STABLE_TORCH_LIBRARY,
// boxed kernels via TORCH_BOX), so one binary serves every torch from the
// targeted release on (docs/DESIGN.md, "Binary compatibility"). This file is
// compiled twice:
//   _C.so       schemas + CPU kernels; loads on any torch >= the minimum.
//   _C_cuda.so  (MOE_EXT_CUDA_LIBRARY) the CUDA kernels' registrations only;
//               moe_ext/_loader.py loads it when the running torch has CUDA.
#include <torch/csrc/stable/library.h>

#if defined(MOE_EXT_CUDA_LIBRARY)
#include "cuda/cuda_ops.h"
#else
#include "cpu/cpu_ops.h"
#endif

#if !defined(MOE_EXT_CUDA_LIBRARY)
STABLE_TORCH_LIBRARY(moe_ext, m) {
  // Indices that regroup all-to-all output from [rank][expert] to [expert][rank]
  // order, each expert block padded to `alignment`; -1 marks padding.
  m.def(
      "generate_permute_indices(Tensor tokens_per_expert_group, int experts_per_rank, "
      "int num_ranks, int max_len, int alignment) -> (Tensor permuted_indices, Tensor m_sizes, "
      "Tensor m_offsets)");
  // Token routing (contracts: python/moe_ext/ops/routing.py and regroup.py).
  // Dropless permute in the npu_moe_init_routing_v2 layout: rows stably sorted by
  // (mapped) expert id, rows outside [active_start, active_end) dropped;
  // expanded_row_idx in gather form; counts per active expert (or their cumsum).
  m.def(
      "moe_permute(Tensor hidden_states, Tensor topk_ids, int num_experts, int active_start, "
      "int active_end, Tensor? expert_map, bool counts_cumsum) -> (Tensor permuted, "
      "Tensor expanded_row_idx, Tensor expert_tokens)");
  // moe_permute for grouped GEMMs and fp8 dispatch: each active expert's block padded to a
  // multiple of `alignment` (pad rows zero, rows past the padded total unwritten; the row
  // count is the static bound T*K + (end - start)*(alignment - 1)); hidden_states may be
  // float8, moved with its optional fp32 row scales ([T], [T,1] or [T, ceil(H/128)];
  // permuted_scales is empty without them); counts padded and unpadded.
  m.def(
      "moe_permute_padded(Tensor hidden_states, Tensor? scales, Tensor topk_ids, int num_experts, "
      "int active_start, int active_end, Tensor? expert_map, bool counts_cumsum, int alignment) -> "
      "(Tensor permuted, Tensor permuted_scales, Tensor expanded_row_idx, Tensor expert_tokens, "
      "Tensor expert_tokens_unpadded)");
  // out[t] = sum_k probs[t,k] * permuted[expanded_row_idx[t*topk+k]], -1 skipped, fp32 sums.
  m.def("moe_unpermute(Tensor permuted, Tensor expanded_row_idx, Tensor? probs, int topk) -> Tensor");
  // Gradients of moe_unpermute: grad_permuted[row] = probs[t,k] * grad_output[t] (unnamed rows
  // unspecified: unwritten on CUDA, zeros on CPU; zeros everywhere when permuted has more rows than
  // expanded_row_idx has entries, the aligned layout, whose pad rows sit inside GEMM groups); grad_probs[t,k] = dot(grad_output[t], permuted[row]) when
  // compute_grad_probs (zeros otherwise, empty without probs).
  m.def(
      "moe_unpermute_backward(Tensor grad_output, Tensor permuted, Tensor expanded_row_idx, "
      "Tensor? probs, int topk, bool compute_grad_probs) -> (Tensor grad_permuted, Tensor grad_probs)");
  // int64 count of each expert id in [0, num_experts).
  m.def("expert_histogram(Tensor topk_ids, int num_experts) -> Tensor");
  // out[p] = x[indices[p]], zeros where indices[p] == -1.
  m.def("gather_rows(Tensor x, Tensor indices) -> Tensor");
  // out[indices[p]] = x[p]; rows no index names are zeros; each row named at most once.
  m.def("scatter_rows(Tensor x, Tensor indices, int num_rows) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("generate_permute_indices", TORCH_BOX(&moe_ext::cpu::generate_permute_indices));
  m.impl("moe_permute", TORCH_BOX(&moe_ext::cpu::moe_permute));
  m.impl("moe_permute_padded", TORCH_BOX(&moe_ext::cpu::moe_permute_padded));
  m.impl("moe_unpermute", TORCH_BOX(&moe_ext::cpu::moe_unpermute));
  m.impl("moe_unpermute_backward", TORCH_BOX(&moe_ext::cpu::moe_unpermute_backward));
  m.impl("expert_histogram", TORCH_BOX(&moe_ext::cpu::expert_histogram));
  m.impl("gather_rows", TORCH_BOX(&moe_ext::cpu::gather_rows));
  m.impl("scatter_rows", TORCH_BOX(&moe_ext::cpu::scatter_rows));
}

#else  // MOE_EXT_CUDA_LIBRARY
STABLE_TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("generate_permute_indices", TORCH_BOX(&moe_ext::cuda::generate_permute_indices));
  m.impl("moe_permute", TORCH_BOX(&moe_ext::cuda::moe_permute));
  m.impl("moe_permute_padded", TORCH_BOX(&moe_ext::cuda::moe_permute_padded));
  m.impl("moe_unpermute", TORCH_BOX(&moe_ext::cuda::moe_unpermute));
  m.impl("moe_unpermute_backward", TORCH_BOX(&moe_ext::cuda::moe_unpermute_backward));
  m.impl("expert_histogram", TORCH_BOX(&moe_ext::cuda::expert_histogram));
  m.impl("gather_rows", TORCH_BOX(&moe_ext::cuda::gather_rows));
  m.impl("scatter_rows", TORCH_BOX(&moe_ext::cuda::scatter_rows));
}
#endif
