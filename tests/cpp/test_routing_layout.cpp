// GoogleTest suite of the routing index maths (core/routing_layout.h): the
// contract on a hand-worked case and against a brute-force stable sort.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <stdexcept>
#include <limits>
#include <utility>
#include <vector>

#include "core/routing_layout.h"

namespace {

using moe_ext::core::build_inverse_index;
using moe_ext::core::build_routing_layout;
using moe_ext::core::expert_histogram;

struct Layout {
  std::vector<int32_t> row_idx;
  std::vector<int64_t> tokens;
  int64_t valid = 0;
};

Layout run(const std::vector<int32_t>& ids, int64_t topk, int64_t experts, const int32_t* map,
           int64_t start, int64_t end, bool cumulative = false) {
  Layout out;
  out.row_idx.assign(ids.size(), 12345);
  out.tokens.assign(static_cast<size_t>(end - start), 12345);
  out.valid = build_routing_layout(ids.data(), static_cast<int64_t>(ids.size()) / topk, topk, experts,
                                   map, start, end, cumulative, out.row_idx.data(), out.tokens.data());
  return out;
}

TEST(RoutingLayout, HandWorkedExample) {
  // T=3, K=2; active experts [1, 3).
  const Layout got = run({2, 1, 1, 3, 2, 0}, 2, 4, nullptr, 1, 3);
  EXPECT_EQ(got.row_idx, (std::vector<int32_t>{2, 0, 1, -1, 3, -1}));
  EXPECT_EQ(got.tokens, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(got.valid, 4);
  EXPECT_EQ(run({2, 1, 1, 3, 2, 0}, 2, 4, nullptr, 1, 3, true).tokens, (std::vector<int64_t>{2, 4}));
}

TEST(RoutingLayout, ExpertMapDropsMinusOne) {
  const std::vector<int32_t> map = {-1, 1, 0, -1};
  const Layout got = run({0, 1, 2, 3, 1, 2}, 2, 4, map.data(), 0, 2);
  // keys: -1, 1, 0, -1, 1, 0 -> local 0 rows f=2,5; local 1 rows f=1,4
  EXPECT_EQ(got.row_idx, (std::vector<int32_t>{-1, 2, 0, -1, 3, 1}));
  EXPECT_EQ(got.tokens, (std::vector<int64_t>{2, 2}));
}

TEST(RoutingLayout, MatchesStableSortOnRandomInputs) {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t tokens = rng() % 50, topk = 1 + rng() % 8, experts = 1 + rng() % 40;
    const int64_t start = rng() % (experts + 1), end = start + rng() % (experts - start + 1);
    std::vector<int32_t> ids(static_cast<size_t>(tokens * topk));
    for (auto& id : ids) id = static_cast<int32_t>(rng() % experts);
    const Layout got = run(ids, topk, experts, nullptr, start, end);
    std::vector<int64_t> order(ids.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
    std::vector<int32_t> want(ids.size(), -1);
    int32_t position = 0;
    for (int64_t f : order)
      if (ids[f] >= start && ids[f] < end) want[f] = position++;
    EXPECT_EQ(got.row_idx, want);
    EXPECT_EQ(got.valid, position);
  }
}

TEST(RoutingLayout, RefusesBadIdsBeforeWriting) {
  std::vector<int32_t> ids = {0, 5};
  std::vector<int32_t> row_idx(2, 7);
  std::vector<int64_t> tokens(4, 7);
  EXPECT_THROW((build_routing_layout<int32_t, int32_t>)(ids.data(), 1, 2, 4, nullptr, 0, 4, false,
                                                      row_idx.data(), tokens.data()),
               std::invalid_argument);
  EXPECT_EQ(row_idx, (std::vector<int32_t>{7, 7}));
  EXPECT_EQ(tokens, (std::vector<int64_t>{7, 7, 7, 7}));
  EXPECT_THROW((build_routing_layout<int32_t, int32_t>)(ids.data(), 1, 2, 8, nullptr, 3, 9, false,
                                                      row_idx.data(), tokens.data()),
               std::invalid_argument);
}

// -1 in topk_ids is "no expert": dropped like a map's -1, not counted.
TEST(RoutingLayout, MinusOneIdIsDropped) {
  std::vector<int64_t> ids = {2, -1, -1, 0, 2, 1};
  std::vector<int32_t> row_idx(6, 7);
  std::vector<int64_t> tokens(3, 7);
  const int64_t valid = build_routing_layout<int64_t, int32_t>(ids.data(), 3, 2, 3, nullptr, 0, 3, false,
                                                               row_idx.data(), tokens.data());
  EXPECT_EQ(valid, 4);
  EXPECT_EQ(row_idx, (std::vector<int32_t>{2, -1, -1, 0, 3, 1}));
  EXPECT_EQ(tokens, (std::vector<int64_t>{1, 1, 2}));
  // Through a map too: -1 never indexes the map.
  const std::vector<int64_t> map = {1, -1, 0};
  const int64_t mapped = build_routing_layout<int64_t, int64_t>(ids.data(), 3, 2, 3, map.data(), 0, 2,
                                                                false, row_idx.data(), tokens.data());
  EXPECT_EQ(mapped, 3);
  EXPECT_EQ(row_idx, (std::vector<int32_t>{0, -1, -1, 2, 1, -1}));
}

// Map values far outside the key space (the key - start overflow of issue 15)
// are refused before anything is written, whatever the active range.
TEST(RoutingLayout, RefusesCorruptMapValuesWithoutOverflow) {
  const int64_t lowest = std::numeric_limits<int64_t>::min();
  std::vector<int64_t> ids = {0, 1, 1, 0, 1};
  std::vector<int32_t> row_idx(5, 7);
  std::vector<int64_t> tokens(3, 7);
  for (const std::vector<int64_t>& map : {std::vector<int64_t>{lowest, 0},
                                          std::vector<int64_t>{std::numeric_limits<int64_t>::max(), 0},
                                          std::vector<int64_t>{-2, 0}, std::vector<int64_t>{0, 2}}) {
    for (auto [start, end] : {std::pair<int64_t, int64_t>{2, 2}, {1, 2}, {0, 2}}) {
      EXPECT_THROW((build_routing_layout<int64_t, int64_t>)(ids.data(), 5, 1, 2, map.data(), start, end,
                                                            false, row_idx.data(), tokens.data()),
                   std::invalid_argument);
      EXPECT_EQ(row_idx, (std::vector<int32_t>(5, 7)));
    }
  }
  // An unreferenced corrupt entry is never read, so it is not refused.
  const std::vector<int64_t> map = {lowest, 0};
  std::vector<int64_t> only_one = {1, 1};
  EXPECT_EQ((build_routing_layout<int64_t, int64_t>)(only_one.data(), 2, 1, 2, map.data(), 0, 1, false,
                                                     row_idx.data(), tokens.data()),
            2);
}

TEST(RoutingLayout, HistogramAndInverse) {
  std::vector<int64_t> ids = {3, 0, 3, 2};
  std::vector<int64_t> counts(4);
  expert_histogram(ids.data(), 4, 4, counts.data());
  EXPECT_EQ(counts, (std::vector<int64_t>{1, 0, 1, 2}));
  std::vector<int64_t> padded = {3, -1, 7, 0};  // outside [0, 4): not counted
  expert_histogram(padded.data(), 4, 4, counts.data());
  EXPECT_EQ(counts, (std::vector<int64_t>{1, 0, 0, 1}));

  std::vector<int32_t> indices = {2, -1, 0};
  std::vector<int64_t> inverse(4);
  build_inverse_index(indices.data(), 3, 4, "op", "indices", inverse.data());
  EXPECT_EQ(inverse, (std::vector<int64_t>{2, -1, 0, -1}));
  std::vector<int32_t> repeated = {1, 1};
  EXPECT_THROW(build_inverse_index(repeated.data(), 2, 4, "op", "indices", inverse.data()),
               std::invalid_argument);
  std::vector<int32_t> outside = {4};
  EXPECT_THROW(build_inverse_index(outside.data(), 1, 4, "op", "indices", inverse.data()),
               std::invalid_argument);
}

}  // namespace

namespace {

struct PaddedLayout {
  std::vector<int32_t> row_idx;
  std::vector<int64_t> padded, counts, starts;
  int64_t total = 0;
};

PaddedLayout run_padded(const std::vector<int32_t>& ids, int64_t topk, int64_t experts, int64_t start,
                        int64_t end, int64_t alignment, bool cumulative = false) {
  PaddedLayout out;
  out.row_idx.assign(ids.size(), 12345);
  out.padded.assign(static_cast<size_t>(end - start), 12345);
  out.counts.assign(static_cast<size_t>(end - start), 12345);
  out.starts.assign(static_cast<size_t>(end - start) + 1, 12345);
  out.total = moe_ext::core::build_padded_routing_layout<int32_t, int32_t>(
      ids.data(), static_cast<int64_t>(ids.size()) / topk, topk, experts, nullptr, start, end, alignment,
      cumulative, out.row_idx.data(), out.padded.data(), out.counts.data(), out.starts.data());
  return out;
}

}  // namespace

TEST(RoutingLayout, PaddedHandWorkedExample) {
  // T=4, K=2, ids 0 1 | 1 -1 | 0 3 | 0 -1; A = 4: counts 3 2 0 1 -> blocks 4 4 0 4 at 0 4 8 8.
  const PaddedLayout got = run_padded({0, 1, 1, -1, 0, 3, 0, -1}, 2, 4, 0, 4, 4);
  EXPECT_EQ(got.row_idx, (std::vector<int32_t>{0, 4, 5, -1, 1, 8, 2, -1}));
  EXPECT_EQ(got.padded, (std::vector<int64_t>{4, 4, 0, 4}));
  EXPECT_EQ(got.counts, (std::vector<int64_t>{3, 2, 0, 1}));
  EXPECT_EQ(got.starts, (std::vector<int64_t>{0, 4, 8, 8, 12}));
  EXPECT_EQ(got.total, 12);
  const PaddedLayout cumulative = run_padded({0, 1, 1, -1, 0, 3, 0, -1}, 2, 4, 0, 4, 4, true);
  EXPECT_EQ(cumulative.padded, (std::vector<int64_t>{4, 8, 8, 12}));
  EXPECT_EQ(cumulative.counts, (std::vector<int64_t>{3, 5, 5, 6}));
}

TEST(RoutingLayout, PaddedWithAlignmentOneIsTheUnpaddedLayout) {
  std::mt19937 rng(5);
  std::vector<int32_t> ids(600);
  for (auto& id : ids) id = static_cast<int32_t>(rng() % 33) - 1;  // -1 .. 31
  const Layout plain = run(ids, 4, 32, nullptr, 3, 29);
  const PaddedLayout padded = run_padded(ids, 4, 32, 3, 29, 1);
  EXPECT_EQ(plain.row_idx, padded.row_idx);
  EXPECT_EQ(plain.tokens, padded.padded);
  EXPECT_EQ(plain.tokens, padded.counts);
  EXPECT_EQ(plain.valid, padded.total);
  // Any alignment: each block starts at a multiple of A, rows keep their order within it.
  const PaddedLayout aligned = run_padded(ids, 4, 32, 3, 29, 16);
  for (size_t f = 0; f < ids.size(); ++f) {
    if (plain.row_idx[f] < 0) { EXPECT_EQ(aligned.row_idx[f], -1); continue; }
    const int64_t e = ids[f] - 3;
    EXPECT_EQ(aligned.starts[static_cast<size_t>(e)] % 16, 0);
    EXPECT_GE(aligned.row_idx[f], aligned.starts[static_cast<size_t>(e)]);
    EXPECT_LT(aligned.row_idx[f], aligned.starts[static_cast<size_t>(e)] + aligned.counts[static_cast<size_t>(e)]);
  }
  EXPECT_LE(aligned.total, 600 + 26 * 15);
}

TEST(RoutingLayout, PaddedBoundRefusesOverflow) {
  EXPECT_EQ(moe_ext::core::padded_rows_bound(10, 8, 256, 128), 80 + 256 * 127);
  EXPECT_THROW(moe_ext::core::padded_rows_bound(10, 8, 1024, (int64_t{1} << 21) + 1), std::invalid_argument);
  EXPECT_THROW(moe_ext::core::padded_rows_bound(10, 8, 4, 0), std::invalid_argument);
  EXPECT_EQ(moe_ext::core::padded_rows_bound(int64_t{1} << 28, 8, 0, 1 << 30), int64_t{1} << 31);
}
