// The local expert key of a routed row: the one place where moe_permute's
// CUDA kernels (csrc/cuda/routing_permute*.cu) read topk_ids and expert_map.
#pragma once

#include <cstdint>

#include "cuda/device_check.cuh"

namespace moe_ext::cuda::routing {

// The local key of flattened row f, or -1 when the row is dropped.
// An id of -1 is "no expert" (padding): dropped, like a map's -1. Any other id
// outside [0, num_experts), and a map value outside [-1, num_experts), fire a
// device-side assert and drop the row (never used as an index). The key is
// compared with [start, start + range) before the subtraction, so no map value
// can overflow the offset (the same rule as core::build_routing_layout).
template <typename IdT, typename MapT>
__device__ __forceinline__ int32_t local_key(const IdT* __restrict__ ids, const MapT* __restrict__ map,
                                             int64_t f, int64_t num_experts, int64_t start,
                                             int32_t range) {
  const int64_t id = static_cast<int64_t>(ids[f]);
  if (id == -1) return -1;
  const bool in_range = id >= 0 && id < num_experts;
  MOE_DEVICE_CHECK(in_range, "moe_permute: topk_ids out of range [0, num_experts) (and not -1)");
  if (!in_range) return -1;
  const int64_t key = map != nullptr ? static_cast<int64_t>(map[id]) : id;
  const bool key_valid = key >= -1 && key < num_experts;
  MOE_DEVICE_CHECK(key_valid, "moe_permute: expert_map value out of range [0, num_experts) (and not -1)");
  if (!key_valid) return -1;
  return (key >= start && key < start + range) ? static_cast<int32_t>(key - start) : -1;
}

}  // namespace moe_ext::cuda::routing
