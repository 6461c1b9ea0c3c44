// moe_permute and expert_histogram on CUDA.
//
// Index build: a counting sort on the local expert key (<= a few thousand
// keys: a radix sort over 32 bits would be wasted work), stable because every
// warp walks its own contiguous segment of rows in order, 32 rows a step,
// ranking equal keys inside a step with __match_any_sync:
//   - decode sizes (<= 1024 routed rows, with a row to copy): index AND copy in
//     one launch - every block builds the whole index in shared memory, block 0
//     writes it, each block copies its share of the valid rows;
//   - 1025-2048 rows: the one-launch permute (routing_permute_onepass.cu;
//     routing_geometry.h onepass_preferred has the measurements);
//   - <= kSingleBlockRows rows: one block counts per warp, scans, places;
//   - larger inputs: count per block -> scan (one block: a coalesced scan of
//     each expert's row of the [experts][blocks] table for large tables) ->
//     recount and place per block: three short launches.
// Row copy: one block per source token reads its K destinations in one step,
// then its row once (16-byte vectors where alignment allows) and writes it to
// each destination; only valid rows are written. Inputs too small to fill the
// GPU that way copy per routed row instead.
//
// An id outside [0, num_experts) fires a device-side assert and its row is
// treated as dropped: no id is ever used as an address unchecked.
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "cuda/device_check.cuh"
#include "cuda/launchers.h"
#include "cuda/routing_common.cuh"
#include "cuda/routing_geometry.h"
#include "cuda/routing_permute_keys.cuh"

namespace moe_ext::cuda {
namespace {

using namespace routing;

// Per-warp key counters in dynamic shared memory; with the single-block
// kernel's ~8.3 KiB of static scan storage this stays under the 48 KiB a
// launch gets without an opt-in.
constexpr int kCounterBudgetBytes = 32 * 1024;
constexpr int64_t kMaxActiveExperts = kCounterBudgetBytes / 4;
constexpr int kIndexThreads = 256;          // multi-block index kernels (8 warps)
constexpr int kSingleBlockThreads = 1024;   // single-block index kernel (32 warps)
constexpr int kScanThreads = 1024;
constexpr int64_t kSingleBlockRows = 4096;
// Multi-block index: 256 rows a block (one 32-row step per warp) so the count
// and place kernels are short and spread over the SMs; the block count is
// capped so the one-block scan over [experts][blocks] stays small.
constexpr int64_t kRowsPerIndexBlock = 256;
constexpr int64_t kMaxIndexBlocks = 1024;
constexpr int64_t kMaxScanEntries = 32768;
// Below this many scatter-form blocks the copy cannot fill an H100 (132 SMs):
// copy per routed row instead (K times the parallelism; the K reads of a
// token row are neighbours and hit L2).
constexpr int64_t kMinScatterBlocks = 512;
constexpr int64_t kHistogramSharedExperts = 12288;  // 48 KiB of int32 counters

// Warps that keep their own counters: as many as the budget allows.
int counting_warps(int64_t active_experts, int max_warps) {
  if (active_experts <= 0) return max_warps;
  const int64_t fit = kCounterBudgetBytes / (active_experts * 4);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_warps, fit)));
}

__host__ __device__ inline int64_t rows_per_warp(int64_t rows_per_block, int warps) {
  return ceil_div(ceil_div(rows_per_block, warps), 32) * 32;
}

struct IndexGrid {
  int64_t blocks = 0;
  int64_t rows_per_block = 0;
};

IndexGrid index_grid(int64_t rows, int64_t active_experts) {
  IndexGrid grid;
  const int64_t max_blocks =
      std::max<int64_t>(1, std::min(kMaxIndexBlocks, kMaxScanEntries / std::max<int64_t>(active_experts, 1)));
  grid.blocks = std::max<int64_t>(1, std::min(ceil_div(rows, kRowsPerIndexBlock), max_blocks));
  grid.rows_per_block = ceil_div(ceil_div(rows, grid.blocks), 32) * 32;
  grid.blocks = ceil_div(rows, grid.rows_per_block);
  return grid;
}

// One warp walks rows [begin, end) in order, 32 per step. Counting: adds each
// key's rows to counters[key]. Placing: row f gets counters[key] plus the
// number of equal keys before it in the step, then counters advance; so equal
// keys keep their flattened order (stability). All lanes run the same trip count.
template <bool kPlace, typename IdT, typename MapT>
__device__ void warp_pass(const IdT* __restrict__ ids, const MapT* __restrict__ map, int64_t begin,
                          int64_t end, int64_t num_experts, int64_t start, int32_t range,
                          int32_t* counters, int32_t* __restrict__ expanded_row_idx) {
  const int lane = threadIdx.x & 31;
  const unsigned lanes_before = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t f = base + lane;
    const int32_t key = f < end ? local_key(ids, map, f, num_experts, start, range) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    const bool leader = lane == __ffs(peers) - 1;
    if constexpr (kPlace) {
      const int32_t position = key >= 0 ? counters[key] + __popc(peers & lanes_before) : -1;
      __syncwarp();
      if (key >= 0 && leader) counters[key] += __popc(peers);
      if (f < end) expanded_row_idx[f] = position;
    } else {
      if (key >= 0 && leader) counters[key] += __popc(peers);
    }
    __syncwarp();
  }
}

