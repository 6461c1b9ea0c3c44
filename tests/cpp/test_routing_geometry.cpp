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

namespace {

using moe_ext::cuda::routing::kOnepassMaxSteps;
using moe_ext::cuda::routing::kOnepassMaxTable;
using moe_ext::cuda::routing::kOnepassSliceUnit;
using moe_ext::cuda::routing::onepass_plan;

TEST(RoutingGeometry, OnepassPlanCoversTheBenchmarkCases) {
  // T=8192 K=8: EP 1 (256 experts) needs 16 slices of 4096 rows (the rows a slice can hold).
  auto plan = onepass_plan(65536, 256, 8);
  ASSERT_TRUE(plan.applies);
  EXPECT_EQ(plan.slices, 16);
  EXPECT_EQ(plan.rows_per_slice, 4096);
  // EP 8 (32 experts): 64 slices, a 2048-entry table; EP 32 (8): 256 slices of 256 rows.
  plan = onepass_plan(65536, 32, 8);
  EXPECT_TRUE(plan.applies);
  EXPECT_EQ(plan.slices * 32, 2048);
  plan = onepass_plan(65536, 8, 8);
  EXPECT_EQ(plan.slices, 256);
  EXPECT_EQ(plan.rows_per_slice, 256);
  // T=4096 K=2 E=64: 32 slices of 256 rows.
  plan = onepass_plan(8192, 64, 2);
  EXPECT_EQ(plan.slices, 32);
  // Decode: one slice.
  plan = onepass_plan(128, 256, 8);
  EXPECT_TRUE(plan.applies);
  EXPECT_EQ(plan.slices, 1);
}

TEST(RoutingGeometry, OnepassPlanSlicesCoverEveryRowWithinTheLimits) {
  for (int64_t rows : {1, 31, 255, 256, 257, 2047, 2048, 2049, 4097, 9003, 65536, 160000, 1120000, 2400000}) {
    for (int64_t range : {1, 3, 8, 64, 256, 1000, 1024}) {
      const auto plan = onepass_plan(rows, range, 8);
      if (!plan.applies) {
        // Only a table past the limit refuses a range up to 1024.
        EXPECT_GT((rows + kOnepassSliceUnit * kOnepassMaxSteps - 1) / (kOnepassSliceUnit * kOnepassMaxSteps) * range,
                  kOnepassMaxTable) << rows << " " << range;
        continue;
      }
      EXPECT_EQ(plan.rows_per_slice % kOnepassSliceUnit, 0);
      EXPECT_LE(plan.rows_per_slice, kOnepassSliceUnit * kOnepassMaxSteps);
      EXPECT_GE(plan.slices * plan.rows_per_slice, rows);
      EXPECT_LT((plan.slices - 1) * plan.rows_per_slice, rows);  // no empty slice
      EXPECT_LE(plan.slices * range, kOnepassMaxTable);
    }
  }
}

TEST(RoutingGeometry, OnepassPlanRefusesWhatItCannotHold) {
  EXPECT_FALSE(onepass_plan(0, 8, 8).applies);
  EXPECT_FALSE(onepass_plan(4096, 0, 8).applies);
  EXPECT_FALSE(onepass_plan(4096, 1025, 8).applies);  // counters: 8 warps x 1024 experts
  EXPECT_FALSE(onepass_plan(4096, 8, 33).applies);    // one warp reads a token's K positions
  EXPECT_TRUE(onepass_plan(4096, 8, 32).applies);
  EXPECT_FALSE(onepass_plan(640000, 64, 8).applies);  // 157 slices x 64 experts > the table
  EXPECT_TRUE(onepass_plan(320000, 64, 8).applies);   // 79 slices
}

}  // namespace

namespace {

using moe_ext::cuda::routing::onepass_preferred;

TEST(RoutingGeometry, OnepassTakesTheShapesWhereItWasMeasuredFaster) {
  // Plain op: decode T=16 K=8 keeps the fused kernel, T=256 K=8 goes one-launch, T=8192 multi-launch.
  EXPECT_FALSE(onepass_preferred(128, 256, 256, false));
  EXPECT_FALSE(onepass_preferred(1024, 256, 256, false));
  EXPECT_TRUE(onepass_preferred(2048, 256, 256, false));
  EXPECT_TRUE(onepass_preferred(2048, 32, 256, false));
  EXPECT_FALSE(onepass_preferred(2049, 32, 256, false));
  EXPECT_FALSE(onepass_preferred(65536, 8, 256, false));
  // Padded op: decode always, T=8192 K=8 at EP 8 and above, not without EP (nor EP 2 / 4: not measured).
  EXPECT_TRUE(onepass_preferred(2048, 32, 256, true));
  EXPECT_TRUE(onepass_preferred(128, 256, 256, true));
  EXPECT_TRUE(onepass_preferred(65536, 32, 256, true));
  EXPECT_TRUE(onepass_preferred(65536, 8, 256, true));
  EXPECT_FALSE(onepass_preferred(65536, 256, 256, true));
  EXPECT_FALSE(onepass_preferred(65536, 64, 256, true));
}

}  // namespace
