// moe_unpermute and its backward on CUDA.
//
// Forward: each token's K rows are summed with the probs in fp32 (fp64 for
// fp64), in order k = 0..K-1, and the token row is written once:
// deterministic, no atomics, and rows no index names (the unwritten tail of
// moe_permute) are never read. Large rows: tiles of 4 or 8 tokens a block,
// one index step per tile, a token with no row here writes only zeros (under
// expert parallelism most tokens; memset speed); decode grids of >= 128
// tokens: the same kernel one token a block. Fewer tokens, K > 32 and odd
// rows: one thread group per token, rows split over grid.y.
//
// Backward: a bitmask of named rows (memset, then atomicOr per entry) refuses
// a row named twice (device assert); grad_permuted[row] = probs[t,k] *
// grad_out[t] for each named row (one writer), grad_probs[t,k] =
// dot(grad_out[t], permuted[row]) in a fixed order; a token with no row here
// never reads its grad_out row. Large rows: one tile of 32 / K tokens a
// block, all its rows' loads in flight together (unpermute_backward_flat_kernel);
// small grids and K > 32: one token a block. Rows no entry names are NOT written (they are
// unspecified, like moe_permute's tail: see docs/DESIGN.md), except in the
// padded layout of an aligned moe_permute, where they are zeroed.
#include <algorithm>
#include <type_traits>

#include "cuda/device_check.cuh"
#include "cuda/launchers.h"
#include "cuda/routing_common.cuh"
#include "cuda/routing_geometry.h"

namespace moe_ext::cuda {
namespace {

using namespace routing;

constexpr int kBackwardThreads = 256;
// Forward: K <= kHoistedRows (every common model) reads a token's indices once; a grid of fewer blocks
// than kSmallGridBlocks (about two per SM of an H100/H200) uses the wide-batch, low-occupancy form.
constexpr int kHoistedRows = 8;
constexpr int64_t kSmallGridBlocks = 256;
constexpr int64_t kMinUnpermuteBlocks = 1024;  // ~8 blocks per SM of an H100
// Forward: a decode grid of at least this many tokens runs one token a block (about one block per SM of an
// H100/H200 and more; measured better at T=256, worse at T=16, the threshold between is a judgment).
constexpr int64_t kDecodeTileMinTokens = 128;

template <typename P, typename A>
__device__ __forceinline__ P to_prob(A value) {
  if constexpr (std::is_same_v<P, float>) {
    return static_cast<float>(value);
  } else {
    return store_acc<P>(value);
  }
}

// A group of threads_per_row threads per token (blockIdx.x), the row split
// over gridDim.y chunks when the tokens are too few to fill the GPU. The K
// rows are loaded kBatch at a time, all in flight together, and summed in
// order k = 0..K-1. With K <= kHoisted a thread reads the token's indices and
// weights once instead of once per pack, and a token with no row here (most
// tokens under wide expert parallelism) only writes zeros.
template <typename T, typename P, typename IndexT, int kVec, int kBatch, int kHoisted, int kMinBlocks>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocks)
unpermute_kernel(const T* __restrict__ permuted, int64_t num_rows, int64_t hidden_size,
                 const IndexT* __restrict__ row_idx, const P* __restrict__ probs, int64_t num_tokens,
                 int64_t topk, int threads_per_row_, T* __restrict__ out) {
  using A = typename Acc<T>::type;
  using PackT = Pack<T, kVec>;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / threads_per_row_) +
                        threadIdx.x / threads_per_row_;
  if (token >= num_tokens) return;
  const int lane = static_cast<int>(threadIdx.x % threads_per_row_);
  const int64_t packs = hidden_size / kVec;
  const PackT* __restrict__ source = reinterpret_cast<const PackT*>(permuted);
  PackT* __restrict__ destination = reinterpret_cast<PackT*>(out) + token * packs;
  const IndexT* rows = row_idx + token * topk;
  const int64_t stride = static_cast<int64_t>(threads_per_row_) * gridDim.y;
  const int64_t first_pack = static_cast<int64_t>(blockIdx.y) * threads_per_row_ + lane;