// Zeroes the per-warp counters, then counts this block's rows into them.
template <typename IdT, typename MapT>
__device__ void count_block_rows(const IdT* ids, const MapT* map, int64_t block_begin,
                                 int64_t block_end, int64_t warp_rows, int warps,
                                 int64_t num_experts, int64_t start, int32_t range,
                                 int32_t* counters) {
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(warps) * range; i += blockDim.x) counters[i] = 0;
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x / 32);
  if (warp < warps) {
    const int64_t begin = std::min(block_end, block_begin + warp * warp_rows);
    const int64_t end = std::min(block_end, begin + warp_rows);
    warp_pass<false>(ids, map, begin, end, num_experts, start, range, counters + warp * range, nullptr);
  }
  __syncthreads();
}

template <typename IdT, typename MapT>
__device__ void place_block_rows(const IdT* ids, const MapT* map, int64_t block_begin,
                                 int64_t block_end, int64_t warp_rows, int warps,
                                 int64_t num_experts, int64_t start, int32_t range,
                                 int32_t* counters, int32_t* expanded_row_idx) {
  const int warp = static_cast<int>(threadIdx.x / 32);
  if (warp < warps) {
    const int64_t begin = std::min(block_end, block_begin + warp * warp_rows);
    const int64_t end = std::min(block_end, begin + warp_rows);
    warp_pass<true>(ids, map, begin, end, num_experts, start, range, counters + warp * range,
                    expanded_row_idx);
  }
}

// Writes expert e's count (or inclusive cumsum) from its exclusive prefix.
__device__ __forceinline__ void write_expert_tokens(int64_t* expert_tokens, int64_t e, long long prefix,
                                                    long long count, bool cumulative) {
  expert_tokens[e] = cumulative ? prefix + count : count;
}

// One block indexes rows [0, rows): counts them per warp into counters
// ([warps][range]), scans the expert totals and turns each expert's per-warp
// counters into the warps' first positions (expert-major, then warp order);
// block 0 writes expert_tokens. Returns the number of placed rows. Ends with a
// barrier, so the block can place its rows from counters next. Shared by the
// one-block index kernel and the fused decode permute.
template <typename IdT, typename MapT>
__device__ long long block_first_positions(const IdT* ids, const MapT* map, int64_t rows, int64_t warp_rows,
                                           int warps, int64_t num_experts, int64_t start, int32_t range,
                                           bool cumulative, int64_t* expert_tokens, int32_t* counters) {
  using BlockScan = cub::BlockScan<long long, kSingleBlockThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  count_block_rows(ids, map, 0, rows, warp_rows, warps, num_experts, start, range, counters);
  const int64_t per_thread = ceil_div(range, kSingleBlockThreads);
  const int64_t first = std::min<int64_t>(range, threadIdx.x * per_thread);
  const int64_t last = std::min<int64_t>(range, first + per_thread);
  long long local_sum = 0;
  for (int64_t e = first; e < last; ++e)
    for (int w = 0; w < warps; ++w) local_sum += counters[w * range + e];
  long long prefix = 0, valid = 0;
  BlockScan(temp).ExclusiveSum(local_sum, prefix, valid);
  for (int64_t e = first; e < last; ++e) {
    long long run = prefix;
    for (int w = 0; w < warps; ++w) {
      const int32_t count = counters[w * range + e];
      counters[w * range + e] = static_cast<int32_t>(run);
      run += count;
    }
    if (blockIdx.x == 0) write_expert_tokens(expert_tokens, e, prefix, run - prefix, cumulative);
    prefix = run;
  }
  __syncthreads();
  return valid;
}

// Decode sizes: count, scan and place in one block.
template <typename IdT, typename MapT>
__global__ void __launch_bounds__(kSingleBlockThreads)
single_block_index_kernel(const IdT* __restrict__ ids, const MapT* __restrict__ map, int64_t rows,
                          int warps, int64_t num_experts, int64_t start, int32_t range,
                          bool cumulative, int64_t* __restrict__ expert_tokens,
                          int32_t* __restrict__ expanded_row_idx) {
  extern __shared__ int32_t counters[];  // [warps][range]
  const int64_t warp_rows = rows_per_warp(rows, warps);
  block_first_positions(ids, map, rows, warp_rows, warps, num_experts, start, range, cumulative, expert_tokens,
                        counters);
  place_block_rows(ids, map, 0, rows, warp_rows, warps, num_experts, start, range, counters,
                   expanded_row_idx);
}

// Large inputs, step 1: per-block key counts, block_counts[e * blocks + b].
template <typename IdT, typename MapT>
__global__ void __launch_bounds__(kIndexThreads)
count_kernel(const IdT* __restrict__ ids, const MapT* __restrict__ map, int64_t rows,
             int64_t rows_per_block, int warps, int64_t num_experts, int64_t start, int32_t range,
             int32_t* __restrict__ block_counts) {
  extern __shared__ int32_t counters[];
  const int64_t block_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t block_end = std::min(rows, block_begin + rows_per_block);
  count_block_rows(ids, map, block_begin, block_end, rows_per_warp(rows_per_block, warps), warps,
                   num_experts, start, range, counters);
  for (int64_t e = threadIdx.x; e < range; e += blockDim.x) {
    int32_t sum = 0;
    for (int w = 0; w < warps; ++w) sum += counters[w * range + e];
    block_counts[e * gridDim.x + blockIdx.x] = sum;
  }
}

