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

// ---------------------------------------------------------------- token routing
// (csrc/cuda/routing_*.cu). No launcher synchronises. Value errors (an id or a
// row index out of range, a row named twice) stop the kernel with a
// device-side assert and an out-of-range entry is never used as an address (a
// row named twice is in range: moe_unpermute's backward may write it from both
// namings before its assert stops the kernel).

// Element types of the floating-point routing kernels.
enum class FloatType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Widest active expert range the CUDA permute supports (per-warp counters in
// shared memory).
int64_t permute_max_active_experts();

// Workspace moe_permute needs for these sizes (bytes, 16-aligned).
size_t permute_workspace_bytes(int64_t num_rows, int64_t active_experts);

// moe_permute: builds expanded_row_idx / expert_tokens (counting sort) and
// copies each token row to its destinations (scatter form). `hidden` is
// [num_tokens, row_bytes] as bytes; expert_map may be null.
cudaError_t launch_moe_permute(const void* hidden, int64_t row_bytes, const void* topk_ids,
                               bool ids_are_int64, int64_t num_tokens, int64_t topk,
                               int64_t num_experts, const void* expert_map, bool map_is_int64,
                               int64_t active_start, int64_t active_end, bool counts_cumsum,
                               void* permuted, int32_t* expanded_row_idx, int64_t* expert_tokens,
                               void* workspace, cudaStream_t stream);

// The index build of launch_moe_permute alone (expanded_row_idx, expert_tokens).
cudaError_t launch_permute_index(const void* topk_ids, bool ids_are_int64, int64_t num_tokens,
                                 int64_t topk, int64_t num_experts, const void* expert_map,
                                 bool map_is_int64, int64_t active_start, int64_t active_end,
                                 bool counts_cumsum, int32_t* expanded_row_idx,
                                 int64_t* expert_tokens, void* workspace, cudaStream_t stream);

// The row copy of launch_moe_permute alone: token t's row (row_bytes bytes of
// `source`) goes to row expanded_row_idx[t*K+k] of `destination` for each k with a
// position (>= 0, written by the index build).
cudaError_t launch_permute_copy_rows(const void* source, int64_t row_bytes, int64_t num_tokens,
                                     int64_t topk, const int32_t* expanded_row_idx,
                                     void* destination, cudaStream_t stream);

// The one-launch permute (csrc/cuda/routing_permute_onepass.cu): the index
// build, the row copy and, for the padded layout, the scale rows and the pad
// zeroing in ONE cooperative kernel (count -> grid barrier -> scan -> place and
// copy). It serves both ops where the shape fits (routing_geometry.h
// onepass_plan) and where it was measured faster (onepass_preferred);
// launch_permute_onepass sets *launched to false, launching nothing, elsewhere
// (the multi-launch path runs then).
struct OnepassPermute {
  const void* hidden = nullptr;  // [num_tokens, row_bytes] bytes
  int64_t row_bytes = 0;         // 0: the index alone
  void* permuted = nullptr;
  const void* scales = nullptr;  // fp32 [num_tokens, scale_row_bytes / 4] or null
  int64_t scale_row_bytes = 0;
  void* permuted_scales = nullptr;
  const void* topk_ids = nullptr;
  bool ids_are_int64 = false;
  int64_t num_tokens = 0;
  int64_t topk = 0;
  int64_t num_experts = 0;
  const void* expert_map = nullptr;  // may be null
  bool map_is_int64 = false;
  int64_t active_start = 0;
  int64_t active_end = 0;
  int64_t alignment = 1;  // 1: the plain layout
  bool counts_cumsum = false;
  int32_t* expanded_row_idx = nullptr;
  int64_t* expert_tokens = nullptr;           // padded counts for alignment > 1
  int64_t* expert_tokens_unpadded = nullptr;  // null for the plain op (and only for it)
  void* workspace = nullptr;                  // permute_onepass_workspace_bytes
};

// Workspace of the one-launch permute (bytes, 16-aligned; 0 where it never applies).
size_t permute_onepass_workspace_bytes(int64_t num_rows, int64_t active_experts);

cudaError_t launch_permute_onepass(const OnepassPermute& request, cudaStream_t stream, bool* launched);

// Workspace moe_permute_padded needs (bytes, 16-aligned).
size_t permute_padded_workspace_bytes(int64_t num_rows, int64_t active_experts);

// moe_permute_padded: the index build, then positions moved to per-expert
// blocks padded to a multiple of `alignment`, then one row copy of the hidden
// rows (and of the scale rows, if scales is not null) straight to the padded
// positions, and the pad rows zeroed. expert_tokens gets the padded counts,
// expert_tokens_unpadded the unpadded ones (each as counts or inclusive cumsum).
cudaError_t launch_moe_permute_padded(const void* hidden, int64_t row_bytes, const void* scales,
                                      int64_t scale_row_bytes, const void* topk_ids,
                                      bool ids_are_int64, int64_t num_tokens, int64_t topk,
                                      int64_t num_experts, const void* expert_map, bool map_is_int64,
                                      int64_t active_start, int64_t active_end, int64_t alignment,
                                      bool counts_cumsum, void* permuted, void* permuted_scales,
                                      int32_t* expanded_row_idx, int64_t* expert_tokens,
                                      int64_t* expert_tokens_unpadded, void* workspace,
                                      cudaStream_t stream);

// expert_histogram: counts[e] = entries of ids equal to e (int64).
cudaError_t launch_expert_histogram(const void* ids, bool ids_are_int64, int64_t count,
                                    int64_t num_experts, int64_t* counts, cudaStream_t stream);

// moe_unpermute: out[t] = sum_k probs[t,k] * permuted[row_idx[t*K+k]] (-1 skipped),
// fp32 sums (fp64 for kFloat64). probs may be null (weight 1); probs_are_float32
// says whether probs is float32 or of `type`.
cudaError_t launch_moe_unpermute(FloatType type, const void* permuted, int64_t num_rows,
                                 int64_t hidden_size, const void* row_idx, bool row_idx_is_int64,
                                 const void* probs, bool probs_are_float32, int64_t num_tokens,
                                 int64_t topk, void* out, cudaStream_t stream);

// Backward of moe_unpermute. grad_permuted[row] = probs[t,k] * grad_out[t] for
// row = row_idx[t*K+k]; rows no entry names are NOT written; grad_probs (may be
// null) [t,k] = dot(grad_out[t], permuted[row]) or 0. inverse is int32 scratch
// [num_rows] (its first ceil(num_rows / 32) words hold the named-row bitmask that
// refuses a row named twice). Each named row is written by one block: no atomics on data.
cudaError_t launch_moe_unpermute_backward(FloatType type, const void* grad_out, const void* permuted,
                                          int64_t num_rows, int64_t hidden_size, const void* row_idx,
                                          bool row_idx_is_int64, const void* probs,
                                          bool probs_are_float32, int64_t num_tokens, int64_t topk,
                                          void* grad_permuted, void* grad_probs, int32_t* inverse,
                                          cudaStream_t stream);

// gather_rows: out[p] = x[indices[p]] or zeros for -1; rows are row_bytes bytes.
cudaError_t launch_gather_rows(const void* x, int64_t num_rows, int64_t row_bytes,
                               const void* indices, bool indices_are_int64, int64_t count, void* out,
                               cudaStream_t stream);

// scatter_rows: out[indices[p]] = x[p], zero rows where nothing lands; inverse
// is int32 scratch [num_out_rows].
cudaError_t launch_scatter_rows(const void* x, int64_t count, int64_t row_bytes, const void* indices,
                                bool indices_are_int64, int64_t num_out_rows, void* out,
                                int32_t* inverse, cudaStream_t stream);

}  // namespace moe_ext::cuda
