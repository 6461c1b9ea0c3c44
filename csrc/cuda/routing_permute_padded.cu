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
//      (only values the index build wrote are read: -1 or a valid position),
//      up to kFusedPlaceRows rows this runs in step 2's block, together with
//      the copy of each row's scale row (decode: one launch);
//   4. the row copy of moe_permute, straight to the padded positions (one
//      pass over the rows: no copy of the unpadded layout); larger inputs
//      copy the scale rows the same way;
//   5. one launch zeroes the pad rows of each block (hidden and scales); rows
//      past the padded total are not written.
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "cuda/launchers.h"
#include "cuda/routing_common.cuh"

namespace moe_ext::cuda {
namespace {

using namespace routing;

constexpr int kPadScanThreads = 1024;
// Up to this many routed rows, the single block that scans the block starts
// also moves the positions and the scale rows (one launch fewer; decode sizes).
constexpr int64_t kFusedPlaceRows = 8192;

// The scale rows that follow their token rows (cols fp32 values a row; null
// source: no scales). vec4: cols % 4 == 0 and both pointers 16-byte aligned.
struct ScaleRows {
  const float* source = nullptr;
  float* out = nullptr;
  int64_t cols = 0;
  bool vec4 = false;
};

// Routed row f: its position moves to its padded block (when remap), and the
// scale row of its token goes there. Plain loads only: in the fused kernel the
// starts were written by this very block (no __ldg on them).
__device__ __forceinline__ void place_row(int64_t f, int32_t* __restrict__ expanded_row_idx,
                                          const int64_t* starts, const int64_t* padded_starts,
                                          int64_t range, bool remap, int64_t topk, const ScaleRows& scales) {
  int64_t position = expanded_row_idx[f];  // written by the index build: -1 or a valid row
  if (position < 0) return;
  if (remap) {
    // Last e with starts[e] <= position: its block holds the position (an
    // empty block has starts[e] == starts[e + 1], so it is never the last).
    int64_t low = 0, high = range;  // answer in [low, high)
    while (high - low > 1) {
      const int64_t middle = (low + high) / 2;
      if (starts[middle] <= position) low = middle; else high = middle;
    }
    position = position - starts[low] + padded_starts[low];
    expanded_row_idx[f] = static_cast<int32_t>(position);
  }
  if (scales.source == nullptr) return;
  const int64_t token = f / topk;
  if (scales.vec4) {
    const auto* in = reinterpret_cast<const float4*>(scales.source + token * scales.cols);
    auto* out = reinterpret_cast<float4*>(scales.out + position * scales.cols);
    for (int64_t c = 0; c < scales.cols / 4; ++c) out[c] = in[c];
  } else {
    for (int64_t c = 0; c < scales.cols; ++c)
      scales.out[position * scales.cols + c] = scales.source[token * scales.cols + c];
  }
}

// Step 2 (one block). counts: [range] counts in (rewritten to inclusive cumsum
// when cumulative); starts / padded_starts: [range + 1] exclusive starts. With
// fused_rows > 0 (<= kFusedPlaceRows) the block then places those rows (step 3).
__global__ void __launch_bounds__(kPadScanThreads)
pad_layout_kernel(int64_t* __restrict__ counts, int64_t range, int64_t alignment, bool cumulative,
                  int64_t* __restrict__ padded_counts, int64_t* starts, int64_t* padded_starts,
                  int32_t* __restrict__ expanded_row_idx, int64_t fused_rows, int64_t topk, ScaleRows scales) {
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
  if (fused_rows == 0) return;
  __syncthreads();  // the block's global writes of the starts are visible to the whole block
  for (int64_t f = threadIdx.x; f < fused_rows; f += blockDim.x)
    place_row(f, expanded_row_idx, starts, padded_starts, range, alignment > 1, topk, scales);
}

// Step 3 for larger inputs: every routed row, many blocks.
__global__ void __launch_bounds__(kBlockThreads)
place_rows_kernel(int32_t* __restrict__ expanded_row_idx, int64_t rows, const int64_t* __restrict__ starts,
                  const int64_t* __restrict__ padded_starts, int64_t range, bool remap, int64_t topk,
                  ScaleRows scales) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < rows; f += step)
    place_row(f, expanded_row_idx, starts, padded_starts, range, remap, topk, scales);
}

// Step 5: zeroes the pad rows [padded_starts[e] + count, padded_starts[e + 1])
// of permuted and, with scales, of permuted_scales. Grid (expert, chunk): a
// block zeroes up to kPadRowsPerBlock of one expert's pad rows, so the < A pad
// rows of each expert are spread over many blocks (one block per expert left
// ~27 MB of zeros to 32 blocks at T=256 EP 8 A=128).
constexpr int64_t kPadRowsPerBlock = 4;

