// Host-side launch decisions of the CUDA routing kernels, kept free of CUDA
// headers so that the C++ test suite checks them on any machine
// (tests/cpp/test_routing_geometry.cpp).
#pragma once

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

}  // namespace moe_ext::cuda::routing