  // Rows k0 .. k0 + kRows - 1 of this token (-1 where absent or dropped) and their weights.
  auto load_rows = [&](int64_t k0, auto& row, auto& weight) {
    constexpr int kRows = sizeof(row) / sizeof(row[0]);
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      row[j] = -1;
      weight[j] = A(0);
      if (k0 + j < topk) {
        const int64_t r = static_cast<int64_t>(rows[k0 + j]);
        const bool in_range = r >= -1 && r < num_rows;
        MOE_DEVICE_CHECK(in_range, "moe_unpermute: expanded_row_idx out of range [-1, rows of permuted)");
        if (in_range && r >= 0) {
          row[j] = r;
          weight[j] = probs != nullptr ? static_cast<A>(to_acc(probs[token * topk + k0 + j])) : A(1);
        }
      }
    }
  };
  // Adds rows j0 .. j0 + kBatch - 1 (the present ones) at pack v into sum, their loads in flight together.
  auto add_rows = [&](int64_t v, int j0, const auto& row, const auto& weight, A (&sum)[kVec]) {
    PackT x[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      if (row[j0 + j] >= 0) x[j] = source[row[j0 + j] * packs + v];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (row[j0 + j] < 0) continue;
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum[i] += weight[j0 + j] * static_cast<A>(to_acc(x[j].value[i]));
    }
  };
  auto store = [&](int64_t v, const A (&sum)[kVec]) {
    PackT y;
#pragma unroll
    for (int i = 0; i < kVec; ++i) y.value[i] = store_acc<T>(sum[i]);
    destination[v] = y;
  };

  if constexpr (kHoisted > 0) {
    if (topk <= kHoisted) {
      int64_t row[kHoisted];
      A weight[kHoisted];
      load_rows(0, row, weight);
      bool any_row = false;
#pragma unroll
      for (int j = 0; j < kHoisted; ++j) any_row |= row[j] >= 0;
      for (int64_t v = first_pack; v < packs; v += stride) {
        A sum[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum[i] = A(0);
        if (any_row) {
#pragma unroll
          for (int j0 = 0; j0 < kHoisted; j0 += kBatch) add_rows(v, j0, row, weight, sum);
        }
        store(v, sum);
      }
      return;
    }
  }
  for (int64_t v = first_pack; v < packs; v += stride) {
    A sum[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum[i] = A(0);
    for (int64_t k0 = 0; k0 < topk; k0 += kBatch) {
      int64_t row[kBatch];
      A weight[kBatch];
      load_rows(k0, row, weight);
      add_rows(v, 0, row, weight, sum);
    }
    store(v, sum);
  }
}

// Forward, large rows: kTile tokens per block, the whole block on one token at
// a time. Warp w reads token w's K (<= 32) indices and weights in one
// coalesced step (one memory latency for the tile instead of one per token)
// and compacts the present rows in k order into shared memory; then each
// token's row is summed with kPacks packs a thread and kRowsInFlight rows'
// loads in flight together (kPacks * kRowsInFlight independent 16-byte
// loads), in order k = 0..K-1. A token with no row here only writes zeros:
// under expert parallelism most tokens are such, and they now cost a
// memset-speed write instead of a latency-bound block.
constexpr int kMaxTileTopk = 32;

template <typename T, typename P, typename IndexT, int kVec, int kTile, int kPacks, int kRowsInFlight,
          int kMinBlocks>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocks)
unpermute_tile_kernel(const T* __restrict__ permuted, int64_t num_rows, int64_t hidden_size,
                      const IndexT* __restrict__ row_idx, const P* __restrict__ probs, int64_t num_tokens,
                      int64_t topk, T* __restrict__ out) {
  static_assert(kTile <= kBlockThreads / 32, "one warp per token of the tile");
  using A = typename Acc<T>::type;
  using PackT = Pack<T, kVec>;
  __shared__ int64_t tile_row[kTile][kMaxTileTopk];
  __shared__ A tile_weight[kTile][kMaxTileTopk];
  __shared__ int tile_rows[kTile];
  const int64_t first_token = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tokens = static_cast<int>(num_tokens - first_token < kTile ? num_tokens - first_token : kTile);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int lane = static_cast<int>(threadIdx.x & 31);
  if (warp < tokens) {
    const int64_t entry = (first_token + warp) * topk + lane;
    int64_t row = -1;
    A weight = A(0);
    if (lane < topk) {
      const int64_t r = static_cast<int64_t>(row_idx[entry]);
      // The weight is loaded together with the index (not after it): one latency, not two.
      const A w = probs != nullptr ? static_cast<A>(to_acc(probs[entry])) : A(1);
      const bool in_range = r >= -1 && r < num_rows;
      MOE_DEVICE_CHECK(in_range, "moe_unpermute: expanded_row_idx out of range [-1, rows of permuted)");
      if (in_range && r >= 0) {
        row = r;
        weight = w;
      }
    }
    const unsigned present = __ballot_sync(0xffffffffu, row >= 0);
    if (row >= 0) {
      const int j = __popc(present & ((1u << lane) - 1u));
      tile_row[warp][j] = row;
      tile_weight[warp][j] = weight;
    }
    if (lane == 0) tile_rows[warp] = __popc(present);
  }
  __syncthreads();
  const int64_t packs = hidden_size / kVec;
  const PackT* __restrict__ source = reinterpret_cast<const PackT*>(permuted);
  for (int t = 0; t < tokens; ++t) {
    const int n = tile_rows[t];
    PackT* __restrict__ destination = reinterpret_cast<PackT*>(out) + (first_token + t) * packs;
    for (int64_t base = threadIdx.x; base < packs; base += static_cast<int64_t>(kBlockThreads) * kPacks) {
      A sum[kPacks][kVec];
#pragma unroll
      for (int u = 0; u < kPacks; ++u)
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum[u][i] = A(0);
      for (int j0 = 0; j0 < n; j0 += kRowsInFlight) {
        PackT x[kRowsInFlight][kPacks];
#pragma unroll
        for (int r = 0; r < kRowsInFlight; ++r) {
          if (j0 + r >= n) continue;
          const PackT* __restrict__ row = source + tile_row[t][j0 + r] * packs;
#pragma unroll
          for (int u = 0; u < kPacks; ++u) {
            const int64_t v = base + static_cast<int64_t>(u) * kBlockThreads;
            if (v < packs) x[r][u] = row[v];
          }
        }
#pragma unroll
        for (int r = 0; r < kRowsInFlight; ++r) {
          if (j0 + r >= n) continue;
          const A w = tile_weight[t][j0 + r];
#pragma unroll
          for (int u = 0; u < kPacks; ++u)
#pragma unroll
            for (int i = 0; i < kVec; ++i) sum[u][i] += w * static_cast<A>(to_acc(x[r][u].value[i]));
        }
      }
#pragma unroll
      for (int u = 0; u < kPacks; ++u) {
        const int64_t v = base + static_cast<int64_t>(u) * kBlockThreads;
        if (v >= packs) continue;
        PackT y;
#pragma unroll
        for (int i = 0; i < kVec; ++i) y.value[i] = store_acc<T>(sum[u][i]);
        destination[v] = y;
      }
    }
  }
}

