// Host tiling of the AscendC kernels (csrc/core/ascend/tiling.h): coverage,
// balance, UB fit and 32-byte rounding on many shapes, and refusals.
#include <gtest/gtest.h>

#include <random>
#include <stdexcept>

#include "core/ascend/tiling.h"

namespace ascend = moe_ext::core::ascend;

namespace {

void expect_partition(const ascend::BlockSplit& split, int64_t items) {
  ASSERT_GE(split.blocks, 1);
  EXPECT_EQ(split.start(0), 0);
  EXPECT_EQ(split.end(split.blocks - 1), items);
  for (int64_t b = 0; b < split.blocks; ++b) {
    const int64_t size = split.end(b) - split.start(b);
    EXPECT_TRUE(size == split.base || size == split.base + 1) << "block " << b;
    if (b > 0) {
      EXPECT_EQ(split.start(b), split.end(b - 1));
    }
  }
}

}  // namespace

TEST(AscendTiling, SplitCoversEveryItemOnceAndBalances) {
  for (int64_t items : {0, 1, 7, 40, 41, 1000, 65536 + 3}) {
    for (int64_t cores : {1, 2, 20, 40, 48}) {
      const auto split = ascend::split_over_cores(items, cores, 1);
      expect_partition(split, items);
      EXPECT_LE(split.blocks, cores);
      if (items >= cores) {
        EXPECT_EQ(split.blocks, cores);
      }
    }
  }
  // small launches stay on few cores
  EXPECT_EQ(ascend::split_over_cores(100, 40, 64).blocks, 2);
  EXPECT_EQ(ascend::split_over_cores(0, 40, 64).blocks, 1);
}

TEST(AscendTiling, RowTilesFitTheUnifiedBufferAndAre32ByteAligned) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 500; ++trial) {
    const int64_t rows = static_cast<int64_t>(rng() % 20000);
    const int64_t row_bytes = 1 + static_cast<int64_t>(rng() % 20000);
    const int64_t scratch = (rng() % 2) ? row_bytes * 2 : 0;
    const int64_t queues = 1 + static_cast<int64_t>(rng() % 2);
    const int64_t ub = ascend::ub_round_up(64 * 1024 + static_cast<int64_t>(rng() % (192 * 1024)));
    const int64_t need = ascend::ub_round_up(row_bytes) * queues * 2 + ascend::ub_round_up(scratch);
    if (need > ub) {
      EXPECT_THROW(ascend::plan_row_tiling(rows, row_bytes, scratch, queues, 2, 40, ub), std::invalid_argument);
      continue;
    }
    const auto tiling = ascend::plan_row_tiling(rows, row_bytes, scratch, queues, 2, 40, ub);
    expect_partition(tiling.split, rows);
    EXPECT_EQ(tiling.row_stride_ub % 32, 0);
    EXPECT_GE(tiling.row_stride_ub, row_bytes);
    EXPECT_LT(tiling.row_stride_ub - row_bytes, 32);
    EXPECT_GE(tiling.rows_per_tile, 1);
    EXPECT_LE(tiling.ub_bytes_used, ub);
    EXPECT_LE(tiling.rows_per_tile, std::max<int64_t>(1, tiling.split.base + 1));
  }
}

TEST(AscendTiling, StreamTilesAreWhole32ByteUnits) {
  for (int64_t count : {0, 1, 9, 64, 1000, 1 << 20}) {
    for (int64_t element_bytes : {4, 8}) {
      for (int64_t fixed : {0, 8 * 256, 8 * 4096}) {
        const auto tiling = ascend::plan_stream_tiling(count, element_bytes, fixed, 2, 40, 192 * 1024);
        expect_partition(tiling.split, count);
        EXPECT_GT(tiling.elements_per_tile, 0);
        EXPECT_EQ(tiling.elements_per_tile * element_bytes % 32, 0);
        EXPECT_LE(tiling.ub_bytes_used, 192 * 1024);
      }
    }
  }
}

TEST(AscendTiling, RefusesWhatCannotBeTiled) {
  EXPECT_THROW(ascend::plan_row_tiling(10, 0, 0, 1, 2, 40, 1024), std::invalid_argument);
  EXPECT_THROW(ascend::plan_row_tiling(-1, 4, 0, 1, 2, 40, 1024), std::invalid_argument);
  EXPECT_THROW(ascend::plan_row_tiling(10, 4, 0, 1, 9, 40, 1024), std::invalid_argument);
  EXPECT_THROW(ascend::plan_row_tiling(10, int64_t(1) << 62, 0, 4, 8, 40, 1024), std::invalid_argument);
  EXPECT_THROW(ascend::plan_stream_tiling(10, 3, 0, 2, 40, 1024), std::invalid_argument);
  EXPECT_THROW(ascend::plan_stream_tiling(10, 8, 8 * 200000, 2, 40, 192 * 1024), std::invalid_argument);
  EXPECT_THROW(ascend::split_over_cores(10, 0, 1), std::invalid_argument);
}
