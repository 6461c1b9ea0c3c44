// Host-side launch decisions of the CUDA routing kernels (csrc/cuda/routing_geometry.h),
// checked without a GPU: which moe_unpermute kernel a shape gets, and the size of the
// backward's named-row bitmask.
#include <gtest/gtest.h>

#include <cstdint>

#include "cuda/routing_geometry.h"

namespace {

using moe_ext::cuda::routing::named_words;
using moe_ext::cuda::routing::tile_applies;

TEST(RoutingGeometry, TiledUnpermuteTakesLargeRowsAndEnoughTokens) {
  // T=8192 H=7168 bf16 (896 packs of 16 bytes), K=8: the benchmark's EP cases.
  EXPECT_TRUE(tile_applies(true, 896, 8, 8192, 8));
  // T=4096 H=4096 bf16, K=2.
  EXPECT_TRUE(tile_applies(true, 512, 2, 4096, 8));
  // Exactly 256 blocks of 8 tokens is enough, one token fewer is not (decode keeps the split kernel).
  EXPECT_TRUE(tile_applies(true, 896, 8, 256 * 8, 8));
  EXPECT_FALSE(tile_applies(true, 896, 8, 256 * 8 - 8, 8));
  EXPECT_FALSE(tile_applies(true, 896, 8, 256, 8));
  EXPECT_FALSE(tile_applies(true, 896, 8, 16, 8));
}

TEST(RoutingGeometry, TiledUnpermuteRefusesWhatItCannotHold) {
  EXPECT_FALSE(tile_applies(false, 896, 8, 8192, 8));  // no 16-byte packs (odd size or alignment)
  EXPECT_FALSE(tile_applies(true, 255, 8, 8192, 8));   // fewer packs than threads
  EXPECT_TRUE(tile_applies(true, 256, 8, 8192, 8));
  EXPECT_FALSE(tile_applies(true, 896, 33, 8192, 8));  // K above one warp
  EXPECT_TRUE(tile_applies(true, 896, 32, 8192, 8));
  EXPECT_FALSE(tile_applies(true, 896, 0, 8192, 8));
  EXPECT_FALSE(tile_applies(true, 896, 8, 8192, 9));   // more tokens than warps in a block
  EXPECT_FALSE(tile_applies(true, 896, 8, 8192, 0));
  // Huge token counts do not overflow the block count.
  EXPECT_TRUE(tile_applies(true, 896, 8, int64_t{1} << 40, 8));
}

TEST(RoutingGeometry, NamedRowBitmaskFitsTheInt32Scratch) {
  EXPECT_EQ(named_words(0), 0);
  EXPECT_EQ(named_words(1), 1);
  EXPECT_EQ(named_words(32), 1);
  EXPECT_EQ(named_words(33), 2);
  EXPECT_EQ(named_words(65536), 2048);
  // The scratch is int32 [num_rows]: one word per row, so the bitmask always fits.
  for (int64_t rows : {int64_t{1}, int64_t{31}, int64_t{1000}, int64_t{1} << 31}) {
    EXPECT_LE(named_words(rows), rows);
  }
}

}  // namespace