constexpr int kProbWindow = 64;
constexpr int kBackwardWarps = kBackwardThreads / 32;

template <typename A>
__device__ __forceinline__ A warp_sum(A value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Backward that scales with the useful bytes. One block per token; warp 0
// reads the token's K indices (a window of kProbWindow at a time), checks the
// range, marks each named row in a bitmask (a row named twice fires the device
// assert and its second naming is not written through) and compacts the
// present rows in k order into shared memory. A token with no row here writes
// its grad_probs zeros and never reads its grad_out row. Otherwise the
// grad_out row is held in registers (kCached packs a thread a pass) and
// each present row gets grad_permuted[row] = w * grad_out[t]; with grad_probs,
// kRowsInFlight permuted rows are loaded together for the dots, each warp's
// partial in its own shared slot, summed over warps in a fixed order:
// deterministic. Rows no entry names are NOT written (see launch_backward).
template <typename T, typename P, typename IndexT, int kVec, int kRowsInFlight, int kMinBlocks, int kCached>
__global__ void __launch_bounds__(kBackwardThreads, kMinBlocks)
unpermute_backward_sparse_kernel(const T* __restrict__ grad_out, const T* __restrict__ permuted,
                                 int64_t num_rows, int64_t hidden_size, const IndexT* __restrict__ row_idx,
                                 const P* __restrict__ probs, int64_t topk, T* __restrict__ grad_permuted,
                                 P* __restrict__ grad_probs, uint32_t* __restrict__ named) {
  using A = typename Acc<T>::type;
  using PackT = Pack<T, kVec>;
  __shared__ A partial[kBackwardWarps][kProbWindow];
  __shared__ int64_t window_row[kProbWindow];  // present rows of the window, in k order
  __shared__ A window_weight[kProbWindow];
  __shared__ int window_slot[kProbWindow];     // k - window -> index into window_row, or -1
  __shared__ int window_rows;
  const int64_t token = blockIdx.x;
  const int64_t packs = hidden_size / kVec;
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int lane = static_cast<int>(threadIdx.x & 31);
  const PackT* __restrict__ gradient = reinterpret_cast<const PackT*>(grad_out) + token * packs;
  const int64_t pass_packs = static_cast<int64_t>(kBackwardThreads) * kCached;
  for (int64_t window = 0; window < topk; window += kProbWindow) {
    const int width = static_cast<int>(window + kProbWindow < topk ? kProbWindow : topk - window);
    __syncthreads();  // the previous window's shared state has been consumed
    if (warp == 0) {
      int count = 0;
      for (int c = 0; c < width; c += 32) {
        const int kk = c + lane;
        int64_t row = -1;
        A weight = A(1);
        if (kk < width) {
          const int64_t entry = token * topk + window + kk;
          const int64_t r = static_cast<int64_t>(row_idx[entry]);
          if (probs != nullptr) weight = static_cast<A>(to_acc(probs[entry]));
          const bool in_range = r >= -1 && r < num_rows;
          MOE_DEVICE_CHECK(in_range,
                           "moe_unpermute_backward: expanded_row_idx out of range [-1, rows of permuted)");
          if (in_range && r >= 0) {
            const uint32_t bit = 1u << static_cast<uint32_t>(r & 31);
            const uint32_t before = atomicOr(named + (r >> 5), bit);
            MOE_DEVICE_CHECK((before & bit) == 0, "moe_unpermute_backward: expanded_row_idx names a row twice");
            if ((before & bit) == 0) row = r;
          }
        }
        const unsigned present = __ballot_sync(0xffffffffu, row >= 0);
        const int j = count + __popc(present & ((1u << lane) - 1u));
        if (kk < width) window_slot[kk] = row >= 0 ? j : -1;
        if (row >= 0) {
          window_row[j] = row;
          window_weight[j] = weight;
        }
        count += __popc(present);
      }
      if (lane == 0) window_rows = count;
    }
    __syncthreads();
    const int n = window_rows;
    for (int64_t base = 0; n > 0 && base < packs; base += pass_packs) {
      PackT g[kCached];
#pragma unroll
      for (int u = 0; u < kCached; ++u) {
        const int64_t v = base + static_cast<int64_t>(u) * kBackwardThreads + threadIdx.x;
        if (v < packs) g[u] = gradient[v];
      }
      for (int j0 = 0; j0 < n; j0 += kRowsInFlight) {
        PackT xv[kRowsInFlight][kCached];
        if (grad_probs != nullptr) {
#pragma unroll
          for (int r = 0; r < kRowsInFlight; ++r) {
            if (j0 + r >= n) continue;
            const PackT* __restrict__ x = reinterpret_cast<const PackT*>(permuted) + window_row[j0 + r] * packs;
#pragma unroll
            for (int u = 0; u < kCached; ++u) {
              const int64_t v = base + static_cast<int64_t>(u) * kBackwardThreads + threadIdx.x;
              if (v < packs) xv[r][u] = x[v];
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRowsInFlight; ++r) {
          if (j0 + r >= n) continue;  // uniform over the block
          const A weight = window_weight[j0 + r];
          PackT* __restrict__ destination = reinterpret_cast<PackT*>(grad_permuted) + window_row[j0 + r] * packs;
          A dot = A(0);
#pragma unroll
          for (int u = 0; u < kCached; ++u) {
            const int64_t v = base + static_cast<int64_t>(u) * kBackwardThreads + threadIdx.x;
            if (v >= packs) continue;
            PackT o;
#pragma unroll
            for (int i = 0; i < kVec; ++i) o.value[i] = store_acc<T>(weight * static_cast<A>(to_acc(g[u].value[i])));
            destination[v] = o;
            if (grad_probs != nullptr) {
#pragma unroll
              for (int i = 0; i < kVec; ++i)
                dot += static_cast<A>(to_acc(g[u].value[i])) * static_cast<A>(to_acc(xv[r][u].value[i]));
            }
          }
          if (grad_probs != nullptr) {
            dot = warp_sum(dot);
            if (lane == 0) {
              A& slot = partial[warp][j0 + r];
              slot = base == 0 ? dot : slot + dot;
            }
          }
        }
      }
    }
    if (grad_probs == nullptr) continue;
    __syncthreads();
    for (int kk = static_cast<int>(threadIdx.x); kk < width; kk += kBackwardThreads) {
      const int j = window_slot[kk];
      A total = A(0);
      if (j >= 0)
        for (int w = 0; w < kBackwardWarps; ++w) total += partial[w][j];
      grad_probs[token * topk + window + kk] = to_prob<P>(total);
    }
  }
}

// Backward, large rows (issue 20 item 2): one tile of 32 / K tokens a block
// (K <= 32; one warp-wide load holds the tile's entries). Warp 0 loads the
// tile's indices with their weights, marks the named rows in the bitmask
// (atomicOr, its old value checked only at the end, so the atomic is not on
// the block's critical path) and compacts the present rows (token-major, k
// order) into shared memory. The work is then flattened over the tile: item q
// = pass i over row j (packs i * kThreads + thread), kItems items in flight a
// thread (a grad_out and a permuted 16-byte word each), so all rows of the tile
// move together whatever tokens they belong to, with no barrier between
// tokens; a block's chain is the index load, then its rows' loads. Each row
// gets grad_permuted[row] = w * grad_out[t]; each lane sums a row's dot in item
// order, each warp's total goes to its own shared slot (the item sequence is
// the same for every thread, so every warp visits every row), and warp 0 sums
// the slots in warp order: grad_probs are deterministic. A token with no row
// here never reads its grad_out row; rows no entry names are not written. An
// out-of-range index is never used; a row named twice is written by both
// namings (in bounds) and the device assert fires when the block ends.
// Measured on an H200 (bf16, T=8192 H=7168 K=8 E=256; issue 20): against the
// previous 4-token tile kernel (one token at a time, block barriers between),
// 1.13 / 1.12 / 1.15 / 1.15 / 1.33x the floor at EP 1 / 2 / 4 / 8 / 32 instead
// of 1.11 / 1.14 / 1.23 / 1.29 / 1.59x. A persistent grid that prefetched the
// next tile's indices was slower (1.17-1.71x: the block scheduler balances the
// uneven tiles better), and so were 128-thread blocks, 8 items a thread, and
// 4 blocks per SM (64 registers spill the atomic's result: it is then waited for).
template <typename T, typename P, typename IndexT, int kVec, int kItems, int kMinBlocks, int kThreads>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
unpermute_backward_flat_kernel(const T* __restrict__ grad_out, const T* __restrict__ permuted, int64_t num_rows,
                              int64_t hidden_size, const IndexT* __restrict__ row_idx, const P* __restrict__ probs,
                              int64_t num_tokens, int64_t topk, T* __restrict__ grad_permuted,
                              P* __restrict__ grad_probs, uint32_t* __restrict__ named) {
  using A = typename Acc<T>::type;
  using PackT = Pack<T, kVec>;
  constexpr int kWarps = kThreads / 32;
  __shared__ A partial[kWarps][kMaxTileTopk];
  __shared__ int64_t tile_offset[kMaxTileTopk];
  __shared__ int64_t tile_gradient[kMaxTileTopk];
  __shared__ A tile_weight[kMaxTileTopk];
  __shared__ int tile_slot[kMaxTileTopk];  // entry (lane of warp 0) -> row j, or -1
  __shared__ int tile_rows;
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int tile_tokens = static_cast<int>(kMaxTileTopk / topk);
  const int tile_entries = tile_tokens * static_cast<int>(topk);
  const int64_t tile = blockIdx.x;
  const int64_t packs = hidden_size / kVec;
  const int passes = static_cast<int>(ceil_div(packs, kThreads));
  static_assert(sizeof(PackT) == sizeof(uint4), "16-byte packs");
  const uint4* __restrict__ gradient = reinterpret_cast<const uint4*>(grad_out);
  const uint4* __restrict__ source = reinterpret_cast<const uint4*>(permuted);
  PackT* __restrict__ destination = reinterpret_cast<PackT*>(grad_permuted);
  auto as_pack = [](const uint4& word) {
    PackT pack;
    memcpy(&pack, &word, sizeof(pack));
    return pack;
  };

  bool in_range = true;
  uint32_t before = 0;
  uint32_t bit = 0;
  if (warp == 0) {
    const int64_t entry = tile * tile_entries + lane;
    int64_t row = -1;
    A weight = A(1);
    if (lane < tile_entries && entry < num_tokens * topk) {
      const int64_t r = static_cast<int64_t>(row_idx[entry]);
      if (probs != nullptr) weight = static_cast<A>(to_acc(probs[entry]));  // loaded with the index
      in_range = r >= -1 && r < num_rows;
      if (in_range && r >= 0) {
        row = r;
        bit = 1u << static_cast<uint32_t>(r & 31);
        before = atomicOr(named + (r >> 5), bit);  // checked at the end, not waited for here
      }
    }
    const unsigned present = __ballot_sync(0xffffffffu, row >= 0);
    const int j = __popc(present & ((1u << lane) - 1u));
    tile_slot[lane] = row >= 0 ? j : -1;
    if (row >= 0) {
      tile_offset[j] = row * packs;
      tile_gradient[j] = (tile * tile_tokens + lane / static_cast<int>(topk)) * packs;
      tile_weight[j] = weight;
    }
    if (lane == 0) tile_rows = __popc(present);
  }
  __syncthreads();
  const int items = tile_rows * passes;
  int j = 0;
  int i = 0;
  int current = -1;
  A dot = A(0);
  auto flush = [&]() {
    if (grad_probs == nullptr || current < 0) return;
    const A total = warp_sum(dot);
    if (lane == 0) partial[warp][current] = total;
  };
  for (int q = 0; q < items; q += kItems) {
    uint4 g[kItems];
    uint4 x[kItems];
    int item_row[kItems];
    int item_pass[kItems];
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      item_row[u] = q + u < items ? j : -1;
      item_pass[u] = i;
      g[u] = make_uint4(0, 0, 0, 0);
      x[u] = make_uint4(0, 0, 0, 0);
      const int64_t v = static_cast<int64_t>(i) * kThreads + threadIdx.x;
      if (item_row[u] >= 0 && v < packs) {
        g[u] = gradient[tile_gradient[j] + v];
        if (grad_probs != nullptr) x[u] = source[tile_offset[j] + v];
      }
      if (++i == passes) {
        i = 0;
        ++j;
      }
    }
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      if (item_row[u] < 0) continue;  // uniform over the block
      if (item_row[u] != current) {
        flush();
        current = item_row[u];
        dot = A(0);
      }
      const int64_t v = static_cast<int64_t>(item_pass[u]) * kThreads + threadIdx.x;
      if (v >= packs) continue;
      const A weight = tile_weight[current];
      const PackT gp = as_pack(g[u]);
      PackT o;
#pragma unroll
      for (int e = 0; e < kVec; ++e) o.value[e] = store_acc<T>(weight * static_cast<A>(to_acc(gp.value[e])));
      destination[tile_offset[current] + v] = o;
      if (grad_probs != nullptr) {
        const PackT xp = as_pack(x[u]);
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          dot += static_cast<A>(to_acc(gp.value[e])) * static_cast<A>(to_acc(xp.value[e]));
      }
    }
  }
  flush();
  __syncthreads();  // every warp's row totals are in
  if (warp == 0) {
    const int64_t entry = tile * tile_entries + lane;
    if (grad_probs != nullptr && lane < tile_entries && entry < num_tokens * topk) {
      const int slot = tile_slot[lane];
      A total = A(0);
      if (slot >= 0)
        for (int w = 0; w < kWarps; ++w) total += partial[w][slot];
      grad_probs[entry] = to_prob<P>(total);
    }
    MOE_DEVICE_CHECK(in_range, "moe_unpermute_backward: expanded_row_idx out of range [-1, rows of permuted)");
    MOE_DEVICE_CHECK((before & bit) == 0, "moe_unpermute_backward: expanded_row_idx names a row twice");
  }
}

// Zeroes the rows of out that the named-row bitmask does not mark (the padded
// layout of an aligned moe_permute: its pad rows sit inside grouped-GEMM groups).
template <int kBytes>
__global__ void __launch_bounds__(kBlockThreads)
zero_unmarked_rows_kernel(uint8_t* __restrict__ out, int64_t num_rows, int64_t vectors_per_row,
                          int threads_per_row_, const uint32_t* __restrict__ named) {
  using V = typename Unit<kBytes>::type;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / threads_per_row_) +
                    threadIdx.x / threads_per_row_;
  if (r >= num_rows || ((named[r >> 5] >> (r & 31)) & 1u) != 0) return;
  const int lane = static_cast<int>(threadIdx.x % threads_per_row_);
  V* __restrict__ row = reinterpret_cast<V*>(out) + r * vectors_per_row;
  const V zero{};
  for (int64_t v = lane; v < vectors_per_row; v += threads_per_row_) row[v] = zero;
}

