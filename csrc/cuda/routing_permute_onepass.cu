// The one-launch permute: moe_permute (and moe_permute_padded) on CUDA as ONE
// cooperative kernel, where the multi-launch path (routing_permute.cu) takes
// count -> scan -> place -> copy (four dependent launches; in a CUDA graph each
// boundary costs a few µs, which was most of the index's 8-18 µs on an H200).
//
// Phases, separated by one grid barrier:
//   1. count: block s takes slice s of the routed rows (rows_per_slice rows,
//      8 warps, each warp a run of whole 32-row steps kept in registers). It
//      computes every row's local key once, ranks equal keys in flattened order
//      (__match_any_sync per step, then each warp's counts turned into first
//      ranks per key), writes each row's key and slice-local rank (into
//      expanded_row_idx, overwritten in phase 3) and the slice's counts as one
//      column of the [range][slices] table.
//   -- grid barrier (cooperative launch: every block is resident) --
//   2. scan: EVERY block loads the whole table (kept small by onepass_plan:
//      ~2-8k entries, L2 hits) and scans it in shared memory, expert-major, so
//      the entry (e, s) becomes the first position of slice s's rows of expert
//      e. No second barrier and no single-block scan. Padded layout: a scan
//      of the padded expert totals gives each expert's shift to its padded
//      block; block 0 writes the count outputs.
//   3. place + copy: tiles of tile_tokens tokens, grid-stride; warp w reads
//      token w's K (key, rank) pairs (prefetched during the previous tile's
//      copy), writes its final positions to expanded_row_idx and the block
//      copies each token row (and its scale row) to them: the row is read once.
//   4. padded layout: the pad rows of every expert block are zeroed.
// Stability: a row's position is (first position of its slice for its key) +
// (rank among the equal keys of its slice, in flattened order), so equal keys
// keep their flattened order - the same order as the multi-launch index.
// Rows past the valid (padded) count are not written.
#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "cuda/launchers.h"
#include "cuda/routing_common.cuh"
#include "cuda/routing_geometry.h"
#include "cuda/routing_permute_keys.cuh"

