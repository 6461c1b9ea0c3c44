// Torch-free launchers of the CUDA kernels: raw device pointers and a stream.
// They return the launch status; the torch glue in csrc/cuda/*_op.cpp checks
// arguments first and turns a bad status into a Python error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moe_ext::cuda {

// Dynamic shared memory the permute-indices kernel needs for these shapes.
size_t permute_indices_shared_bytes(int64_t experts_per_rank, int64_t num_ranks);

// One launch, no synchronisation. `counts` is int32 or int64 (counts_are_int64),
// rank-major [num_ranks * experts_per_rank]. Negative counts and a padded total
// above max_len stop the kernel with a device-side assert, after writing
// nothing out of bounds.
cudaError_t launch_generate_permute_indices(const void* counts, bool counts_are_int64,
                                            int64_t experts_per_rank, int64_t num_ranks,
                                            int64_t max_len, int64_t alignment,
                                            int32_t* permuted_indices, int32_t* m_sizes,
                                            int32_t* m_offsets, cudaStream_t stream);

}  // namespace moe_ext::cuda
