// Host-side launch decisions of the CUDA routing kernels, kept free of CUDA
// headers so that the C++ test suite checks them on any machine
// (tests/cpp/test_routing_geometry.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

namespace moe_ext::cuda::routing {

// Threads of one block and the widest K the tiled unpermute handles (one warp
// reads a token's K indices in one step).
constexpr int kGeometryBlockThreads = 256;
constexpr int64_t kTileMaxTopk = 32;
// The tiled unpermute needs enough blocks to fill the GPU (about two per SM of
// an H100/H200); smaller grids (decode) keep the row-split kernel.
constexpr int64_t kTileMinBlocks = 256;

// Whether moe_unpermute's tiled kernel (a whole block per token, `tile` tokens
// per block) applies: 16-byte packs, a row of at least one pack per thread,
// K <= 32, and a grid of at least kTileMinBlocks blocks.
inline bool tile_applies(bool vectors, int64_t packs_per_row, int64_t topk, int64_t num_tokens, int tile) {
  if (!vectors || tile < 1 || tile > kGeometryBlockThreads / 32) return false;
  if (topk < 1 || topk > kTileMaxTopk || packs_per_row < kGeometryBlockThreads) return false;
  return (num_tokens + tile - 1) / tile >= kTileMinBlocks;
}

// 32-bit words of the named-row bitmask of moe_unpermute's backward (one bit a
// row); it lives in the op's int32 [num_rows] scratch, which always has room.
inline int64_t named_words(int64_t num_rows) { return num_rows <= 0 ? 0 : (num_rows + 31) / 32; }

// ------------------------------------------------------- one-launch permute
// csrc/cuda/routing_permute_onepass.cu: count -> grid barrier -> scan -> place
// and copy, in one cooperative launch. The routed rows are cut into `slices`
// of `rows_per_slice` rows; block s counts slice s (8 warps, each a run of
// whole 32-row steps, at most kOnepassMaxSteps of them kept in registers) and
// writes one column of the [range][slices] count table. After the barrier
// EVERY block scans the whole table in shared memory (so no second barrier),
// which is why the table is kept small: about kOnepassTargetTable entries,
// more only when the rows need more slices, never above kOnepassMaxTable.
constexpr int64_t kOnepassMaxRange = 1024;     // 8 warps x range int32 counters <= 32 KiB
constexpr int64_t kOnepassSliceUnit = 256;     // rows one block counts per 32-row step (8 warps)
constexpr int64_t kOnepassMaxSteps = 16;       // 32-row steps a warp keeps in registers
constexpr int64_t kOnepassTargetTable = 2048;  // 8 KiB of table per block and grid barrier
constexpr int64_t kOnepassMaxTable = 8192;     // 32 KiB (T=8192 K=8 E=256 without EP needs 4096)

struct OnepassPlan {
  bool applies = false;
  int64_t slices = 0;
  int64_t rows_per_slice = 0;  // a multiple of kOnepassSliceUnit, <= kOnepassSliceUnit * kOnepassMaxSteps
};

// Whether `rows` routed rows over `range` local experts fit the one-launch
// permute, and its slicing. Outside it (more experts, or so many rows that the
// table would not fit) the permute keeps its multi-launch index.
// K <= 32: one warp reads a token's K positions in one step.
inline OnepassPlan onepass_plan(int64_t rows, int64_t range, int64_t topk) {
  OnepassPlan plan;
  if (rows <= 0 || range < 1 || range > kOnepassMaxRange || topk < 1 || topk > 32) return plan;
  const int64_t max_slice_rows = kOnepassSliceUnit * kOnepassMaxSteps;
  const int64_t fewest = (rows + max_slice_rows - 1) / max_slice_rows;
  const int64_t most = (rows + kOnepassSliceUnit - 1) / kOnepassSliceUnit;
  const int64_t target = std::max<int64_t>(1, kOnepassTargetTable / range);
  int64_t slices = std::max(fewest, std::min(most, target));
  if (slices * range > kOnepassMaxTable) return plan;
  const int64_t per_slice = (rows + slices - 1) / slices;
  plan.rows_per_slice = (per_slice + kOnepassSliceUnit - 1) / kOnepassSliceUnit * kOnepassSliceUnit;
  plan.slices = (rows + plan.rows_per_slice - 1) / plan.rows_per_slice;
  plan.applies = true;
  return plan;
}

// Which permute kernels a shape gets, from two H200 runs of both paths on the
// same inputs (docs: the i20p report, issue 20):
// - the plain op: the fused decode kernel up to kFusedDecodeOnlyRows routed
//   rows (T=16 K=8: 6.1 vs 8.6 µs one-launch); the one-launch permute up to
//   kOnepassPlainMaxRows (T=256 K=8: 15.3 vs 19.9 µs without EP, 9.2 vs 9.4 at
//   EP 8); the multi-launch path above (T=8192 K=8: 309.7 vs 322.9 µs without
//   EP, 24.1 vs 25.6 at EP 32 - the one-launch copy phase, 4 resident blocks an
//   SM, is slower than the token-per-block copy and its index is no cheaper);
// - the padded op (alignment and/or scales): the one-launch permute up to
//   kOnepassPaddedAlwaysRows rows (T=256 fp8 A=128 EP 8: 15.8-17.3 vs 28.9 µs)
//   and whenever at most 1/kOnepassPaddedMinEp of the experts are local
//   (T=8192 EP 8: aligned 75.4 vs 88.0, fp8 44.7 vs 50.6, fp8 A=128 48.9 vs
//   60.1 µs); without EP at T=8192 the multi-launch path (388.2 vs 395.1).
constexpr int64_t kFusedDecodeOnlyRows = 1024;
constexpr int64_t kOnepassPlainMaxRows = 2048;
constexpr int64_t kOnepassPaddedAlwaysRows = 8192;
constexpr int64_t kOnepassPaddedMinEp = 8;

inline bool onepass_preferred(int64_t rows, int64_t range, int64_t num_experts, bool padded) {
  if (!padded) return rows > kFusedDecodeOnlyRows && rows <= kOnepassPlainMaxRows;
  return rows <= kOnepassPaddedAlwaysRows || range * kOnepassPaddedMinEp <= num_experts;
}

}  // namespace moe_ext::cuda::routing