// Step 2 (one block): exclusive scan of block_counts in place, in
// expert-major order; writes expert_tokens.
__global__ void __launch_bounds__(kScanThreads)
scan_kernel(int32_t* __restrict__ block_counts, int64_t blocks, int32_t range, bool cumulative,
            int64_t* __restrict__ expert_tokens) {
  using BlockScan = cub::BlockScan<long long, kScanThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  const int64_t entries = static_cast<int64_t>(range) * blocks;
  const int64_t per_thread = ceil_div(entries, kScanThreads);
  const int64_t first = std::min<int64_t>(entries, threadIdx.x * per_thread);
  const int64_t last = std::min<int64_t>(entries, first + per_thread);
  long long local_sum = 0;
  for (int64_t i = first; i < last; ++i) local_sum += block_counts[i];
  long long prefix = 0, total = 0;
  BlockScan(temp).ExclusiveSum(local_sum, prefix, total);
  for (int64_t i = first; i < last; ++i) {
    const int32_t count = block_counts[i];
    block_counts[i] = static_cast<int32_t>(prefix);
    prefix += count;
  }
  __syncthreads();  // the block's global writes are visible to the whole block after this
  for (int64_t e = threadIdx.x; e < range; e += blockDim.x) {
    const long long begin = block_counts[e * blocks];
    const long long end = e + 1 < range ? block_counts[(e + 1) * blocks] : total;
    write_expert_tokens(expert_tokens, e, begin, end - begin, cumulative);
  }
}

// Step 3: recount this block's rows per warp, turn the counts into first
// positions from the scanned table, and place.
template <typename IdT, typename MapT>
__global__ void __launch_bounds__(kIndexThreads)
place_kernel(const IdT* __restrict__ ids, const MapT* __restrict__ map, int64_t rows,
             int64_t rows_per_block, int warps, int64_t num_experts, int64_t start, int32_t range,
             const int32_t* __restrict__ block_offsets, const int32_t* __restrict__ expert_base,
             int32_t* __restrict__ expanded_row_idx) {
  extern __shared__ int32_t counters[];
  const int64_t block_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t block_end = std::min(rows, block_begin + rows_per_block);
  const int64_t warp_rows = rows_per_warp(rows_per_block, warps);
  count_block_rows(ids, map, block_begin, block_end, warp_rows, warps, num_experts, start, range,
                   counters);
  for (int64_t e = threadIdx.x; e < range; e += blockDim.x) {
    int32_t run = block_offsets[e * gridDim.x + blockIdx.x] + (expert_base != nullptr ? expert_base[e] : 0);
    for (int w = 0; w < warps; ++w) {
      const int32_t count = counters[w * range + e];
      counters[w * range + e] = run;
      run += count;
    }
  }
  __syncthreads();
  place_block_rows(ids, map, block_begin, block_end, warp_rows, warps, num_experts, start, range,
                   counters, expanded_row_idx);
}

// Step 2, coalesced (replaces scan_kernel): warp w scans the rows e = w, w + 32,
// ... of the [range][blocks] table in place (each row's blocks in order,
// kScanRows rows' loads in flight together, 4 contiguous entries a lane), then
// one block-wide scan of the row totals gives each expert's first position,
// written to expert_base (added by place_kernel) and expert_tokens. The old
// kernel walked thread-contiguous runs of the table (every warp load touching
// 32 lines): at EP 1 (32k entries) it alone cost ~60 µs on an H200.
constexpr int kScanRows = 4;
constexpr int64_t kSmallScanEntries = 4096;

__global__ void __launch_bounds__(kScanThreads)
scan_rows_kernel(int32_t* __restrict__ block_counts, int64_t blocks, int32_t range, bool cumulative,
                 int64_t* __restrict__ expert_tokens, int32_t* __restrict__ expert_base) {
  using BlockScan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  __shared__ int32_t totals[kMaxActiveExperts];
  constexpr int kWarps = kScanThreads / 32;
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int lane = static_cast<int>(threadIdx.x & 31);
  const unsigned lanes_before = (1u << lane) - 1u;
  for (int64_t e0 = warp; e0 < range; e0 += static_cast<int64_t>(kWarps) * kScanRows) {
    int32_t running[kScanRows];
#pragma unroll
    for (int r = 0; r < kScanRows; ++r) running[r] = 0;
    for (int64_t c = 0; c < blocks; c += 32 * 4) {
      int32_t v[kScanRows][4];
#pragma unroll
      for (int r = 0; r < kScanRows; ++r) {
        const int64_t e = e0 + static_cast<int64_t>(r) * kWarps;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t b = c + lane * 4 + i;
          v[r][i] = e < range && b < blocks ? block_counts[e * blocks + b] : 0;
        }
      }
#pragma unroll
      for (int r = 0; r < kScanRows; ++r) {
        const int64_t e = e0 + static_cast<int64_t>(r) * kWarps;
        const int32_t local = v[r][0] + v[r][1] + v[r][2] + v[r][3];
        int32_t inclusive = local;
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2) {
          const int32_t other = __shfl_up_sync(0xffffffffu, inclusive, offset);
          if (lane >= offset) inclusive += other;
        }
        int32_t run = running[r] + inclusive - local;
        if (e < range) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int64_t b = c + lane * 4 + i;
            if (b < blocks) block_counts[e * blocks + b] = run;
            run += v[r][i];
          }
        }
        running[r] += __shfl_sync(0xffffffffu, inclusive, 31);
      }
    }