namespace moe_ext::cuda {
namespace {

using namespace routing;

constexpr int kWarps = kBlockThreads / 32;
static_assert(kWarps * 32 == kOnepassSliceUnit, "a slice step is one 32-row step per warp");
constexpr int kMaxTileTokens = kWarps;  // warp w reads token w of a tile

struct Params {
  const uint8_t* hidden;
  uint8_t* permuted;
  int64_t vectors_per_row;  // copy units of the row (0: index only)
  const float* scales;      // null: no scale rows
  float* permuted_scales;
  int64_t scale_cols;
  int64_t num_tokens;
  int64_t topk;
  int64_t rows;
  int64_t num_experts;
  int64_t start;
  int32_t range;
  int64_t slices;
  int64_t rows_per_slice;
  int64_t alignment;  // 1: the plain layout
  bool cumulative;
  int64_t* expert_tokens;           // padded counts (the plain counts when alignment == 1)
  int64_t* expert_tokens_unpadded;  // null for the plain op
  int32_t* expanded_row_idx;
  int32_t* keys;   // [rows] workspace: each row's local key (-1: dropped)
  int32_t* table;  // [range][slices] workspace: per-slice counts
  int tile_tokens;
};

using BlockScan = cub::BlockScan<long long, kBlockThreads>;

// Phase 1 for slice s. counters: [kWarps][range] shared int32.
template <typename IdT, typename MapT>
__device__ void count_slice(const Params& p, const IdT* __restrict__ ids, const MapT* __restrict__ map,
                            int64_t s, int32_t* counters) {
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int lane = static_cast<int>(threadIdx.x & 31);
  const unsigned lanes_before = (1u << lane) - 1u;
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(kWarps) * p.range; i += kBlockThreads) counters[i] = 0;
  __syncthreads();
  const int64_t warp_rows = p.rows_per_slice / kWarps;  // whole 32-row steps, <= kOnepassMaxSteps of them
  const int64_t begin = s * p.rows_per_slice + warp * warp_rows;
  const int64_t end = std::min(p.rows, begin + warp_rows);
  int32_t* mine = counters + warp * p.range;
  // All keys first: their loads (id, then map entry) are in flight together.
  int32_t key[kOnepassMaxSteps];
#pragma unroll
  for (int j = 0; j < kOnepassMaxSteps; ++j) {
    const int64_t f = begin + j * 32 + lane;
    key[j] = f < end ? local_key(ids, map, f, p.num_experts, p.start, p.range) : -1;
  }
  // Rank within the warp's run (rows of earlier steps, then equal keys of
  // lower lanes in this step), parked in expanded_row_idx (registers are
  // scarce: the copy phase wants many resident blocks).
#pragma unroll
  for (int j = 0; j < kOnepassMaxSteps; ++j) {
    const int64_t f = begin + j * 32 + lane;
    const unsigned peers = __match_any_sync(0xffffffffu, key[j]);
    if (f < end) {
      p.keys[f] = key[j];
      p.expanded_row_idx[f] = key[j] >= 0 ? mine[key[j]] + __popc(peers & lanes_before) : -1;
    }
    __syncwarp();
    if (key[j] >= 0 && lane == __ffs(peers) - 1) mine[key[j]] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();
  // Per key: the warps' counts become their first ranks in the slice (warp
  // order = flattened order); the slice total goes to the table.
  for (int64_t e = threadIdx.x; e < p.range; e += kBlockThreads) {
    int32_t run = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int32_t count = counters[w * p.range + e];
      counters[w * p.range + e] = run;
      run += count;
    }
    p.table[e * p.slices + s] = run;
  }
  __syncthreads();
  // The slice-local rank: the warp's first rank for the key + the rank in the
  // warp (this thread's own write above).
#pragma unroll
  for (int j = 0; j < kOnepassMaxSteps; ++j) {
    const int64_t f = begin + j * 32 + lane;
    if (f < end && key[j] >= 0) p.expanded_row_idx[f] += mine[key[j]];
  }
  __syncthreads();  // the counters are zeroed again for the next slice
}

// The table in shared memory skips one word every 32: each thread of the scan
// walks a contiguous run of entries, and without the skip a run of 32 (or 8)
// entries a thread puts every lane of a warp on one bank (32- or 8-way
// conflicts on every access; the expert starts, one every `slices` entries,
// likewise).
template <typename I>
__host__ __device__ inline I table_slot(I i) { return i + (i >> 5); }
inline int64_t table_slots(int64_t entries) { return table_slot(entries) + 1; }

// What phase 2 leaves in shared memory for phases 3 and 4.
struct Layout {
  int32_t* first;       // [range][slices] (at table_slot): first position of slice s's rows of expert e (unpadded)
  int32_t* shift;       // [range]: padded block start - unpadded start of expert e (0 unpadded)
  int32_t* pad_prefix;  // [range + 1]: pad rows of the experts before e
  int32_t valid;        // routed rows with a local expert (< 2^31)
  int32_t slices;       // <= kOnepassMaxTable: 32-bit indices keep registers free for the copy

