#include "core/routing_layout.h"

#include <limits>
#include <vector>

#include "core/check.h"

namespace moe_ext::core {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Ids must be in [0, num_experts) or -1 ("no expert": padding tokens, dropped
// like a row that expert_map sends to -1). Every comparison is made on the
// widened value before any arithmetic, so no id can overflow an index.
template <typename IdT>
void check_ids_in_range(const IdT* ids, int64_t count, int64_t topk, int64_t num_experts,
                        const char* op) {
  for (int64_t f = 0; f < count; ++f) {
    const int64_t id = static_cast<int64_t>(ids[f]);
    MOE_CHECK_ARG(id >= -1 && id < num_experts, op, ": topk_ids must be in [0, num_experts=",
                  num_experts, ") or -1 (no expert), got ", id, " at token ", f / topk, ", slot ",
                  f % topk);
  }
}

// The map values that rows look up must be -1 (not on this rank) or a key in
// [0, num_experts) (the key space that active_expert_range is drawn from).
// Anything else is a corrupt map: refused, never used as an index or an
// offset. Only entries that some row looks up are checked, as on CUDA (where
// the check is a device-side assert at the lookup).
template <typename IdT, typename MapT>
void check_looked_up_map_values(const IdT* ids, int64_t count, int64_t num_experts,
                                const MapT* expert_map, const char* op) {
  for (int64_t f = 0; f < count; ++f) {
    const int64_t id = static_cast<int64_t>(ids[f]);
    if (id < 0) continue;
    const int64_t key = static_cast<int64_t>(expert_map[id]);
    MOE_CHECK_ARG(key >= -1 && key < num_experts, op, ": expert_map values must be in [0, num_experts=",
                  num_experts, ") or -1 (not on this rank), got expert_map[", id, "] = ", key);
  }
}

}  // namespace

void check_routing_shape(int64_t num_tokens, int64_t topk, int64_t num_experts,
                         int64_t expert_map_size, int64_t active_start, int64_t active_end) {
  MOE_CHECK_ARG(num_tokens >= 0, "moe_permute: num_tokens must be >= 0, got ", num_tokens);
  MOE_CHECK_ARG(topk >= 1, "moe_permute: topk_ids must have at least one column (K >= 1), got K = ",
                topk);
  MOE_CHECK_ARG(num_experts >= 1, "moe_permute: num_experts must be >= 1, got ", num_experts);
  MOE_CHECK_ARG(num_experts <= kInt32Max, "moe_permute: num_experts must fit in int32, got ",
                num_experts);
  // Positions in expanded_row_idx are int32.
  MOE_CHECK_ARG(num_tokens <= (kInt32Max + 1) / topk, "moe_permute: T * K = ", num_tokens, " * ", topk,
                " exceeds 2^31 rows (expanded_row_idx is int32)");
  MOE_CHECK_ARG(expert_map_size < 0 || expert_map_size == num_experts,
                "moe_permute: expert_map must have num_experts = ", num_experts, " entries, got ",
                expert_map_size);
  MOE_CHECK_ARG(active_start >= 0 && active_start <= active_end && active_end <= num_experts,
                "moe_permute: active_expert_range must satisfy 0 <= start <= end <= num_experts = ",
                num_experts, ", got (", active_start, ", ", active_end, ")");
}

namespace {

// The counting sort behind both layouts. alignment 1 gives the unpadded one.
template <typename IdT, typename MapT>
int64_t build_layout(const IdT* topk_ids, int64_t num_tokens, int64_t topk, int64_t num_experts,
                     const MapT* expert_map, int64_t active_start, int64_t active_end,
                     int64_t alignment, bool cumulative_counts, int32_t* expanded_row_idx,
                     int64_t* padded_counts, int64_t* counts, int64_t* block_starts) {
  check_routing_shape(num_tokens, topk, num_experts, expert_map ? num_experts : -1, active_start,
                      active_end);
  const int64_t range = active_end - active_start;
  padded_rows_bound(num_tokens, topk, range, alignment);
  const int64_t rows = num_tokens * topk;
  check_ids_in_range(topk_ids, rows, topk, num_experts, "moe_permute");
  if (expert_map != nullptr)
    check_looked_up_map_values(topk_ids, rows, num_experts, expert_map, "moe_permute");

  // Counting sort on the local key: histogram, exclusive scan, stable placement.
  // Compare before subtracting: key - active_start is only formed for a key
  // inside [active_start, active_end), so it can neither overflow nor index
  // outside [0, range) whatever the map holds.
  const auto local_key = [&](int64_t f) -> int64_t {  // -1 = dropped
    const int64_t id = static_cast<int64_t>(topk_ids[f]);
    if (id < 0) return -1;  // -1: no expert
    const int64_t key = expert_map ? static_cast<int64_t>(expert_map[id]) : id;
    return (key >= active_start && key < active_end) ? key - active_start : -1;
  };
  std::vector<int64_t> next_position(static_cast<size_t>(range), 0);
  for (int64_t f = 0; f < rows; ++f) {
    const int64_t local = local_key(f);
    if (local >= 0) ++next_position[static_cast<size_t>(local)];
  }
  // Block e starts at the padded running sum; its size is count rounded up
  // (every partial sum is <= the checked bound, so nothing overflows).
  int64_t padded = 0, valid = 0;
  for (int64_t e = 0; e < range; ++e) {
    const int64_t count = next_position[static_cast<size_t>(e)];
    const int64_t block = (count + alignment - 1) / alignment * alignment;
    if (block_starts != nullptr) block_starts[e] = padded;
    next_position[static_cast<size_t>(e)] = padded;
    padded += block;
    valid += count;
    counts[e] = cumulative_counts ? valid : count;
    if (padded_counts != nullptr) padded_counts[e] = cumulative_counts ? padded : block;
  }
  if (block_starts != nullptr) block_starts[range] = padded;
  for (int64_t f = 0; f < rows; ++f) {
    const int64_t local = local_key(f);
    expanded_row_idx[f] =
        local >= 0 ? static_cast<int32_t>(next_position[static_cast<size_t>(local)]++) : -1;
  }
  return padded;
}

}  // namespace

int64_t padded_rows_bound(int64_t num_tokens, int64_t topk, int64_t active_experts, int64_t alignment) {
  MOE_CHECK_ARG(alignment >= 1 && alignment <= kInt32Max,
                "moe_permute: alignment must be in [1, 2^31 - 1], got ", alignment);
  // num_tokens * topk <= 2^31 was checked (check_routing_shape); active_experts < 2^31.
  const int64_t rows = num_tokens * topk;
  const int64_t room = (kInt32Max + 1) - rows;  // >= 0
  MOE_CHECK_ARG(alignment == 1 || active_experts <= room / (alignment - 1),
                "moe_permute: the padded layout needs up to T * K + num_active_experts * (alignment - 1) = ",
                rows, " + ", active_experts, " * ", alignment - 1,
                " rows, more than 2^31 (expanded_row_idx is int32)");
  return rows + active_experts * (alignment - 1);
}

template <typename IdT, typename MapT>
int64_t build_routing_layout(const IdT* topk_ids, int64_t num_tokens, int64_t topk,
                             int64_t num_experts, const MapT* expert_map, int64_t active_start,
                             int64_t active_end, bool cumulative_counts, int32_t* expanded_row_idx,
                             int64_t* expert_tokens) {
  return build_layout(topk_ids, num_tokens, topk, num_experts, expert_map, active_start, active_end,
                      1, cumulative_counts, expanded_row_idx, nullptr, expert_tokens, nullptr);
}

template <typename IdT, typename MapT>
int64_t build_padded_routing_layout(const IdT* topk_ids, int64_t num_tokens, int64_t topk,
                                    int64_t num_experts, const MapT* expert_map,
                                    int64_t active_start, int64_t active_end, int64_t alignment,
                                    bool cumulative_counts, int32_t* expanded_row_idx,
                                    int64_t* padded_counts, int64_t* counts,
                                    int64_t* block_starts) {
  return build_layout(topk_ids, num_tokens, topk, num_experts, expert_map, active_start, active_end,
                      alignment, cumulative_counts, expanded_row_idx, padded_counts, counts,
                      block_starts);
}

template <typename IdT>
void expert_histogram(const IdT* ids, int64_t count, int64_t num_experts, int64_t* counts) {
  MOE_CHECK_ARG(num_experts >= 1, "expert_histogram: num_experts must be >= 1, got ", num_experts);
  for (int64_t e = 0; e < num_experts; ++e) counts[e] = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    if (id >= 0 && id < num_experts) ++counts[id];
  }
}

