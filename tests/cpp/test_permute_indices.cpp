// GoogleTest suite of core::generate_permute_indices: the contract on hand-worked
// cases, the edge cases of the issue, and a brute-force check on random inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/permute_indices.h"

namespace {

using moe_ext::core::generate_permute_indices;

struct Layout {
  std::vector<int32_t> permuted_indices, m_sizes, m_offsets;
};

Layout run(const std::vector<int64_t>& counts, int64_t experts_per_rank, int64_t num_ranks,
           int64_t max_len, int64_t alignment) {
  Layout out;
  out.permuted_indices.assign(static_cast<size_t>(max_len), 12345);  // poison: every slot must be written
  out.m_sizes.assign(static_cast<size_t>(experts_per_rank), 12345);
  out.m_offsets.assign(static_cast<size_t>(experts_per_rank), 12345);
  generate_permute_indices(counts.data(), experts_per_rank, num_ranks, max_len, alignment,
                           out.permuted_indices.data(), out.m_sizes.data(), out.m_offsets.data());
  return out;
}

// Straight from the contract, written differently from the implementation:
// list each expert's arriving rows, then pad.
Layout reference(const std::vector<int64_t>& counts, int64_t experts_per_rank, int64_t num_ranks,
                 int64_t max_len, int64_t alignment) {
  std::vector<std::vector<int32_t>> rows_of_expert(static_cast<size_t>(experts_per_rank));
  int32_t arriving = 0;
  for (int64_t r = 0; r < num_ranks; ++r)
    for (int64_t e = 0; e < experts_per_rank; ++e)
      for (int64_t j = 0; j < counts[static_cast<size_t>(r * experts_per_rank + e)]; ++j)
        rows_of_expert[static_cast<size_t>(e)].push_back(arriving++);
  Layout out;
  for (auto& rows : rows_of_expert) {
    int64_t size = std::max<int64_t>(static_cast<int64_t>(rows.size()), alignment);
    size = (size + alignment - 1) / alignment * alignment;
    out.permuted_indices.insert(out.permuted_indices.end(), rows.begin(), rows.end());
    out.permuted_indices.resize(out.permuted_indices.size() + static_cast<size_t>(size) - rows.size(), -1);
    out.m_sizes.push_back(static_cast<int32_t>(size));
    out.m_offsets.push_back(static_cast<int32_t>(out.permuted_indices.size()));
  }
  out.permuted_indices.resize(static_cast<size_t>(max_len), -1);
  return out;
}

void expect_matches_reference(const std::vector<int64_t>& counts, int64_t epr, int64_t ranks,
                              int64_t max_len, int64_t alignment) {
  const Layout got = run(counts, epr, ranks, max_len, alignment);
  const Layout want = reference(counts, epr, ranks, max_len, alignment);
  EXPECT_EQ(got.permuted_indices, want.permuted_indices);
  EXPECT_EQ(got.m_sizes, want.m_sizes);
  EXPECT_EQ(got.m_offsets, want.m_offsets);
}

TEST(PermuteIndices, HandWorkedTwoRanksFourExperts) {
  // rank 0 sends 4,2,1,3 to experts 0..3; rank 1 sends 1,2,3,4.
  const std::vector<int64_t> counts = {4, 2, 1, 3, 1, 2, 3, 4};
  const Layout got = run(counts, 4, 2, 24, 4);
  // Arriving rows: rank0 e0 0-3, e1 4-5, e2 6, e3 7-9; rank1 e0 10, e1 11-12, e2 13-15, e3 16-19.
  const std::vector<int32_t> want = {0,  1,  2,  3,  10, -1, -1, -1,  // e0: 5 rows -> 8
                                     4,  5,  11, 12,                  // e1: 4 rows -> 4
                                     6,  13, 14, 15,                  // e2: 4 rows -> 4
                                     7,  8,  9,  16, 17, 18, 19, -1}; // e3: 7 rows -> 8
  EXPECT_EQ(got.permuted_indices, want);
  EXPECT_EQ(got.m_sizes, (std::vector<int32_t>{8, 4, 4, 8}));
  EXPECT_EQ(got.m_offsets, (std::vector<int32_t>{8, 12, 16, 24}));
}

TEST(PermuteIndices, ZeroTokensPadsEveryExpertToAlignment) {
  const Layout got = run({0, 0, 0, 0, 0, 0}, 3, 2, 40, 8);
  EXPECT_EQ(got.m_sizes, (std::vector<int32_t>{8, 8, 8}));
  EXPECT_EQ(got.m_offsets, (std::vector<int32_t>{8, 16, 24}));
  EXPECT_TRUE(std::all_of(got.permuted_indices.begin(), got.permuted_indices.end(),
                          [](int32_t v) { return v == -1; }));
}

TEST(PermuteIndices, OneRankIsTheIdentityPlusPadding) {
  const Layout got = run({3, 0, 2}, 3, 1, 8, 1);
  EXPECT_EQ(got.permuted_indices, (std::vector<int32_t>{0, 1, 2, -1, 3, 4, -1, -1}));
  EXPECT_EQ(got.m_sizes, (std::vector<int32_t>{3, 1, 2}));
}

TEST(PermuteIndices, OneExpertPerRankConcatenatesRanks) {
  const Layout got = run({2, 1, 3}, 1, 3, 6, 1);
  EXPECT_EQ(got.permuted_indices, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(got.m_offsets, (std::vector<int32_t>{6}));
}

TEST(PermuteIndices, OneExpertHoldsAllTokens) {
  std::vector<int64_t> counts(4 * 8, 0);
  counts[2 * 8 + 5] = 1000;  // rank 2 -> expert 5
  for (int64_t alignment : {1, 8, 16, 128}) expect_matches_reference(counts, 8, 4, 4096, alignment);
}

TEST(PermuteIndices, AlignmentsMatchReference) {
  std::mt19937_64 rng(7);
  for (int64_t alignment : {1, 8, 16, 128}) {
    for (int trial = 0; trial < 20; ++trial) {
      const int64_t epr = 1 + static_cast<int64_t>(rng() % 9), ranks = 1 + static_cast<int64_t>(rng() % 9);
      std::vector<int64_t> counts(static_cast<size_t>(epr * ranks));
      for (auto& c : counts) c = (rng() % 3 == 0) ? 0 : static_cast<int64_t>(rng() % 50);
      const int64_t slack = static_cast<int64_t>(rng() % 5);
      const Layout want = reference(counts, epr, ranks, 0, alignment);
      expect_matches_reference(counts, epr, ranks, want.m_offsets.back() + slack, alignment);
    }
  }
}

TEST(PermuteIndices, Int32CountsGiveTheSameLayout) {
  const std::vector<int32_t> counts32 = {4, 2, 1, 3, 1, 2, 3, 4};
  const std::vector<int64_t> counts64(counts32.begin(), counts32.end());
  std::vector<int32_t> idx(24), sizes(4), offsets(4);
  generate_permute_indices(counts32.data(), 4, 2, 24, 4, idx.data(), sizes.data(), offsets.data());
  const Layout want = run(counts64, 4, 2, 24, 4);
  EXPECT_EQ(idx, want.permuted_indices);
  EXPECT_EQ(offsets, want.m_offsets);
}

TEST(PermuteIndices, ExactFitIsAccepted) {
  const Layout got = run({5, 3}, 2, 1, 16, 8);
  EXPECT_EQ(got.m_offsets.back(), 16);
}

// Refusals: nothing may be written when the arguments are bad.
void expect_refused_untouched(const std::vector<int64_t>& counts, int64_t epr, int64_t ranks,
                              int64_t max_len, int64_t alignment, const char* needle) {
  std::vector<int32_t> idx(static_cast<size_t>(std::max<int64_t>(max_len, 0)), 777);
  std::vector<int32_t> sizes(static_cast<size_t>(std::max<int64_t>(epr, 0)), 777), offsets(sizes);
  try {
    generate_permute_indices(counts.data(), epr, ranks, max_len, alignment, idx.data(), sizes.data(),
                             offsets.data());
    FAIL() << "expected std::invalid_argument mentioning " << needle;
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find(needle), std::string::npos) << error.what();
  }
  EXPECT_TRUE(std::all_of(idx.begin(), idx.end(), [](int32_t v) { return v == 777; }));
  EXPECT_TRUE(std::all_of(sizes.begin(), sizes.end(), [](int32_t v) { return v == 777; }));
}

TEST(PermuteIndices, RefusesPaddedTotalBeyondMaxLen) {
  expect_refused_untouched({5, 3}, 2, 1, 15, 8, "max_len is 15");
}

TEST(PermuteIndices, RefusesNegativeCounts) {
  expect_refused_untouched({5, -3}, 2, 1, 64, 8, "got -3 at index 1");
}

TEST(PermuteIndices, RefusesBadShapeArguments) {
  expect_refused_untouched({1, 1}, 0, 1, 8, 1, "experts_per_rank must be >= 1");
  expect_refused_untouched({1, 1}, 2, 0, 8, 1, "num_ranks must be >= 1");
  expect_refused_untouched({1, 1}, 2, 1, 8, 0, "alignment must be >= 1");
  expect_refused_untouched({1, 1}, 2, 1, -1, 1, "max_len must be >= 0");
}

TEST(PermuteIndices, RefusesCountLengthMismatch) {
  EXPECT_THROW(moe_ext::core::check_permute_indices_shape(7, 4, 2, 64, 1), std::invalid_argument);
  try {
    moe_ext::core::check_permute_indices_shape(7, 4, 2, 64, 1);
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("= 8, got 7"), std::string::npos) << error.what();
  }
}

}  // namespace