#pragma unroll
    for (int r = 0; r < kScanRows; ++r) {
      const int64_t e = e0 + static_cast<int64_t>(r) * kWarps;
      if (lane == 0 && e < range) totals[e] = running[r];
    }
  }
  (void)lanes_before;
  __syncthreads();
  // Exclusive scan of the totals over the experts (rows < 2^31: int32 is exact).
  const int64_t per_thread = ceil_div(range, kScanThreads);
  const int64_t first = std::min<int64_t>(range, threadIdx.x * per_thread);
  const int64_t last = std::min<int64_t>(range, first + per_thread);
  int32_t local_sum = 0;
  for (int64_t e = first; e < last; ++e) local_sum += totals[e];
  int32_t prefix = 0;
  BlockScan(temp).ExclusiveSum(local_sum, prefix);
  for (int64_t e = first; e < last; ++e) {
    expert_base[e] = prefix;
    write_expert_tokens(expert_tokens, e, prefix, totals[e], cumulative);
    prefix += totals[e];
  }
}

// Scatter-form copy: a group of threads_per_row threads per source token.
template <int kBytes>
__global__ void __launch_bounds__(kBlockThreads)
scatter_copy_kernel(const uint8_t* __restrict__ hidden, int64_t num_tokens, int64_t topk,
                    int64_t vectors_per_row, int threads_per_row_,
                    const int32_t* __restrict__ expanded_row_idx, uint8_t* __restrict__ permuted) {
  using V = typename Unit<kBytes>::type;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / threads_per_row_) +
                        threadIdx.x / threads_per_row_;
  if (token >= num_tokens) return;
  const int lane = static_cast<int>(threadIdx.x % threads_per_row_);
  const V* __restrict__ source = reinterpret_cast<const V*>(hidden) + token * vectors_per_row;
  const int32_t* destinations = expanded_row_idx + token * topk;
  // Under expert parallelism many tokens have no local destination: skip their read.
  bool needed = false;
  for (int64_t k = 0; k < topk; ++k) needed = needed || destinations[k] >= 0;
  if (!needed) return;
  const int64_t stride = static_cast<int64_t>(threads_per_row_) * kUnroll;
  for (int64_t first = lane; first < vectors_per_row; first += stride) {
    V values[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + static_cast<int64_t>(u) * threads_per_row_;
      if (v < vectors_per_row) values[u] = source[v];
    }
    for (int64_t k = 0; k < topk; ++k) {
      const int64_t position = destinations[k];  // written by the index kernels: -1 or a valid row
      if (position < 0) continue;
      V* __restrict__ row = reinterpret_cast<V*>(permuted) + position * vectors_per_row;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * threads_per_row_;
        if (v < vectors_per_row) row[v] = values[u];
      }
    }
  }
}

// Scatter-form copy, tiled: kTile tokens per block, the whole block on one
// token at a time. Warp w loads token w's K (<= 32) destinations in one step
// (not K dependent loads) and compacts the valid ones into shared memory; a
// token with none is not read. The token row is read kUnroll vectors a thread
// (all in flight) and written to each destination.
constexpr int kMaxTileTopk = 32;

template <int kBytes, int kTile>
__global__ void __launch_bounds__(kBlockThreads)
scatter_copy_tile_kernel(const uint8_t* __restrict__ hidden, int64_t num_tokens, int64_t topk,
                         int64_t vectors_per_row, const int32_t* __restrict__ expanded_row_idx,
                         uint8_t* __restrict__ permuted) {
  using V = typename Unit<kBytes>::type;
  __shared__ int32_t tile_destination[kTile][kMaxTileTopk];
  __shared__ int tile_count[kTile];
  const int64_t first_token = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tokens = static_cast<int>(num_tokens - first_token < kTile ? num_tokens - first_token : kTile);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int lane = static_cast<int>(threadIdx.x & 31);
  if (warp < tokens) {
    // written by the index kernels: -1 or a valid row
    const int32_t position = lane < topk ? expanded_row_idx[(first_token + warp) * topk + lane] : -1;
    const unsigned present = __ballot_sync(0xffffffffu, position >= 0);
    if (position >= 0) tile_destination[warp][__popc(present & ((1u << lane) - 1u))] = position;
    if (lane == 0) tile_count[warp] = __popc(present);
  }
  __syncthreads();
  for (int t = 0; t < tokens; ++t) {
    if (tile_count[t] == 0) continue;
    copy_row_to_rows(reinterpret_cast<const V*>(hidden) + (first_token + t) * vectors_per_row,
                     reinterpret_cast<V*>(permuted), tile_destination[t], tile_count[t], vectors_per_row);
  }
}

// Row-form copy (small inputs): a group of threads_per_row threads per routed
// row f copies token f / K to its position, if it has one.
template <int kBytes>
__global__ void __launch_bounds__(kBlockThreads)
row_copy_kernel(const uint8_t* __restrict__ hidden, int64_t num_rows, int64_t topk,
                int64_t vectors_per_row, int threads_per_row_,
                const int32_t* __restrict__ expanded_row_idx, uint8_t* __restrict__ permuted) {
  using V = typename Unit<kBytes>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / threads_per_row_) +
                      threadIdx.x / threads_per_row_;
  if (row >= num_rows) return;
  const int64_t position = expanded_row_idx[row];  // written by the index kernels: -1 or a valid row
  if (position < 0) return;
  const int lane = static_cast<int>(threadIdx.x % threads_per_row_);
  const V* __restrict__ source = reinterpret_cast<const V*>(hidden) + (row / topk) * vectors_per_row;
  V* __restrict__ destination = reinterpret_cast<V*>(permuted) + position * vectors_per_row;
  copy_row(source, destination, lane, threads_per_row_, vectors_per_row);
}