template <typename IndexT>
void check_row_indices(const IndexT* indices, int64_t count, int64_t num_rows, const char* op,
                       const char* name) {
  for (int64_t p = 0; p < count; ++p) {
    const int64_t row = static_cast<int64_t>(indices[p]);
    MOE_CHECK_ARG(row >= -1 && row < num_rows, op, ": ", name, " must be in [-1, ", num_rows,
                  ") (-1 = no row), got ", row, " at index ", p);
  }
}

template <typename IndexT>
void build_inverse_index(const IndexT* indices, int64_t count, int64_t num_rows, const char* op,
                         const char* name, int64_t* inverse) {
  check_row_indices(indices, count, num_rows, op, name);
  std::vector<int64_t> seen(static_cast<size_t>(num_rows), -1);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t row = static_cast<int64_t>(indices[p]);
    if (row < 0) continue;
    MOE_CHECK_ARG(seen[static_cast<size_t>(row)] < 0, op, ": ", name,
                  " must name each row at most once, but row ", row, " appears at index ",
                  seen[static_cast<size_t>(row)], " and at index ", p);
    seen[static_cast<size_t>(row)] = p;
  }
  for (int64_t r = 0; r < num_rows; ++r) inverse[r] = seen[static_cast<size_t>(r)];
}

#define MOE_INSTANTIATE_LAYOUT(IdT, MapT)                                                       \
  template int64_t build_routing_layout<IdT, MapT>(const IdT*, int64_t, int64_t, int64_t,      \
                                                   const MapT*, int64_t, int64_t, bool, int32_t*, \
                                                   int64_t*);    \
  template int64_t build_padded_routing_layout<IdT, MapT>(                                      \
      const IdT*, int64_t, int64_t, int64_t, const MapT*, int64_t, int64_t, int64_t, bool,     \
      int32_t*, int64_t*, int64_t*, int64_t*);
MOE_INSTANTIATE_LAYOUT(int32_t, int32_t)
MOE_INSTANTIATE_LAYOUT(int32_t, int64_t)
MOE_INSTANTIATE_LAYOUT(int64_t, int32_t)
MOE_INSTANTIATE_LAYOUT(int64_t, int64_t)
#undef MOE_INSTANTIATE_LAYOUT

template void expert_histogram<int32_t>(const int32_t*, int64_t, int64_t, int64_t*);
template void expert_histogram<int64_t>(const int64_t*, int64_t, int64_t, int64_t*);
template void check_row_indices<int32_t>(const int32_t*, int64_t, int64_t, const char*, const char*);
template void check_row_indices<int64_t>(const int64_t*, int64_t, int64_t, const char*, const char*);
template void build_inverse_index<int32_t>(const int32_t*, int64_t, int64_t, const char*, const char*,
                                           int64_t*);
template void build_inverse_index<int64_t>(const int64_t*, int64_t, int64_t, const char*, const char*,
                                           int64_t*);

}  // namespace moe_ext::core