cudaError_t launch_zero_unmarked_rows(void* out, int64_t num_rows, int64_t row_bytes, const uint32_t* named,
                                      cudaStream_t stream) {
  if (num_rows == 0 || row_bytes == 0) return cudaSuccess;
  const int unit = copy_unit_bytes(row_bytes, {out});
  const int64_t vectors = row_bytes / unit;
  const int threads = threads_per_row(vectors);
  const unsigned blocks = grid_for_rows(num_rows, threads);
  return dispatch_unit(unit, [&](auto unit_tag) {
    constexpr int kBytes = decltype(unit_tag)::value;
    zero_unmarked_rows_kernel<kBytes><<<blocks, kBlockThreads, 0, stream>>>(static_cast<uint8_t*>(out), num_rows,
                                                                            vectors, threads, named);
    return cudaGetLastError();
  });
}

template <typename T>
bool use_vectors(int64_t hidden_size, std::initializer_list<const void*> pointers) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  return hidden_size % kVec == 0 && copy_unit_bytes(hidden_size * static_cast<int64_t>(sizeof(T)), pointers) == 16;
}

template <typename T, typename P, typename IndexT>
cudaError_t launch_forward(const T* permuted, int64_t num_rows, int64_t hidden_size, const IndexT* row_idx,
                           const P* probs, int64_t num_tokens, int64_t topk, T* out, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  {
    // Measured on an H200 (bf16, docs/PERFORMANCE.md): rows of more than 512 packs (H=7168) run best
    // 4 tokens a block, 4 packs a thread, at >= 3 blocks per SM (1.05-1.15x the floor at EP 1-32);
    // rows of <= 512 packs (H=4096) 8 tokens a block, 2 packs a thread, at >= 4 blocks per SM (1.06x).
    // Two rows' loads in flight were slower than one (fewer blocks per SM).
    const int64_t row_packs = hidden_size / kVec;
    const bool wide = row_packs > 2 * kBlockThreads;
    const int tile = wide ? 4 : 8;
    if (tile_applies(use_vectors<T>(hidden_size, {permuted, out}), row_packs, topk, num_tokens, tile)) {
      const auto grid = static_cast<unsigned>(ceil_div(num_tokens, tile));
      if (wide) {
        unpermute_tile_kernel<T, P, IndexT, kVec, 4, 4, 1, 3><<<grid, kBlockThreads, 0, stream>>>(
            permuted, num_rows, hidden_size, row_idx, probs, num_tokens, topk, out);
      } else {
        unpermute_tile_kernel<T, P, IndexT, kVec, 8, 2, 1, 4><<<grid, kBlockThreads, 0, stream>>>(
            permuted, num_rows, hidden_size, row_idx, probs, num_tokens, topk, out);
      }
      return cudaGetLastError();
    }
    // Decode-sized grids (too few tiles for the kernels above) of >= kDecodeTileMinTokens tokens: the
    // tiled kernel one token a block (one index load, then the present rows, one at a time, 4 packs a
    // thread). Measured on an H200 (bf16, H=7168 K=8 E=256): T=256 EP 8 4.9 vs 7.6 µs for the row-split
    // kernel below (floor 3.5), EP 1 10.6 vs 13.0 (floor 9.8); two rows in flight were slower (5.2, 11.0).
    // At T=16 the row-split kernel stays: one token a block leaves most SMs idle and reads a token's K
    // rows one after another (EP 1: 6.8 vs 3.9 µs; EP 8: 2.9 vs 3.2).
    if (num_tokens >= kDecodeTileMinTokens && use_vectors<T>(hidden_size, {permuted, out}) &&
        row_packs >= kBlockThreads && topk >= 1 && topk <= kMaxTileTopk) {
      unpermute_tile_kernel<T, P, IndexT, kVec, 1, 4, 1, 3><<<static_cast<unsigned>(num_tokens), kBlockThreads, 0,
                                                             stream>>>(permuted, num_rows, hidden_size, row_idx,
                                                                       probs, num_tokens, topk, out);
      return cudaGetLastError();
    }
  }
  const bool vectors = use_vectors<T>(hidden_size, {permuted, out});
  const int64_t packs = vectors ? hidden_size / kVec : hidden_size;
  // A thread sums one pack at a time, with up to 4 of its K row loads in flight.
  const int threads = threads_per_row(packs);
  const unsigned token_blocks = grid_for_rows(num_tokens, threads);
  // Few tokens (decode): split each row over more blocks, down to one pack a thread.
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(packs, threads), kMinUnpermuteBlocks / static_cast<int64_t>(token_blocks)));
  const dim3 blocks(token_blocks, static_cast<unsigned>(chunks));
  auto run = [&](auto batch_tag, auto min_blocks_tag) {
    constexpr int kBatch = decltype(batch_tag)::value;
    constexpr int kMinBlocks = decltype(min_blocks_tag)::value;
    if (vectors) {
      unpermute_kernel<T, P, IndexT, kVec, kBatch, kHoistedRows, kMinBlocks><<<blocks, kBlockThreads, 0, stream>>>(
          permuted, num_rows, hidden_size, row_idx, probs, num_tokens, topk, threads, out);
    } else {
      unpermute_kernel<T, P, IndexT, 1, kBatch, kHoistedRows, kMinBlocks><<<blocks, kBlockThreads, 0, stream>>>(
          permuted, num_rows, hidden_size, row_idx, probs, num_tokens, topk, threads, out);
    }
  };
  // Measured on an H200 (bf16, H=7168, K=8; docs/PERFORMANCE.md): with many blocks, occupancy wins -
  // two row loads in flight and at least 4 blocks per SM (64 registers) beat eight loads in flight at
  // 2 blocks per SM by 1.1x (EP 1) to 5x (EP 32, where most tokens only write zeros). With a grid too
  // small to fill the GPU (decode), the wide batch hides the load latency better (T=16: 3.9 vs 5.2 µs).
  if (static_cast<int64_t>(blocks.x) * blocks.y < kSmallGridBlocks) {
    run(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{});
  } else {
    run(std::integral_constant<int, 2>{}, std::integral_constant<int, 4>{});
  }
  return cudaGetLastError();
}