// Decode sizes (<= kFusedDecodeOnlyRows routed rows): index and copy in ONE launch.
// Every block builds the whole stable index itself (the single-block kernel's
// count / scan / place, into shared memory: a few KB of ids, L2 hits after the
// first block), block 0 writes expanded_row_idx and expert_tokens, and each
// block copies its share of the valid destination rows. Two dependent launches
// (index, then copy) cost more than the redundant index work at these sizes.
constexpr int64_t kFusedDecodeRows = 2048;  // its shared arrays; it runs up to kFusedDecodeOnlyRows
constexpr int kFusedCounterBudgetBytes = 16 * 1024;  // + ~24 KiB static: under the 48 KiB default
constexpr int64_t kFusedDecodeMaxBlocks = 128;

int fused_decode_warps(int64_t range) {
  const int64_t fit = kFusedCounterBudgetBytes / (std::max<int64_t>(range, 1) * 4);
  return static_cast<int>(std::min<int64_t>(kSingleBlockThreads / 32, fit));
}

template <typename IdT, typename MapT, int kBytes>
__global__ void __launch_bounds__(kSingleBlockThreads)
decode_permute_kernel(const uint8_t* __restrict__ hidden, int64_t vectors_per_row, int threads_per_row_,
                      const IdT* __restrict__ ids, const MapT* __restrict__ map, int64_t rows, int64_t topk,
                      int warps, int64_t num_experts, int64_t start, int32_t range, bool cumulative,
                      int64_t* __restrict__ expert_tokens, int32_t* __restrict__ expanded_row_idx,
                      uint8_t* __restrict__ permuted) {
  using V = typename Unit<kBytes>::type;
  __shared__ int32_t position[kFusedDecodeRows];
  __shared__ int32_t source_token[kFusedDecodeRows];
  extern __shared__ int32_t counters[];  // [warps][range]
  const int64_t warp_rows = rows_per_warp(rows, warps);
  const long long valid = block_first_positions(ids, map, rows, warp_rows, warps, num_experts, start, range,
                                                cumulative, expert_tokens, counters);
  place_block_rows(ids, map, 0, rows, warp_rows, warps, num_experts, start, range, counters, position);
  __syncthreads();
  for (int64_t f = threadIdx.x; f < rows; f += blockDim.x) {
    const int32_t p = position[f];
    if (blockIdx.x == 0) expanded_row_idx[f] = p;
    if (p >= 0) source_token[p] = static_cast<int32_t>(f / topk);
  }
  __syncthreads();
  // This block's share of the valid destination rows, a group of threads_per_row threads a row.
  const int64_t share = ceil_div(valid, gridDim.x);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * share;
  const int64_t end = std::min<int64_t>(valid, begin + share);
  const int rows_per_step = kSingleBlockThreads / threads_per_row_;
  const int lane = static_cast<int>(threadIdx.x % threads_per_row_);
  for (int64_t p = begin + threadIdx.x / threads_per_row_; p < end; p += rows_per_step) {
    const V* __restrict__ source = reinterpret_cast<const V*>(hidden) + source_token[p] * vectors_per_row;
    V* __restrict__ destination = reinterpret_cast<V*>(permuted) + p * vectors_per_row;
    copy_row(source, destination, lane, threads_per_row_, vectors_per_row);
  }
}

template <typename IdT, typename MapT>
cudaError_t launch_decode_permute(const void* hidden, int64_t row_bytes, const IdT* ids, const MapT* map,
                                  int64_t rows, int64_t topk, int64_t num_experts, int64_t start, int32_t range,
                                  bool cumulative, int64_t* expert_tokens, int32_t* expanded_row_idx,
                                  void* permuted, cudaStream_t stream) {
  const int unit = copy_unit_bytes(row_bytes, {hidden, permuted});
  const int64_t vectors = row_bytes / unit;
  const int threads = threads_per_row(vectors);
  const int warps = fused_decode_warps(range);
  const size_t shared = static_cast<size_t>(warps) * static_cast<size_t>(range) * sizeof(int32_t);
  // Enough blocks that the copy is spread wide (each builds the index itself: a few µs of shared-memory work).
  const auto grid = static_cast<unsigned>(std::max<int64_t>(1, std::min(kFusedDecodeMaxBlocks, rows)));
  return dispatch_unit(unit, [&](auto unit_tag) {
    constexpr int kBytes = decltype(unit_tag)::value;
    decode_permute_kernel<IdT, MapT, kBytes><<<grid, kSingleBlockThreads, shared, stream>>>(
        static_cast<const uint8_t*>(hidden), vectors, threads, ids, map, rows, topk, warps, num_experts, start, range,
        cumulative, expert_tokens, expanded_row_idx, static_cast<uint8_t*>(permuted));
    return cudaGetLastError();
  });
}

