// The one place where the moe_ext op library declares its schemas and binds
// each backend's kernel. Kernels live in csrc/cpu and csrc/cuda; fake (meta)
// kernels and autograd are registered from Python, beside each op's wrapper in
// python/moe_ext/ops/.
#include <torch/library.h>

#include "cpu/cpu_ops.h"
#if defined(MOE_EXT_WITH_CUDA)
#include "cuda/cuda_ops.h"
#endif

TORCH_LIBRARY(moe_ext, m) {
  // Indices that regroup all-to-all output from [rank][expert] to [expert][rank]
  // order, each expert block padded to `alignment`; -1 marks padding.
  m.def(
      "generate_permute_indices(Tensor tokens_per_expert_group, int experts_per_rank, "
      "int num_ranks, int max_len, int alignment) -> (Tensor permuted_indices, Tensor m_sizes, "
      "Tensor m_offsets)");
}

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("generate_permute_indices", &moe_ext::cpu::generate_permute_indices);
}

#if defined(MOE_EXT_WITH_CUDA)
TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("generate_permute_indices", &moe_ext::cuda::generate_permute_indices);
}
#endif