template <typename T, typename P, typename IndexT>
cudaError_t launch_backward(const T* grad_out, const T* permuted, int64_t num_rows, int64_t hidden_size,
                            const IndexT* row_idx, const P* probs, int64_t num_tokens, int64_t topk,
                            T* grad_permuted, P* grad_probs, uint32_t* named, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vectors = use_vectors<T>(hidden_size, {grad_out, permuted, grad_permuted});
  // The flat kernel: 256 threads, 4 items a thread, >= 3 blocks per SM (72 registers, no spill); see
  // its comment for the measured alternatives. Small grids (decode), K > 32 and odd rows: one token a block.
  if (tile_applies(vectors, hidden_size / kVec, topk, num_tokens, 4) &&
      hidden_size / kVec < (int64_t{1} << 31)) {  // the flat kernel counts passes over a row in int
    constexpr int kThreads = 256;
    unpermute_backward_flat_kernel<T, P, IndexT, kVec, 4, 3, kThreads>
        <<<static_cast<unsigned>(ceil_div(num_tokens, kMaxTileTopk / topk)), kThreads, 0, stream>>>(
            grad_out, permuted, num_rows, hidden_size, row_idx, probs, num_tokens, topk, grad_permuted, grad_probs,
            named);
    return cudaGetLastError();
  }
  const auto blocks = static_cast<unsigned>(num_tokens);
  if (vectors) {
    unpermute_backward_sparse_kernel<T, P, IndexT, kVec, 1, 4, 2><<<blocks, kBackwardThreads, 0, stream>>>(
        grad_out, permuted, num_rows, hidden_size, row_idx, probs, topk, grad_permuted, grad_probs, named);
  } else {
    unpermute_backward_sparse_kernel<T, P, IndexT, 1, 1, 1, 4><<<blocks, kBackwardThreads, 0, stream>>>(
        grad_out, permuted, num_rows, hidden_size, row_idx, probs, topk, grad_permuted, grad_probs, named);
  }
  return cudaGetLastError();
}