template <typename IdT>
cudaError_t launch_decode_permute_for_ids(const void* hidden, int64_t row_bytes, const IdT* ids, const void* map,
                                          bool map_is_int64, int64_t rows, int64_t topk, int64_t num_experts,
                                          int64_t start, int32_t range, bool cumulative, int64_t* expert_tokens,
                                          int32_t* expanded_row_idx, void* permuted, cudaStream_t stream) {
  if (map != nullptr && map_is_int64) {
    return launch_decode_permute(hidden, row_bytes, ids, static_cast<const int64_t*>(map), rows, topk, num_experts,
                                 start, range, cumulative, expert_tokens, expanded_row_idx, permuted, stream);
  }
  return launch_decode_permute(hidden, row_bytes, ids, static_cast<const int32_t*>(map), rows, topk, num_experts,
                               start, range, cumulative, expert_tokens, expanded_row_idx, permuted, stream);
}

template <typename IdT, typename MapT>
cudaError_t launch_index(const IdT* ids, const MapT* map, int64_t rows, int64_t num_experts,
                         int64_t start, int32_t range, bool cumulative, int32_t* expanded_row_idx,
                         int64_t* expert_tokens, int32_t* workspace, cudaStream_t stream) {
  if (rows <= kSingleBlockRows) {
    const int warps = counting_warps(range, kSingleBlockThreads / 32);
    const size_t shared = static_cast<size_t>(warps) * static_cast<size_t>(range) * sizeof(int32_t);
    single_block_index_kernel<<<1, kSingleBlockThreads, shared, stream>>>(
        ids, map, rows, warps, num_experts, start, range, cumulative, expert_tokens, expanded_row_idx);
    return cudaGetLastError();
  }
  const IndexGrid grid = index_grid(rows, range);
  const int warps = counting_warps(range, kIndexThreads / 32);
  const size_t shared = static_cast<size_t>(warps) * static_cast<size_t>(range) * sizeof(int32_t);
  const auto blocks = static_cast<unsigned>(grid.blocks);
  count_kernel<<<blocks, kIndexThreads, shared, stream>>>(ids, map, rows, grid.rows_per_block, warps,
                                                          num_experts, start, range, workspace);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  // Measured on an H200 (docs/PERFORMANCE.md): the coalesced row scan wins from ~8k table entries
  // (EP 1: 75.8 -> 17.7 us for the whole index), the thread-contiguous scan on small tables (EP 32,
  // K=2: ~1 us faster).
  int32_t* expert_base = nullptr;
  if (static_cast<int64_t>(range) * grid.blocks > kSmallScanEntries) {
    expert_base = workspace + grid.blocks * range;
    scan_rows_kernel<<<1, kScanThreads, 0, stream>>>(workspace, grid.blocks, range, cumulative, expert_tokens,
                                                     expert_base);
  } else {
    scan_kernel<<<1, kScanThreads, 0, stream>>>(workspace, grid.blocks, range, cumulative, expert_tokens);
  }
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  place_kernel<<<blocks, kIndexThreads, shared, stream>>>(ids, map, rows, grid.rows_per_block, warps,
                                                          num_experts, start, range, workspace, expert_base,
                                                          expanded_row_idx);
  return cudaGetLastError();
}

template <typename IdT>
cudaError_t launch_index_for_ids(const IdT* ids, const void* map, bool map_is_int64, int64_t rows,
                                 int64_t num_experts, int64_t start, int32_t range, bool cumulative,
                                 int32_t* expanded_row_idx, int64_t* expert_tokens,
                                 int32_t* workspace, cudaStream_t stream) {
  if (map != nullptr && map_is_int64) {
    return launch_index(ids, static_cast<const int64_t*>(map), rows, num_experts, start, range,
                        cumulative, expanded_row_idx, expert_tokens, workspace, stream);
  }
  return launch_index(ids, static_cast<const int32_t*>(map), rows, num_experts, start, range,
                      cumulative, expanded_row_idx, expert_tokens, workspace, stream);
}

constexpr int64_t kHistogramIdsPerThread = 8;
constexpr int kHistogramBatch = 8;

// Histogram. Each block counts its slice in shared memory (warp-aggregated:
// lanes holding the same id add once, so a skewed routing does not serialise
// on one counter), then adds each non-zero bin to the global counts once.
// The counts are zeroed by a memset before (or, for a single block, written
// directly). Many blocks, a few ids per thread: a single block walking 64k ids
// was latency-bound (~46 us for 0.26 MB on an H100).
template <typename IdT>
__global__ void __launch_bounds__(kBlockThreads)
histogram_kernel(const IdT* __restrict__ ids, int64_t count, int64_t num_experts, bool use_shared,
                 bool write_directly, unsigned long long* __restrict__ counts) {
  extern __shared__ int32_t histogram[];
  if (use_shared) {
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) histogram[e] = 0;
    __syncthreads();
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // All lanes of a warp run the same trip count (__match_any_sync needs them).
  const int64_t warp_first = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u);
  // kHistogramBatch ids a thread are loaded together (one memory latency), then counted.
  for (int64_t batch = warp_first; batch < count; batch += step * kHistogramBatch) {
    int64_t id[kHistogramBatch];
#pragma unroll
    for (int j = 0; j < kHistogramBatch; ++j) {
      const int64_t i = batch + j * step + lane;
      id[j] = i < count ? static_cast<int64_t>(ids[i]) : -1;
    }
#pragma unroll
    for (int j = 0; j < kHistogramBatch; ++j) {
      const int64_t key = id[j] >= 0 && id[j] < num_experts ? id[j] : -1;  // padding and foreign ids: not counted
      const unsigned peers = __match_any_sync(0xffffffffu, key);
      if (key < 0 || lane != __ffs(peers) - 1) continue;
      if (use_shared) {
        atomicAdd(&histogram[key], __popc(peers));
      } else {
        atomicAdd(&counts[key], static_cast<unsigned long long>(__popc(peers)));  // order-independent
      }
    }
  }
  if (!use_shared) return;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const int32_t value = histogram[e];
    if (write_directly) {
      counts[e] = static_cast<unsigned long long>(value);
    } else if (value != 0) {
      atomicAdd(&counts[e], static_cast<unsigned long long>(value));
    }
  }
}


