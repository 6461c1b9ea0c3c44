#include "core/permute_indices.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "core/check.h"

namespace moe_ext::core {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace

void check_permute_indices_shape(int64_t num_counts, int64_t experts_per_rank, int64_t num_ranks,
                                 int64_t max_len, int64_t alignment) {
  MOE_CHECK_ARG(experts_per_rank >= 1, "generate_permute_indices: experts_per_rank must be >= 1, got ",
                experts_per_rank);
  MOE_CHECK_ARG(num_ranks >= 1, "generate_permute_indices: num_ranks must be >= 1, got ", num_ranks);
  MOE_CHECK_ARG(alignment >= 1, "generate_permute_indices: alignment must be >= 1, got ", alignment);
  MOE_CHECK_ARG(alignment <= kInt32Max, "generate_permute_indices: alignment must fit in int32, got ",
                alignment);
  MOE_CHECK_ARG(max_len >= 0, "generate_permute_indices: max_len must be >= 0, got ", max_len);
  MOE_CHECK_ARG(max_len <= kInt32Max + 1, "generate_permute_indices: max_len must be <= 2^31 ",
                "(positions are int32), got ", max_len);
  MOE_CHECK_ARG(experts_per_rank <= kInt32Max / num_ranks,
                "generate_permute_indices: num_ranks * experts_per_rank overflows int32: ", num_ranks,
                " * ", experts_per_rank);
  MOE_CHECK_ARG(num_counts == experts_per_rank * num_ranks,
                "generate_permute_indices: len(tokens_per_expert_group) must be num_ranks * "
                "experts_per_rank = ",
                num_ranks, " * ", experts_per_rank, " = ", num_ranks * experts_per_rank, ", got ",
                num_counts);
}

template <typename CountT>
PermuteIndicesTotals check_permute_indices_args(const CountT* counts, int64_t experts_per_rank,
                                                int64_t num_ranks, int64_t max_len, int64_t alignment) {
  check_permute_indices_shape(experts_per_rank * num_ranks, experts_per_rank, num_ranks, max_len,
                              alignment);
  PermuteIndicesTotals totals;
  for (int64_t e = 0; e < experts_per_rank; ++e) {
    int64_t expert_rows = 0;
    for (int64_t r = 0; r < num_ranks; ++r) {
      const int64_t index = r * experts_per_rank + e;
      const int64_t count = static_cast<int64_t>(counts[index]);
      MOE_CHECK_ARG(count >= 0, "generate_permute_indices: tokens_per_expert_group must be >= 0, got ",
                    count, " at index ", index, " (rank ", r, ", local expert ", e, ")");
      MOE_CHECK_ARG(count <= kInt32Max, "generate_permute_indices: tokens_per_expert_group[", index,
                    "] = ", count, " does not fit in int32");
      expert_rows += count;
      totals.tokens += count;
      // Arriving row indices are written as int32.
      MOE_CHECK_ARG(totals.tokens <= kInt32Max + 1,
                    "generate_permute_indices: total tokens exceed 2^31 (indices are int32)");
    }
    totals.padded_rows += round_up(std::max<int64_t>(expert_rows, alignment), alignment);
    MOE_CHECK_ARG(totals.padded_rows <= kInt32Max,
                  "generate_permute_indices: padded total exceeds int32 (m_offsets is int32)");
  }
  MOE_CHECK_ARG(totals.padded_rows <= max_len, "generate_permute_indices: the padded layout needs ",
                totals.padded_rows, " rows (", totals.tokens, " tokens, ", experts_per_rank,
                " experts aligned to ", alignment, ") but max_len is ", max_len);
  return totals;
}

template <typename CountT>
void generate_permute_indices(const CountT* counts, int64_t experts_per_rank, int64_t num_ranks,
                              int64_t max_len, int64_t alignment, int32_t* permuted_indices,
                              int32_t* m_sizes, int32_t* m_offsets) {
  check_permute_indices_args(counts, experts_per_rank, num_ranks, max_len, alignment);

  // Where each (rank, expert) group starts among the arriving rows.
  const int64_t num_groups = experts_per_rank * num_ranks;
  std::vector<int64_t> group_start(static_cast<size_t>(num_groups));
  int64_t running = 0;
  for (int64_t i = 0; i < num_groups; ++i) {
    group_start[static_cast<size_t>(i)] = running;
    running += static_cast<int64_t>(counts[i]);
  }

  int64_t write = 0;
  for (int64_t e = 0; e < experts_per_rank; ++e) {
    const int64_t block_start = write;
    for (int64_t r = 0; r < num_ranks; ++r) {
      const int64_t index = r * experts_per_rank + e;
      const int64_t first = group_start[static_cast<size_t>(index)];
      const int64_t count = static_cast<int64_t>(counts[index]);
      for (int64_t j = 0; j < count; ++j) permuted_indices[write++] = static_cast<int32_t>(first + j);
    }
    const int64_t block_rows =
        round_up(std::max<int64_t>(write - block_start, alignment), alignment);
    std::fill(permuted_indices + write, permuted_indices + block_start + block_rows, -1);
    write = block_start + block_rows;
    m_sizes[e] = static_cast<int32_t>(block_rows);
    m_offsets[e] = static_cast<int32_t>(write);
  }
  std::fill(permuted_indices + write, permuted_indices + max_len, -1);
}

template PermuteIndicesTotals check_permute_indices_args<int32_t>(const int32_t*, int64_t, int64_t,
                                                                  int64_t, int64_t);
template PermuteIndicesTotals check_permute_indices_args<int64_t>(const int64_t*, int64_t, int64_t,
                                                                  int64_t, int64_t);
template void generate_permute_indices<int32_t>(const int32_t*, int64_t, int64_t, int64_t, int64_t,
                                                int32_t*, int32_t*, int32_t*);
template void generate_permute_indices<int64_t>(const int64_t*, int64_t, int64_t, int64_t, int64_t,
                                                int32_t*, int32_t*, int32_t*);

}  // namespace moe_ext::core