// Calls fn(TypeTag<P>{}, TypeTag<IndexT>{}) for the probs type (float or T) and index type.
template <typename T, typename Fn>
cudaError_t dispatch_probs_and_index(bool probs_are_float32, bool index_is_int64, Fn&& fn) {
  if (probs_are_float32) {
    return index_is_int64 ? fn(TypeTag<float>{}, TypeTag<int64_t>{}) : fn(TypeTag<float>{}, TypeTag<int32_t>{});
  }
  return index_is_int64 ? fn(TypeTag<T>{}, TypeTag<int64_t>{}) : fn(TypeTag<T>{}, TypeTag<int32_t>{});
}

}  // namespace

cudaError_t launch_moe_unpermute(FloatType type, const void* permuted, int64_t num_rows,
                                 int64_t hidden_size, const void* row_idx, bool row_idx_is_int64,
                                 const void* probs, bool probs_are_float32, int64_t num_tokens,
                                 int64_t topk, void* out, cudaStream_t stream) {
  if (num_tokens == 0 || hidden_size == 0) return cudaSuccess;
  return dispatch_float(type, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    return dispatch_probs_and_index<T>(probs_are_float32, row_idx_is_int64, [&](auto probs_tag, auto index_tag) {
      using P = typename decltype(probs_tag)::type;
      using IndexT = typename decltype(index_tag)::type;
      return launch_forward(static_cast<const T*>(permuted), num_rows, hidden_size,
                            static_cast<const IndexT*>(row_idx), static_cast<const P*>(probs), num_tokens,
                            topk, static_cast<T*>(out), stream);
    });
  });
}

