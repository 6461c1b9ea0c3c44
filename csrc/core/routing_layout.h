// Index maths of the token routing ops (moe_permute, moe_unpermute,
// expert_histogram, the row scatter behind ungroup_by_local_expert).
//
// The routing layout follows the dropless contract of torch_npu's
// npu_moe_init_routing_v2:
//   - topk_ids [T, K] is flattened token-major: row f = t * K + k;
//   - an id of -1 means "no expert" (engines pad topk_ids with it): the row is
//     dropped; any other id outside [0, num_experts) is refused;
//   - each row's key is its expert id, or expert_map[id] when a map is given;
//     a map value must be -1 or in [0, num_experts) (the key space the active
//     range is drawn from); any other value that a row looks up is refused,
//     never used in arithmetic;
//   - rows whose key lies outside the active range [start, end) (a map's -1
//     included) are dropped; the others are stably sorted by key, so valid
//     rows come first, in key order, ties in flattened order;
//   - expanded_row_idx[f] = position of row f in that order, or -1 if dropped
//     (the "gather form");
//   - expert_tokens[e - start] = rows with key e (int64), or the inclusive
//     cumulative sum of those counts.
// Every function validates its whole input before writing anything; a bad
// argument throws std::invalid_argument with a message naming it. Index
// arithmetic on user values is overflow-safe: values are widened to int64 and
// compared against their bounds before any subtraction or offset is formed.
#pragma once

#include <cstdint>

namespace moe_ext::core {

// Shape and range checks of moe_permute that need no id values (shared with
// the CUDA path, which cannot read ids on the host without a sync).
// expert_map_size is -1 when no map is given.
void check_routing_shape(int64_t num_tokens, int64_t topk, int64_t num_experts,
                         int64_t expert_map_size, int64_t active_start, int64_t active_end);

// Builds the routing layout; returns the number of valid rows.
// expert_map may be nullptr (then keys are the ids). MapT is int32_t or int64_t.
template <typename IdT, typename MapT>
int64_t build_routing_layout(const IdT* topk_ids, int64_t num_tokens, int64_t topk,
                             int64_t num_experts, const MapT* expert_map, int64_t active_start,
                             int64_t active_end, bool cumulative_counts, int32_t* expanded_row_idx,
                             int64_t* expert_tokens);

// counts[e] = number of entries of ids equal to e, for e in [0, num_experts).
// Ids outside [0, num_experts) (e.g. -1 padding) are not counted.
// The padded layout of moe_permute_padded (grouped GEMMs): the same order, but
// each active expert's block starts at a multiple of `alignment` (>= 1): block
// sizes are the counts rounded up to a multiple of alignment (an expert with no
// rows keeps an empty block, as TransformerEngine's padded permute does; not
// torchtitan's clamp to at least one aligned block). expanded_row_idx holds the
// padded positions; padded_counts / counts get the padded / unpadded block sizes
// (or their inclusive cumsums). block_starts (optional, [range + 1] entries)
// receives each block's first padded row and the padded total. Returns the
// padded total, which is at most num_tokens * topk + range * (alignment - 1).
template <typename IdT, typename MapT>
int64_t build_padded_routing_layout(const IdT* topk_ids, int64_t num_tokens, int64_t topk,
                                    int64_t num_experts, const MapT* expert_map,
                                    int64_t active_start, int64_t active_end, int64_t alignment,
                                    bool cumulative_counts, int32_t* expanded_row_idx,
                                    int64_t* padded_counts, int64_t* counts,
                                    int64_t* block_starts);

// Rows of the padded layout's upper bound: num_tokens * topk + active_experts *
// (alignment - 1). Refuses (std::invalid_argument) a bound that does not fit
// int32 positions, or alignment < 1.
int64_t padded_rows_bound(int64_t num_tokens, int64_t topk, int64_t active_experts, int64_t alignment);

template <typename IdT>
void expert_histogram(const IdT* ids, int64_t count, int64_t num_experts, int64_t* counts);

// Refuses an index outside [-1, num_rows) (-1 is "no row"); `op` and `name`
// go into the message.
template <typename IndexT>
void check_row_indices(const IndexT* indices, int64_t count, int64_t num_rows, const char* op,
                       const char* name);

// inverse[r] = the position p with indices[p] == r, or -1 if none.
// Refuses an index outside [-1, num_rows) and a row named twice (a scatter
// through such indices would have two writers).
template <typename IndexT>
void build_inverse_index(const IndexT* indices, int64_t count, int64_t num_rows, const char* op,
                         const char* name, int64_t* inverse);

}  // namespace moe_ext::core
