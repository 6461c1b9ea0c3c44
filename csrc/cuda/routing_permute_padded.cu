// moe_permute_padded on CUDA: the permute for grouped GEMMs (each active
// expert's block padded to a multiple of `alignment`) and for fp8 dispatch
// (row scales moved with their rows).
//
// Steps, all on the stream, no host synchronisation:
//   1. the index build of moe_permute (csrc/cuda/routing_permute.cu), counts
//      in count form, unpadded positions;
//   2. one block scans the counts into unpadded and padded block starts and
//      writes both count outputs (count or inclusive-cumsum form);
//   3. every position moves to its padded block: p -> p - start[e] +
//      padded_start[e], e found by binary search of p in the unpadded starts
//      (only values the index build wrote are read: -1 or a valid position);
//   4. the row copy of moe_permute, straight to the padded positions (one
//      pass over the rows: no copy of the unpadded layout), for the hidden
//      rows and, with scales, for the scale rows;
//   5. the pad rows of each block are zeroed (hidden and scales); rows past
//      the padded total are not written.
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "cuda/launchers.h"
#include "cuda/routing_common.cuh"

namespace moe_ext::cuda {
namespace {

using namespace routing;

constexpr int kPadScanThreads = 1024;

// Step 2. counts: [range] counts in (rewritten to inclusive cumsum when
// cumulative); starts / padded_starts: [range + 1] exclusive starts.
__global__ void __launch_bounds__(kPadScanThreads)
pad_layout_kernel(int64_t* __restrict__ counts, int64_t range, int64_t alignment, bool cumulative,
                  int64_t* __restrict__ padded_counts, int64_t* __restrict__ starts,
                  int64_t* __restrict__ padded_starts) {
  using BlockScan = cub::BlockScan<long long, kPadScanThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  const int64_t per_thread = ceil_div(range, kPadScanThreads);
  const int64_t first = std::min<int64_t>(range, threadIdx.x * per_thread);
  const int64_t last = std::min<int64_t>(range, first + per_thread);
  long long count_sum = 0, padded_sum = 0;
  for (int64_t e = first; e < last; ++e) {
    const long long count = counts[e];
    count_sum += count;
    padded_sum += (count + alignment - 1) / alignment * alignment;
  }
  long long count_prefix = 0, padded_prefix = 0, count_total = 0, padded_total = 0;
  BlockScan(temp).ExclusiveSum(count_sum, count_prefix, count_total);
  __syncthreads();  // temp storage reused
  BlockScan(temp).ExclusiveSum(padded_sum, padded_prefix, padded_total);
  for (int64_t e = first; e < last; ++e) {
    const long long count = counts[e];
    const long long block = (count + alignment - 1) / alignment * alignment;
    starts[e] = count_prefix;
    padded_starts[e] = padded_prefix;
    count_prefix += count;
    padded_prefix += block;
    counts[e] = cumulative ? count_prefix : count;
    padded_counts[e] = cumulative ? padded_prefix : block;
  }
  if (threadIdx.x == 0) {
    starts[range] = count_total;
    padded_starts[range] = padded_total;
  }
}

// Step 3: expanded_row_idx from unpadded to padded positions.
__global__ void __launch_bounds__(kBlockThreads)
remap_positions_kernel(int32_t* __restrict__ expanded_row_idx, int64_t rows,
                       const int64_t* __restrict__ starts, const int64_t* __restrict__ padded_starts,
                       int64_t range) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < rows; f += step) {
    const int64_t position = expanded_row_idx[f];
    if (position < 0) continue;
    // Last e with starts[e] <= position: its block holds the position (an
    // empty block has starts[e] == starts[e + 1], so it is never the last).
    int64_t low = 0, high = range;  // answer in [low, high)
    while (high - low > 1) {
      const int64_t middle = (low + high) / 2;
      if (__ldg(starts + middle) <= position) low = middle; else high = middle;
    }
    expanded_row_idx[f] = static_cast<int32_t>(position - __ldg(starts + low) + __ldg(padded_starts + low));
  }
}