cudaError_t launch_moe_unpermute_backward(FloatType type, const void* grad_out, const void* permuted,
                                          int64_t num_rows, int64_t hidden_size, const void* row_idx,
                                          bool row_idx_is_int64, const void* probs,
                                          bool probs_are_float32, int64_t num_tokens, int64_t topk,
                                          void* grad_permuted, void* grad_probs, int32_t* inverse,
                                          cudaStream_t stream) {
  // `inverse` (int32 [num_rows]) holds the bitmask of named rows: ceil(num_rows / 32) words.
  if (num_rows > 0) {
    const cudaError_t status =
        cudaMemsetAsync(inverse, 0, static_cast<size_t>(named_words(num_rows)) * sizeof(uint32_t), stream);
    if (status != cudaSuccess) return status;
  }
  if (num_tokens > 0) {
    const cudaError_t status = dispatch_float(type, [&](auto type_tag) {
      using T = typename decltype(type_tag)::type;
      return dispatch_probs_and_index<T>(probs_are_float32, row_idx_is_int64, [&](auto probs_tag, auto index_tag) {
        using P = typename decltype(probs_tag)::type;
        using IndexT = typename decltype(index_tag)::type;
        return launch_backward(static_cast<const T*>(grad_out), static_cast<const T*>(permuted), num_rows,
                               hidden_size, static_cast<const IndexT*>(row_idx), static_cast<const P*>(probs),
                               num_tokens, topk, static_cast<T*>(grad_permuted), static_cast<P*>(grad_probs),
                               reinterpret_cast<uint32_t*>(inverse), stream);
      });
    });
    if (status != cudaSuccess) return status;
  }
  // Rows no entry names are left unwritten (the useful bytes only, see launchers.h), except in the
  // padded layout of an aligned moe_permute (more rows than entries), whose pad rows sit inside the
  // grouped GEMM's groups: zeros there.
  if (num_rows <= num_tokens * topk) return cudaSuccess;
  const int64_t element_bytes = type == FloatType::kFloat64 ? 8 : type == FloatType::kFloat32 ? 4 : 2;
  return launch_zero_unmarked_rows(grad_permuted, num_rows, hidden_size * element_bytes,
                                   reinterpret_cast<const uint32_t*>(inverse), stream);
}

}  // namespace moe_ext::cuda
