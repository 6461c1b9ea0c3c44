// Permutation indices for the regroup after an expert-parallel all-to-all.
//
// After the token all-to-all, rank-local rows arrive ordered
// [source rank][local expert]. Grouped GEMMs want them ordered
// [local expert][source rank], each expert's block padded to `alignment`
// rows (an empty expert still gets `alignment` rows so no GEMM group is empty).
//
// Inputs: tokens_per_expert_group[r * experts_per_rank + e] = rows that rank r
// sent to local expert e (rank-major, length num_ranks * experts_per_rank).
// Outputs:
//   m_sizes[e]   = round_up(max(sum_r tokens(r, e), alignment), alignment)
//   m_offsets[e] = m_sizes[0] + ... + m_sizes[e]          (inclusive)
//   permuted_indices[max_len]: position p inside expert e's block, at offset q
//     from its start, holds the arriving row index of the q-th row of expert e
//     in source-rank order, or -1 for padding and for p >= m_offsets[last].
//
// The padded total must fit in max_len, and every index in int32: both are
// refused up front (std::invalid_argument) before anything is written.
#pragma once

#include <cstdint>

namespace moe_ext::core {

struct PermuteIndicesTotals {
  int64_t tokens = 0;        // sum of all counts: the number of arriving rows
  int64_t padded_rows = 0;   // m_offsets[last]: rows of the padded layout
};

// Validates every argument and returns the totals; writes nothing.
template <typename CountT>
PermuteIndicesTotals check_permute_indices_args(const CountT* tokens_per_expert_group,
                                                int64_t experts_per_rank, int64_t num_ranks,
                                                int64_t max_len, int64_t alignment);

// Validates (as above), then fills the three outputs.
template <typename CountT>
void generate_permute_indices(const CountT* tokens_per_expert_group, int64_t experts_per_rank,
                              int64_t num_ranks, int64_t max_len, int64_t alignment,
                              int32_t* permuted_indices, int32_t* m_sizes, int32_t* m_offsets);

// Shape checks that do not need the counts (also used by the CUDA path, which
// cannot read the counts on the host without a synchronisation).
void check_permute_indices_shape(int64_t num_counts, int64_t experts_per_rank, int64_t num_ranks,
                                 int64_t max_len, int64_t alignment);

}  // namespace moe_ext::core