template <typename IdT>
cudaError_t launch_histogram(const IdT* ids, int64_t count, int64_t num_experts, int64_t* counts,
                             cudaStream_t stream) {
  auto* out = reinterpret_cast<unsigned long long*>(counts);
  const bool use_shared = num_experts <= kHistogramSharedExperts;
  const size_t shared = use_shared ? static_cast<size_t>(num_experts) * sizeof(int32_t) : 0;
  // Blocks: kHistogramIdsPerThread ids per thread, fewer when the bins are many
  // (each block zeroes and flushes every bin).
  int64_t blocks = ceil_div(count, kBlockThreads * kHistogramIdsPerThread);
  if (use_shared) blocks = std::min<int64_t>(blocks, std::max<int64_t>(1, 4 * count / num_experts));
  blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, 528));
  if (use_shared && blocks == 1) {  // one launch, no memset
    histogram_kernel<<<1, kBlockThreads, shared, stream>>>(ids, count, num_experts, true, true, out);
    return cudaGetLastError();
  }
  const cudaError_t status =
      cudaMemsetAsync(counts, 0, static_cast<size_t>(num_experts) * sizeof(int64_t), stream);
  if (status != cudaSuccess) return status;
  histogram_kernel<<<static_cast<unsigned>(blocks), kBlockThreads, shared, stream>>>(
      ids, count, num_experts, use_shared, false, out);
  return cudaGetLastError();
}

}  // namespace

int64_t permute_max_active_experts() { return kMaxActiveExperts; }

size_t permute_workspace_bytes(int64_t num_rows, int64_t active_experts) {
  // The one-launch path's table and keys, or the multi-launch path's
  // [experts][blocks] count table and each expert's first position.
  size_t bytes = std::max<size_t>(16, permute_onepass_workspace_bytes(num_rows, active_experts));
  if (num_rows <= kSingleBlockRows) return bytes;
  const int64_t entries =
      (index_grid(num_rows, active_experts).blocks + 1) * std::max<int64_t>(active_experts, 1);
  return std::max(bytes, static_cast<size_t>(ceil_div(entries * 4, 16) * 16));
}

cudaError_t launch_moe_permute(const void* hidden, int64_t row_bytes, const void* topk_ids,
                               bool ids_are_int64, int64_t num_tokens, int64_t topk,
                               int64_t num_experts, const void* expert_map, bool map_is_int64,
                               int64_t active_start, int64_t active_end, bool counts_cumsum,
                               void* permuted, int32_t* expanded_row_idx, int64_t* expert_tokens,
                               void* workspace, cudaStream_t stream) {
  const int64_t rows = num_tokens * topk;
  const int64_t range = active_end - active_start;
  if (range < 0 || range > kMaxActiveExperts) return cudaErrorInvalidValue;
  if (rows == 0) {
    if (range == 0) return cudaSuccess;
    return cudaMemsetAsync(expert_tokens, 0, static_cast<size_t>(range) * sizeof(int64_t), stream);
  }
  auto* table = static_cast<int32_t*>(workspace);
  const auto range32 = static_cast<int32_t>(range);
  {
    // Decode sizes: the fused decode kernel (routing_geometry.h onepass_preferred says why up to where).
    if (row_bytes > 0 && rows <= kFusedDecodeOnlyRows && fused_decode_warps(range) >= 1) {
      return ids_are_int64
                 ? launch_decode_permute_for_ids(hidden, row_bytes, static_cast<const int64_t*>(topk_ids), expert_map,
                                                 map_is_int64, rows, topk, num_experts, active_start, range32,
                                                 counts_cumsum, expert_tokens, expanded_row_idx, permuted, stream)
                 : launch_decode_permute_for_ids(hidden, row_bytes, static_cast<const int32_t*>(topk_ids), expert_map,
                                                 map_is_int64, rows, topk, num_experts, active_start, range32,
                                                 counts_cumsum, expert_tokens, expanded_row_idx, permuted, stream);
    }
  }
  {
    OnepassPermute request;
    request.hidden = hidden;
    request.row_bytes = row_bytes;
    request.permuted = permuted;
    request.topk_ids = topk_ids;
    request.ids_are_int64 = ids_are_int64;
    request.num_tokens = num_tokens;
    request.topk = topk;
    request.num_experts = num_experts;
    request.expert_map = expert_map;
    request.map_is_int64 = map_is_int64;
    request.active_start = active_start;
    request.active_end = active_end;
    request.counts_cumsum = counts_cumsum;
    request.expanded_row_idx = expanded_row_idx;
    request.expert_tokens = expert_tokens;
    request.workspace = workspace;
    bool launched = false;
    const cudaError_t status = launch_permute_onepass(request, stream, &launched);
    if (launched || status != cudaSuccess) return status;
  }
  cudaError_t status =
      ids_are_int64
          ? launch_index_for_ids(static_cast<const int64_t*>(topk_ids), expert_map, map_is_int64, rows,
                                 num_experts, active_start, range32, counts_cumsum, expanded_row_idx,
                                 expert_tokens, table, stream)
          : launch_index_for_ids(static_cast<const int32_t*>(topk_ids), expert_map, map_is_int64, rows,
                                 num_experts, active_start, range32, counts_cumsum, expanded_row_idx,
                                 expert_tokens, table, stream);
  if (status != cudaSuccess || row_bytes == 0) return status;

  const int unit = copy_unit_bytes(row_bytes, {hidden, permuted});
  const int64_t vectors = row_bytes / unit;
  const int threads = threads_per_row(vectors);
  const unsigned blocks = grid_for_rows(num_tokens, threads);
  const bool per_row = blocks < kMinScatterBlocks && topk > 1;
  return dispatch_unit(unit, [&](auto unit_tag) {
    constexpr int kBytes = decltype(unit_tag)::value;
    if (per_row) {
      row_copy_kernel<kBytes><<<grid_for_rows(rows, threads), kBlockThreads, 0, stream>>>(
          static_cast<const uint8_t*>(hidden), rows, topk, vectors, threads, expanded_row_idx,
          static_cast<uint8_t*>(permuted));
      return cudaGetLastError();
    }
    // Measured on an H200: one token a block with its K destinations read in one step beats one
    // token a block reading them one by one (4-17%) and 4 or 8 tokens a block (docs/PERFORMANCE.md).
    if (topk <= kMaxTileTopk && vectors >= kBlockThreads) {
      scatter_copy_tile_kernel<kBytes, 1><<<static_cast<unsigned>(num_tokens), kBlockThreads, 0, stream>>>(
          static_cast<const uint8_t*>(hidden), num_tokens, topk, vectors, expanded_row_idx,
          static_cast<uint8_t*>(permuted));
      return cudaGetLastError();
    }
    scatter_copy_kernel<kBytes><<<blocks, kBlockThreads, 0, stream>>>(
        static_cast<const uint8_t*>(hidden), num_tokens, topk, vectors, threads, expanded_row_idx,
        static_cast<uint8_t*>(permuted));
    return cudaGetLastError();
  });
}