template <int kBytes>
__global__ void __launch_bounds__(kBlockThreads)
zero_pad_rows_kernel(uint8_t* __restrict__ data, int64_t units_per_row, float* __restrict__ scale_rows,
                     int64_t scale_cols, const int64_t* __restrict__ starts,
                     const int64_t* __restrict__ padded_starts) {
  using V = typename Unit<kBytes>::type;
  const int64_t e = blockIdx.x;
  const int64_t count = starts[e + 1] - starts[e];
  const int64_t pad_end = padded_starts[e + 1];
  const V zero{};
  // Chunks of kPadRowsPerBlock rows, strided by the grid's y extent (capped, so huge alignments loop).
  for (int64_t first_row = padded_starts[e] + count + static_cast<int64_t>(blockIdx.y) * kPadRowsPerBlock;
       first_row < pad_end; first_row += static_cast<int64_t>(gridDim.y) * kPadRowsPerBlock) {
    const int64_t end_row = std::min<int64_t>(pad_end, first_row + kPadRowsPerBlock);
    const int64_t units = (end_row - first_row) * units_per_row;
    V* __restrict__ out = reinterpret_cast<V*>(data) + first_row * units_per_row;
    for (int64_t i = threadIdx.x; i < units; i += blockDim.x) out[i] = zero;
    if (scale_rows == nullptr) continue;
    float* __restrict__ scale_out = scale_rows + first_row * scale_cols;
    for (int64_t i = threadIdx.x; i < (end_row - first_row) * scale_cols; i += blockDim.x) scale_out[i] = 0.0f;
  }
}

// A pad holds at most alignment - 1 rows per expert.
cudaError_t launch_zero_pad_rows(void* data, int64_t row_bytes, float* scale_rows, int64_t scale_cols,
                                 const int64_t* starts, const int64_t* padded_starts, int64_t range,
                                 int64_t alignment, cudaStream_t stream) {
  if (range == 0 || alignment <= 1) return cudaSuccess;
  const int unit = row_bytes > 0 ? copy_unit_bytes(row_bytes, {data}) : 1;
  const dim3 grid(static_cast<unsigned>(range),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(alignment - 1, kPadRowsPerBlock), 65535)));
  return dispatch_unit(unit, [&](auto unit_tag) {
    constexpr int kBytes = decltype(unit_tag)::value;
    zero_pad_rows_kernel<kBytes><<<grid, kBlockThreads, 0, stream>>>(
        static_cast<uint8_t*>(data), row_bytes / kBytes, scale_rows, scale_cols, starts, padded_starts);
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

  {
    OnepassPermute request;
    request.hidden = hidden;
    request.row_bytes = row_bytes;
    request.permuted = permuted;
    request.scales = scales;
    request.scale_row_bytes = scale_row_bytes;
    request.permuted_scales = permuted_scales;
    request.topk_ids = topk_ids;
    request.ids_are_int64 = ids_are_int64;
    request.num_tokens = num_tokens;
    request.topk = topk;
    request.num_experts = num_experts;
    request.expert_map = expert_map;
    request.map_is_int64 = map_is_int64;
    request.active_start = active_start;
    request.active_end = active_end;
    request.alignment = alignment;
    request.counts_cumsum = counts_cumsum;
    request.expanded_row_idx = expanded_row_idx;
    request.expert_tokens = expert_tokens;
    request.expert_tokens_unpadded = expert_tokens_unpadded;
    request.workspace = workspace;
    bool launched = false;
    const cudaError_t status = launch_permute_onepass(request, stream, &launched);
    if (launched || status != cudaSuccess) return status;
  }
  cudaError_t status = launch_permute_index(topk_ids, ids_are_int64, num_tokens, topk, num_experts,
                                            expert_map, map_is_int64, active_start, active_end,
                                            /*counts_cumsum=*/false, expanded_row_idx,
                                            expert_tokens_unpadded, base, stream);
  if (status != cudaSuccess || range == 0) return status;
  ScaleRows scale_rows;
  if (scales != nullptr) {
    scale_rows.source = static_cast<const float*>(scales);
    scale_rows.out = static_cast<float*>(permuted_scales);
    scale_rows.cols = scale_row_bytes / static_cast<int64_t>(sizeof(float));
    scale_rows.vec4 = scale_rows.cols % 4 == 0 && reinterpret_cast<uintptr_t>(scales) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(permuted_scales) % 16 == 0;
  }
  // Step 3: positions move (alignment > 1); up to kFusedPlaceRows rows this
  // runs in the scan block and the scale rows follow there too (one thread per
  // row: cheap at decode). Larger inputs move the scale rows with the
  // vectorised row copy of step 4 instead (measured on an H200: a thread per
  // 224-byte scale row cost ~15 us more at T=8192 K=8 than the copy kernel).
  const bool fused = rows > 0 && rows <= kFusedPlaceRows && (alignment > 1 || scales != nullptr);
  const bool remap_apart = rows > kFusedPlaceRows && alignment > 1;
  pad_layout_kernel<<<1, kPadScanThreads, 0, stream>>>(expert_tokens_unpadded, range, alignment,
                                                        counts_cumsum, expert_tokens, starts, padded_starts,
                                                        expanded_row_idx, fused ? rows : 0, topk, scale_rows);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;
  if (remap_apart) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, kBlockThreads), 1024));
    place_rows_kernel<<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
        expanded_row_idx, rows, starts, padded_starts, range, true, topk, ScaleRows{});
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  // Step 4: the hidden rows (and, past the fused size, the scale rows) straight to their positions.
  status = launch_permute_copy_rows(hidden, row_bytes, num_tokens, topk, expanded_row_idx, permuted, stream);
  if (status != cudaSuccess) return status;
  if (scales != nullptr && !fused) {
    status = launch_permute_copy_rows(scales, scale_row_bytes, num_tokens, topk, expanded_row_idx,
                                      permuted_scales, stream);
    if (status != cudaSuccess) return status;
  }
  return launch_zero_pad_rows(permuted, row_bytes, scale_rows.out, scale_rows.cols, starts, padded_starts,
                              range, alignment, stream);
}

}  // namespace moe_ext::cuda