  __device__ int32_t at(int32_t e, int32_t s) const { return first[table_slot(e * slices + s)]; }
  __device__ int32_t expert_start(int32_t e) const { return at(e, 0); }
  __device__ int32_t expert_count(int32_t e, int32_t range) const {
    const int32_t next = e + 1 < range ? at(e + 1, 0) : valid;
    return next - at(e, 0);
  }
};

// Phase 2 (every block).
__device__ Layout scan_table(const Params& p, int32_t* shared, typename BlockScan::TempStorage& temp) {
  Layout layout;
  layout.slices = static_cast<int32_t>(p.slices);
  const int64_t entries = static_cast<int64_t>(p.range) * p.slices;
  const int64_t region = std::max<int64_t>(static_cast<int64_t>(kWarps) * p.range, table_slot(entries) + 1);
  layout.first = shared;
  layout.shift = shared + region;
  layout.pad_prefix = layout.shift + p.range;
  // Written by other blocks before the barrier: __ldcg reads L2, never a stale L1 line.
  for (int64_t i = threadIdx.x; i < entries; i += kBlockThreads) layout.first[table_slot(i)] = __ldcg(p.table + i);
  __syncthreads();
  {
    const int64_t per_thread = ceil_div(entries, kBlockThreads);
    const int64_t lo = std::min<int64_t>(entries, threadIdx.x * per_thread);
    const int64_t hi = std::min<int64_t>(entries, lo + per_thread);
    long long sum = 0;
    for (int64_t i = lo; i < hi; ++i) sum += layout.first[table_slot(i)];
    long long prefix = 0, valid = 0;
    BlockScan(temp).ExclusiveSum(sum, prefix, valid);
    layout.valid = static_cast<int32_t>(valid);
    for (int64_t i = lo; i < hi; ++i) {
      const int32_t count = layout.first[table_slot(i)];
      layout.first[table_slot(i)] = static_cast<int32_t>(prefix);  // rows < 2^31: int32 is exact
      prefix += count;
    }
  }
  __syncthreads();
  // Expert level: padded blocks (alignment 1: the blocks themselves), pad rows, count outputs.
  const int32_t per_thread = static_cast<int32_t>(ceil_div(p.range, kBlockThreads));
  const int32_t lo = std::min<int32_t>(p.range, threadIdx.x * per_thread);
  const int32_t hi = std::min<int32_t>(p.range, lo + per_thread);
  long long padded_sum = 0, pad_sum = 0;
  for (int32_t e = lo; e < hi; ++e) {
    const long long count = layout.expert_count(e, p.range);
    const long long block = (count + p.alignment - 1) / p.alignment * p.alignment;
    padded_sum += block;
    pad_sum += block - count;
  }
  long long padded_prefix = 0, pad_prefix = 0, pad_total = 0;
  BlockScan(temp).ExclusiveSum(padded_sum, padded_prefix);
  __syncthreads();  // temp storage reused
  BlockScan(temp).ExclusiveSum(pad_sum, pad_prefix, pad_total);
  const bool writer = blockIdx.x == 0;
  for (int32_t e = lo; e < hi; ++e) {
    const long long count = layout.expert_count(e, p.range);
    const long long block = (count + p.alignment - 1) / p.alignment * p.alignment;
    const long long start = layout.expert_start(e);
    // Padded positions < the host-checked int32 bound of the padded layout.
    layout.shift[e] = static_cast<int32_t>(padded_prefix - start);
    layout.pad_prefix[e] = static_cast<int32_t>(pad_prefix);
    if (writer) {
      p.expert_tokens[e] = p.cumulative ? padded_prefix + block : block;
      if (p.expert_tokens_unpadded != nullptr) p.expert_tokens_unpadded[e] = p.cumulative ? start + count : count;
    }
    padded_prefix += block;
    pad_prefix += block - count;
  }
  if (threadIdx.x == 0) layout.pad_prefix[p.range] = static_cast<int32_t>(pad_total);
  __syncthreads();
  return layout;
}

// At most 64 registers (4 resident blocks an SM, without spills): the copy
// phase's reads in flight scale with the resident blocks.
template <typename IdT, typename MapT, int kBytes>
__global__ void __launch_bounds__(kBlockThreads, 4)
onepass_permute_kernel(Params p, const IdT* __restrict__ ids, const MapT* __restrict__ map) {
  using V = typename Unit<kBytes>::type;
  extern __shared__ int32_t shared[];
  __shared__ typename BlockScan::TempStorage temp;
  __shared__ int32_t destination[kMaxTileTokens][32];
  __shared__ int destination_count[kMaxTileTokens];

  for (int64_t s = blockIdx.x; s < p.slices; s += gridDim.x) count_slice(p, ids, map, s, shared);
  cooperative_groups::this_grid().sync();  // also a memory barrier for the table, keys and ranks
  const Layout layout = scan_table(p, shared, temp);

  // Phase 3. This lane's routed row of the current tile: warps < tile_tokens, lanes < K.
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int lane = static_cast<int>(threadIdx.x & 31);
  // Token and row indices fit 32 bits (T*K < 2^31); byte offsets are 64-bit.
  const int32_t num_tokens = static_cast<int32_t>(p.num_tokens);
  const int32_t topk = static_cast<int32_t>(p.topk);
  const int32_t rows_per_slice = static_cast<int32_t>(p.rows_per_slice);
  const int32_t tiles = static_cast<int32_t>(ceil_div(p.num_tokens, p.tile_tokens));
  int32_t key = -1, rank = -1;
  auto fetch = [&](int32_t tile) {
    key = -1;
    const int32_t token = tile * p.tile_tokens + warp;
    if (tile < tiles && warp < p.tile_tokens && lane < topk && token < num_tokens) {
      const int32_t f = token * topk + lane;
      key = __ldcg(p.keys + f);
      rank = __ldcg(p.expanded_row_idx + f);
    }
  };
  fetch(blockIdx.x);
  for (int32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int32_t first_token = tile * p.tile_tokens;
    if (warp < p.tile_tokens) {
      int32_t position = -1;
      if (key >= 0) {
        const int32_t f = (first_token + warp) * topk + lane;
        position = layout.at(key, f / rows_per_slice) + rank + layout.shift[key];
        p.expanded_row_idx[f] = position;
      }
      const unsigned present = __ballot_sync(0xffffffffu, position >= 0);
      if (position >= 0) destination[warp][__popc(present & ((1u << lane) - 1u))] = position;
      if (lane == 0) destination_count[warp] = __popc(present);
    }
    __syncthreads();
    fetch(tile + gridDim.x);  // lands while this tile is copied
    const int tokens = std::min(p.tile_tokens, num_tokens - first_token);
    for (int t = 0; t < tokens; ++t) {
      const int count = destination_count[t];
      if (count == 0) continue;
      const int64_t token = first_token + t;
      copy_row_to_rows(reinterpret_cast<const V*>(p.hidden) + token * p.vectors_per_row,
                       reinterpret_cast<V*>(p.permuted), destination[t], count, p.vectors_per_row);
      if (p.scales == nullptr) continue;
      for (int64_t i = threadIdx.x; i < count * p.scale_cols; i += kBlockThreads) {
        const int64_t j = i / p.scale_cols, c = i % p.scale_cols;
        p.permuted_scales[destination[t][j] * p.scale_cols + c] = p.scales[token * p.scale_cols + c];
      }
    }
    __syncthreads();  // the destination lists are rewritten by the next tile
  }

  // Phase 4: pad row i of all experts' pads; a whole block a row.
  const int32_t pad_rows = layout.pad_prefix[p.range];
  const V zero{};
  for (int64_t i = blockIdx.x; i < pad_rows; i += gridDim.x) {  // 64-bit: i + gridDim.x may pass 2^31
    int32_t low = 0, high = p.range;  // last e with pad_prefix[e] <= i (empty pads never are the last)
    while (high - low > 1) {
      const int32_t middle = (low + high) / 2;
      if (layout.pad_prefix[middle] <= i) low = middle; else high = middle;
    }
    const int64_t row = layout.expert_start(low) + layout.shift[low] + layout.expert_count(low, p.range) +
                        (i - layout.pad_prefix[low]);
    V* __restrict__ out = reinterpret_cast<V*>(p.permuted) + row * p.vectors_per_row;
    for (int64_t v = threadIdx.x; v < p.vectors_per_row; v += kBlockThreads) out[v] = zero;
    if (p.scales == nullptr) continue;
    for (int64_t c = threadIdx.x; c < p.scale_cols; c += kBlockThreads) p.permuted_scales[row * p.scale_cols + c] = 0.0f;
  }
}

size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

size_t shared_bytes(const OnepassPlan& plan, int64_t range) {
  const int64_t region = std::max<int64_t>(static_cast<int64_t>(kWarps) * range, table_slots(plan.slices * range));
  return static_cast<size_t>(region + 2 * range + 1) * sizeof(int32_t);
}

// Tokens a tile: as many as keep every resident block busy, up to one per
// warp (measured on an H200, padded permute T=8192 EP 8: 4 tokens a tile
// 44.7-75.4 µs vs 46.9-75.9 for 2 and 47.8-75.6 for 1; decode sizes take 1).
int tile_tokens(int64_t num_tokens, int64_t resident_blocks) {
  for (int tile : {4, 2}) {
    if (num_tokens >= tile * resident_blocks) return tile;
  }
  return 1;
}

template <typename IdT, typename MapT>
cudaError_t launch_typed(Params params, const IdT* ids, const MapT* map, int unit, size_t shared,
                         int64_t alignment, cudaStream_t stream, bool* launched) {
  return dispatch_unit(unit, [&](auto unit_tag) {
    constexpr int kBytes = decltype(unit_tag)::value;
    auto* kernel = &onepass_permute_kernel<IdT, MapT, kBytes>;
    int device = 0, sms = 0, cooperative = 0, per_sm = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status == cudaSuccess) status = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
    if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (status == cudaSuccess)
      status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlockThreads, shared);
    if (status != cudaSuccess) return status;
    if (cooperative == 0 || per_sm < 1) return cudaSuccess;  // not launched: the multi-launch path runs
    // Every block must be resident (the grid barrier): at most per_sm blocks an SM; no more than has work.
    params.tile_tokens = tile_tokens(params.num_tokens, static_cast<int64_t>(per_sm) * sms);
    const int64_t tiles = ceil_div(params.num_tokens, params.tile_tokens);
    const int64_t pad_rows = alignment > 1 ? static_cast<int64_t>(params.range) * (alignment - 1) : 0;
    const int64_t useful = std::max({params.slices, tiles, pad_rows, int64_t{1}});
    const auto grid = static_cast<unsigned>(std::min<int64_t>(static_cast<int64_t>(per_sm) * sms, useful));
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(kBlockThreads);
    config.dynamicSmemBytes = shared;
    config.stream = stream;
    cudaLaunchAttribute attribute = {};
    attribute.id = cudaLaunchAttributeCooperative;
    attribute.val.cooperative = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    status = cudaLaunchKernelEx(&config, kernel, params, ids, map);
    if (status == cudaErrorCooperativeLaunchTooLarge) {
      // Fewer SMs than the device reports (MPS, green contexts): the multi-launch path runs instead.
      (void)cudaGetLastError();
      return cudaSuccess;
    }
    *launched = true;
    return status;
  });
}