// The two halves of launch_moe_permute, for the padded permute
// (csrc/cuda/routing_permute_padded.cu), which remaps positions between them.
cudaError_t launch_permute_index(const void* topk_ids, bool ids_are_int64, int64_t num_tokens,
                                 int64_t topk, int64_t num_experts, const void* expert_map,
                                 bool map_is_int64, int64_t active_start, int64_t active_end,
                                 bool counts_cumsum, int32_t* expanded_row_idx,
                                 int64_t* expert_tokens, void* workspace, cudaStream_t stream) {
  const int64_t rows = num_tokens * topk;
  const int64_t range = active_end - active_start;
  if (range < 0 || range > kMaxActiveExperts) return cudaErrorInvalidValue;
  if (rows == 0) {
    if (range == 0) return cudaSuccess;
    return cudaMemsetAsync(expert_tokens, 0, static_cast<size_t>(range) * sizeof(int64_t), stream);
  }
  auto* table = static_cast<int32_t*>(workspace);
  const auto range32 = static_cast<int32_t>(range);
  return ids_are_int64
             ? launch_index_for_ids(static_cast<const int64_t*>(topk_ids), expert_map, map_is_int64,
                                    rows, num_experts, active_start, range32, counts_cumsum,
                                    expanded_row_idx, expert_tokens, table, stream)
             : launch_index_for_ids(static_cast<const int32_t*>(topk_ids), expert_map, map_is_int64,
                                    rows, num_experts, active_start, range32, counts_cumsum,
                                    expanded_row_idx, expert_tokens, table, stream);
}

cudaError_t launch_permute_copy_rows(const void* source, int64_t row_bytes, int64_t num_tokens,
                                     int64_t topk, const int32_t* expanded_row_idx,
                                     void* destination, cudaStream_t stream) {
  const int64_t rows = num_tokens * topk;
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  const int unit = copy_unit_bytes(row_bytes, {source, destination});
  const int64_t vectors = row_bytes / unit;
  const int threads = threads_per_row(vectors);
  const unsigned blocks = grid_for_rows(num_tokens, threads);
  const bool per_row = blocks < kMinScatterBlocks && topk > 1;
  return dispatch_unit(unit, [&](auto unit_tag) {
    constexpr int kBytes = decltype(unit_tag)::value;
    if (per_row) {
      row_copy_kernel<kBytes><<<grid_for_rows(rows, threads), kBlockThreads, 0, stream>>>(
          static_cast<const uint8_t*>(source), rows, topk, vectors, threads, expanded_row_idx,
          static_cast<uint8_t*>(destination));
      return cudaGetLastError();
    }
    scatter_copy_kernel<kBytes><<<blocks, kBlockThreads, 0, stream>>>(
        static_cast<const uint8_t*>(source), num_tokens, topk, vectors, threads, expanded_row_idx,
        static_cast<uint8_t*>(destination));
    return cudaGetLastError();
  });
}

cudaError_t launch_expert_histogram(const void* ids, bool ids_are_int64, int64_t count,
                                    int64_t num_experts, int64_t* counts, cudaStream_t stream) {
  if (num_experts <= 0) return cudaErrorInvalidValue;
  if (ids_are_int64) return launch_histogram(static_cast<const int64_t*>(ids), count, num_experts, counts, stream);
  return launch_histogram(static_cast<const int32_t*>(ids), count, num_experts, counts, stream);
}

}  // namespace moe_ext::cuda