// Step 5: one block per expert zeroes rows [padded_starts[e] + count, padded_starts[e + 1]).
template <int kBytes>
__global__ void __launch_bounds__(kBlockThreads)
zero_pad_rows_kernel(uint8_t* __restrict__ data, int64_t units_per_row,
                     const int64_t* __restrict__ starts, const int64_t* __restrict__ padded_starts) {
  using V = typename Unit<kBytes>::type;
  const int64_t e = blockIdx.x;
  const int64_t count = starts[e + 1] - starts[e];
  const int64_t first_row = padded_starts[e] + count;
  const int64_t units = (padded_starts[e + 1] - first_row) * units_per_row;
  V* __restrict__ out = reinterpret_cast<V*>(data) + first_row * units_per_row;
  const V zero{};
  for (int64_t i = threadIdx.x; i < units; i += blockDim.x) out[i] = zero;
}

cudaError_t launch_zero_pad_rows(void* data, int64_t row_bytes, const int64_t* starts,
                                 const int64_t* padded_starts, int64_t range, cudaStream_t stream) {
  if (row_bytes == 0 || range == 0) return cudaSuccess;
  const int unit = copy_unit_bytes(row_bytes, {data});
  return dispatch_unit(unit, [&](auto unit_tag) {
    constexpr int kBytes = decltype(unit_tag)::value;
    zero_pad_rows_kernel<kBytes><<<static_cast<unsigned>(range), kBlockThreads, 0, stream>>>(
        static_cast<uint8_t*>(data), row_bytes / kBytes, starts, padded_starts);
    return cudaGetLastError();
  });
}

size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

}  // namespace

size_t permute_padded_workspace_bytes(int64_t num_rows, int64_t active_experts) {
  const size_t starts = align16(static_cast<size_t>(active_experts + 1) * sizeof(int64_t));
  return align16(permute_workspace_bytes(num_rows, active_experts)) + 2 * starts;
}

cudaError_t launch_moe_permute_padded(const void* hidden, int64_t row_bytes, const void* scales,
                                      int64_t scale_row_bytes, const void* topk_ids,
                                      bool ids_are_int64, int64_t num_tokens, int64_t topk,
                                      int64_t num_experts, const void* expert_map, bool map_is_int64,
                                      int64_t active_start, int64_t active_end, int64_t alignment,
                                      bool counts_cumsum, void* permuted, void* permuted_scales,
                                      int32_t* expanded_row_idx, int64_t* expert_tokens,
                                      int64_t* expert_tokens_unpadded, void* workspace,
                                      cudaStream_t stream) {
  const int64_t rows = num_tokens * topk;
  const int64_t range = active_end - active_start;
  if (range < 0 || alignment < 1) return cudaErrorInvalidValue;
  // Workspace: [index table][starts, range + 1][padded starts, range + 1].
  auto* base = static_cast<uint8_t*>(workspace);
  const size_t table_bytes = align16(permute_workspace_bytes(rows, range));
  auto* starts = reinterpret_cast<int64_t*>(base + table_bytes);
  auto* padded_starts =
      reinterpret_cast<int64_t*>(base + table_bytes + align16(static_cast<size_t>(range + 1) * sizeof(int64_t)));

  cudaError_t status = launch_permute_index(topk_ids, ids_are_int64, num_tokens, topk, num_experts,
                                            expert_map, map_is_int64, active_start, active_end,
                                            /*counts_cumsum=*/false, expanded_row_idx,
                                            expert_tokens_unpadded, base, stream);
  if (status != cudaSuccess || range == 0) return status;
  pad_layout_kernel<<<1, kPadScanThreads, 0, stream>>>(expert_tokens_unpadded, range, alignment,
                                                        counts_cumsum, expert_tokens, starts,
                                                        padded_starts);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;
  if (rows > 0 && alignment > 1) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, kBlockThreads), 1024));
    remap_positions_kernel<<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
        expanded_row_idx, rows, starts, padded_starts, range);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  status = launch_permute_copy_rows(hidden, row_bytes, num_tokens, topk, expanded_row_idx, permuted, stream);
  if (status != cudaSuccess) return status;
  if (scales != nullptr) {
    status = launch_permute_copy_rows(scales, scale_row_bytes, num_tokens, topk, expanded_row_idx,
                                      permuted_scales, stream);
    if (status != cudaSuccess) return status;
  }
  if (alignment == 1) return cudaSuccess;  // no pad rows
  status = launch_zero_pad_rows(permuted, row_bytes, starts, padded_starts, range, stream);
  if (status != cudaSuccess || scales == nullptr) return status;
  return launch_zero_pad_rows(permuted_scales, scale_row_bytes, starts, padded_starts, range, stream);
}

}  // namespace moe_ext::cuda