template <typename IdT>
cudaError_t launch_for_ids(const Params& params, const IdT* ids, const void* map, bool map_is_int64, int unit,
                           size_t shared, int64_t alignment, cudaStream_t stream, bool* launched) {
  if (map != nullptr && map_is_int64)
    return launch_typed(params, ids, static_cast<const int64_t*>(map), unit, shared, alignment, stream, launched);
  return launch_typed(params, ids, static_cast<const int32_t*>(map), unit, shared, alignment, stream, launched);
}

}  // namespace

size_t permute_onepass_workspace_bytes(int64_t num_rows, int64_t active_experts) {
  // The slicing does not depend on K (K only decides whether the plan applies).
  const OnepassPlan plan = onepass_plan(num_rows, active_experts, /*topk=*/1);
  if (!plan.applies) return 0;
  return align16(static_cast<size_t>(plan.slices * active_experts) * sizeof(int32_t)) +
         align16(static_cast<size_t>(num_rows) * sizeof(int32_t));
}

cudaError_t launch_permute_onepass(const OnepassPermute& request, cudaStream_t stream, bool* launched) {
  *launched = false;
  const int64_t rows = request.num_tokens * request.topk;
  const int64_t range = request.active_end - request.active_start;
  const OnepassPlan plan = onepass_plan(rows, range, request.topk);
  const bool padded = request.expert_tokens_unpadded != nullptr;
  if (!plan.applies || !onepass_preferred(rows, range, request.num_experts, padded)) return cudaSuccess;
  Params params = {};
  const int unit = copy_unit_bytes(request.row_bytes, {request.hidden, request.permuted});
  params.hidden = static_cast<const uint8_t*>(request.hidden);
  params.permuted = static_cast<uint8_t*>(request.permuted);
  params.vectors_per_row = request.row_bytes / unit;
  params.scales = static_cast<const float*>(request.scales);
  params.permuted_scales = static_cast<float*>(request.permuted_scales);
  params.scale_cols = request.scales != nullptr ? request.scale_row_bytes / static_cast<int64_t>(sizeof(float)) : 0;
  params.num_tokens = request.num_tokens;
  params.topk = request.topk;
  params.rows = rows;
  params.num_experts = request.num_experts;
  params.start = request.active_start;
  params.range = static_cast<int32_t>(range);
  params.slices = plan.slices;
  params.rows_per_slice = plan.rows_per_slice;
  params.alignment = request.alignment;
  params.cumulative = request.counts_cumsum;
  params.expert_tokens = request.expert_tokens;
  params.expert_tokens_unpadded = request.expert_tokens_unpadded;
  params.expanded_row_idx = request.expanded_row_idx;
  auto* base = static_cast<uint8_t*>(request.workspace);
  params.table = reinterpret_cast<int32_t*>(base);
  params.keys = reinterpret_cast<int32_t*>(
      base + align16(static_cast<size_t>(plan.slices * range) * sizeof(int32_t)));
  const size_t shared = shared_bytes(plan, range);
  if (request.ids_are_int64) {
    return launch_for_ids(params, static_cast<const int64_t*>(request.topk_ids), request.expert_map,
                          request.map_is_int64, unit, shared, request.alignment, stream, launched);
  }
  return launch_for_ids(params, static_cast<const int32_t*>(request.topk_ids), request.expert_map,
                        request.map_is_int64, unit, shared, request.alignment, stream, launched);
}

}  // namespace moe_ext::cuda
