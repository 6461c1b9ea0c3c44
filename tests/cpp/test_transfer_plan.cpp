// GoogleTest suite of core::plan_expert_transfer. The main check executes a
// plan on simulated ranks whose "weights" are the expert ids they hold, in the
// order the executor uses, with P2P messages matched per (sender, receiver)
// pair in posting order, and checks that every slot ends up with its new
// expert; plus coverage, minimality, sender choice and argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <utility>
#include <vector>

#include "core/transfer/transfer_plan.h"

namespace {

using moe_ext::core::ExpertTransferPlan;
using moe_ext::core::plan_expert_transfer;
using moe_ext::core::TransferPlanArgs;
using Map = std::vector<int64_t>;  // num_layers x slots, row-major

struct Case {
  Map old_map, new_map;
  int64_t num_layers, ep_size, slots_per_rank, ranks_per_node = 0;
  bool write_before_commit = true;
};

ExpertTransferPlan plan_of(const Case& c, int64_t num_threads = 0) {
  TransferPlanArgs args;
  args.num_threads = num_threads;
  args.num_layers = c.num_layers;
  args.ep_size = c.ep_size;
  args.slots_per_rank = c.slots_per_rank;
  args.ranks_per_node = c.ranks_per_node;
  args.write_before_commit = c.write_before_commit;
  return plan_expert_transfer(c.old_map.data(), c.new_map.data(), args);
}

std::pair<int64_t, int64_t> range(const std::vector<int64_t>& offsets, int64_t group) {
  return {offsets[static_cast<size_t>(group)], offsets[static_cast<size_t>(group + 1)]};
}

// Receives any plan must make: (rank, expert) pairs needed by the new map on a
// rank whose old slots do not hold the expert.
int64_t minimal_receives(const Case& c, int64_t layer) {
  const int64_t slots = c.ep_size * c.slots_per_rank;
  int64_t count = 0;
  for (int64_t r = 0; r < c.ep_size; ++r) {
    std::set<int64_t> held, needed;
    for (int64_t row = 0; row < c.slots_per_rank; ++row) {
      const size_t at = static_cast<size_t>(layer * slots + r * c.slots_per_rank + row);
      if (c.old_map[at] >= 0) held.insert(c.old_map[at]);
      if (c.new_map[at] >= 0) needed.insert(c.new_map[at]);
    }
    for (int64_t e : needed) count += held.count(e) ? 0 : 1;
  }
  return count;
}

// Runs the plan on simulated weights and checks everything it promises.
void check_plan(const Case& c, const ExpertTransferPlan& plan) {
  const int64_t ep = c.ep_size, per_rank = c.slots_per_rank, slots = ep * per_rank;
  ASSERT_EQ(plan.num_layers, c.num_layers);
  const size_t groups = static_cast<size_t>(c.num_layers * ep);
  for (const auto* offsets : {&plan.unchanged.offsets, &plan.local_copies.offsets,
                              &plan.sends.offsets, &plan.receives.offsets,
                              &plan.duplicate_fills.offsets}) {
    ASSERT_EQ(offsets->size(), groups + 1);
    ASSERT_EQ(offsets->front(), 0);
    ASSERT_TRUE(std::is_sorted(offsets->begin(), offsets->end()));
  }
  ASSERT_EQ(plan.buffer_rows.size(), groups);
  ASSERT_EQ(plan.sends.offsets.back(), plan.receives.offsets.back());

  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    auto old_at = [&](int64_t r, int64_t row) {
      return c.old_map[static_cast<size_t>(layer * slots + r * per_rank + row)];
    };
    auto new_at = [&](int64_t r, int64_t row) {
      return c.new_map[static_cast<size_t>(layer * slots + r * per_rank + row)];
    };
    // weights[r][row]: the expert the row holds; empty rows hold distinct garbage.
    std::vector<std::vector<int64_t>> weights(static_cast<size_t>(ep));
    std::vector<std::vector<int64_t>> buffers(static_cast<size_t>(ep));
    for (int64_t r = 0; r < ep; ++r) {
      for (int64_t row = 0; row < per_rank; ++row) {
        const int64_t e = old_at(r, row);
        weights[static_cast<size_t>(r)].push_back(e >= 0 ? e : -1000 - r * per_rank - row);
      }
      const int64_t rows = plan.buffer_rows[static_cast<size_t>(layer * ep + r)];
      ASSERT_GE(rows, 0);
      ASSERT_LE(rows, per_rank);
      buffers[static_cast<size_t>(r)].assign(static_cast<size_t>(rows), -999);
    }
    const auto initial = weights;
    // Every destination row is written by exactly one entry of the plan.
    std::vector<std::vector<int>> written(static_cast<size_t>(ep), std::vector<int>(static_cast<size_t>(per_rank)));
    std::vector<std::set<int64_t>> used_buffer_rows(static_cast<size_t>(ep));
    auto use_buffer_row = [&](int64_t r, int64_t b) {
      ASSERT_GE(b, 0);
      ASSERT_LT(b, plan.buffer_rows[static_cast<size_t>(layer * ep + r)]);
      ASSERT_TRUE(used_buffer_rows[static_cast<size_t>(r)].insert(b).second) << "buffer row reused";
    };

    // Rows read and rows written in place during steps 1 and 2 (they run
    // concurrently on a real machine, so the two sets must not meet).
    std::set<std::pair<int64_t, int64_t>> read_early, written_early;
    // 1. local copies before the exchange: into place, or into the buffer.
    for (int64_t r = 0; r < ep; ++r) {
      auto [begin, end] = range(plan.local_copies.offsets, layer * ep + r);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t src = plan.local_copies.src_rows[static_cast<size_t>(i)];
        const int64_t dst = plan.local_copies.dst_rows[static_cast<size_t>(i)];
        const int64_t b = plan.local_copies.buffer_rows[static_cast<size_t>(i)];
        const int64_t stage = plan.local_copies.stages[static_cast<size_t>(i)];
        ASSERT_EQ(old_at(r, src), new_at(r, dst)) << "local copy from a row without the expert";
        ++written[static_cast<size_t>(r)][static_cast<size_t>(dst)];
        read_early.insert({r, src});
        if (stage == moe_ext::core::kCopyThroughBuffer) {
          use_buffer_row(r, b);
          buffers[static_cast<size_t>(r)][static_cast<size_t>(b)] = weights[static_cast<size_t>(r)][static_cast<size_t>(src)];
        } else if (stage == moe_ext::core::kCopyBeforeExchange) {
          ASSERT_EQ(b, -1);
          ASSERT_TRUE(c.write_before_commit) << "a row written before the commit step";
          written_early.insert({r, dst});
          weights[static_cast<size_t>(r)][static_cast<size_t>(dst)] = weights[static_cast<size_t>(r)][static_cast<size_t>(src)];
        } else {
          ASSERT_EQ(stage, moe_ext::core::kCopyAfterExchange);
          ASSERT_EQ(b, -1);
          ASSERT_EQ(old_at(r, src), new_at(r, src)) << "copy after the exchange from a row that changes";
        }
      }
    }
    // 2. sends then receives, matched in posting order per (sender, receiver).
    std::map<std::pair<int64_t, int64_t>, std::deque<std::pair<int64_t, int64_t>>> wires;
    std::vector<int64_t> send_load(static_cast<size_t>(ep));
    for (int64_t h = 0; h < ep; ++h) {
      auto [begin, end] = range(plan.sends.offsets, layer * ep + h);
      send_load[static_cast<size_t>(h)] = end - begin;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t dst_rank = plan.sends.dst_ranks[static_cast<size_t>(i)];
        ASSERT_NE(dst_rank, h);
        ASSERT_GE(dst_rank, 0);
        ASSERT_LT(dst_rank, ep);
        read_early.insert({h, plan.sends.src_rows[static_cast<size_t>(i)]});
        wires[{h, dst_rank}].push_back({plan.sends.experts[static_cast<size_t>(i)],
                                        weights[static_cast<size_t>(h)][static_cast<size_t>(plan.sends.src_rows[static_cast<size_t>(i)])]});
      }
    }
    int64_t receives = 0;
    for (int64_t r = 0; r < ep; ++r) {
      auto [begin, end] = range(plan.receives.offsets, layer * ep + r);
      receives += end - begin;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t e = plan.receives.experts[static_cast<size_t>(i)];
        const int64_t src_rank = plan.receives.src_ranks[static_cast<size_t>(i)];
        const int64_t dst = plan.receives.dst_rows[static_cast<size_t>(i)];
        const int64_t b = plan.receives.buffer_rows[static_cast<size_t>(i)];
        auto& wire = wires[{src_rank, r}];
        ASSERT_FALSE(wire.empty()) << "receive without a matching send";
        ASSERT_EQ(wire.front().first, e) << "sends and receives of a pair are out of order";
        ASSERT_EQ(wire.front().second, e) << "sender row did not hold the expert";
        ASSERT_EQ(new_at(r, dst), e);
        ASSERT_EQ(old_at(src_rank, plan.receives.src_rows[static_cast<size_t>(i)]), e);
        if (b >= 0) {
          use_buffer_row(r, b);
          buffers[static_cast<size_t>(r)][static_cast<size_t>(b)] = wire.front().second;
        } else {
          ASSERT_TRUE(c.write_before_commit) << "a row received in place before the commit step";
          written_early.insert({r, dst});
          weights[static_cast<size_t>(r)][static_cast<size_t>(dst)] = wire.front().second;
        }
        wire.pop_front();
        ++written[static_cast<size_t>(r)][static_cast<size_t>(dst)];
      }
    }
    for (auto& [pair, wire] : wires) ASSERT_TRUE(wire.empty()) << "send without a matching receive";
    for (const auto& row : written_early)
      ASSERT_EQ(read_early.count(row), 0u) << "rank " << row.first << " row " << row.second
                                           << " is written while the exchange reads it";
    EXPECT_EQ(receives, minimal_receives(c, layer));
    // 3. buffer -> rows, direct copies, duplicate fills.
    for (int64_t r = 0; r < ep; ++r) {
      auto& w = weights[static_cast<size_t>(r)];
      const auto& buf = buffers[static_cast<size_t>(r)];
      auto [lc_begin, lc_end] = range(plan.local_copies.offsets, layer * ep + r);
      auto [rc_begin, rc_end] = range(plan.receives.offsets, layer * ep + r);
      for (int64_t i = lc_begin; i < lc_end; ++i) {
        const int64_t b = plan.local_copies.buffer_rows[static_cast<size_t>(i)];
        if (b >= 0) w[static_cast<size_t>(plan.local_copies.dst_rows[static_cast<size_t>(i)])] = buf[static_cast<size_t>(b)];
      }
      for (int64_t i = rc_begin; i < rc_end; ++i) {
        const int64_t b = plan.receives.buffer_rows[static_cast<size_t>(i)];
        if (b >= 0) w[static_cast<size_t>(plan.receives.dst_rows[static_cast<size_t>(i)])] = buf[static_cast<size_t>(b)];
      }
      for (int64_t i = lc_begin; i < lc_end; ++i) {
        if (plan.local_copies.stages[static_cast<size_t>(i)] == moe_ext::core::kCopyAfterExchange)
          w[static_cast<size_t>(plan.local_copies.dst_rows[static_cast<size_t>(i)])] =
              w[static_cast<size_t>(plan.local_copies.src_rows[static_cast<size_t>(i)])];
      }
      auto [df_begin, df_end] = range(plan.duplicate_fills.offsets, layer * ep + r);
      for (int64_t i = df_begin; i < df_end; ++i) {
        const int64_t dst = plan.duplicate_fills.dst_rows[static_cast<size_t>(i)];
        ++written[static_cast<size_t>(r)][static_cast<size_t>(dst)];
        w[static_cast<size_t>(dst)] = w[static_cast<size_t>(plan.duplicate_fills.src_rows[static_cast<size_t>(i)])];
      }
      auto [u_begin, u_end] = range(plan.unchanged.offsets, layer * ep + r);
      for (int64_t i = u_begin; i < u_end; ++i) {
        const int64_t row = plan.unchanged.rows[static_cast<size_t>(i)];
        ASSERT_EQ(old_at(r, row), new_at(r, row));
        ++written[static_cast<size_t>(r)][static_cast<size_t>(row)];
      }
      ASSERT_EQ(static_cast<int64_t>(used_buffer_rows[static_cast<size_t>(r)].size()),
                plan.buffer_rows[static_cast<size_t>(layer * ep + r)]);
      for (int64_t row = 0; row < per_rank; ++row) {
        const int64_t e = new_at(r, row);
        const int count = written[static_cast<size_t>(r)][static_cast<size_t>(row)];
        if (e >= 0) {
          ASSERT_EQ(count, 1) << "layer " << layer << " rank " << r << " row " << row;
          ASSERT_EQ(w[static_cast<size_t>(row)], e) << "layer " << layer << " rank " << r << " row " << row;
        } else {
          ASSERT_EQ(count, 0);
          ASSERT_EQ(w[static_cast<size_t>(row)], initial[static_cast<size_t>(r)][static_cast<size_t>(row)])
              << "an emptied row was written";
        }
      }
    }
  }
}

// Old map: random experts with replicas and empty slots, every expert of
// [0, num_experts) at least once per layer. New map: experts of the old layer
// (replicas, empties) chosen at random.
Case random_case(std::mt19937_64& rng, int64_t num_layers, int64_t ep, int64_t per_rank,
                 double empty_fraction) {
  Case c{{}, {}, num_layers, ep, per_rank};
  const int64_t slots = ep * per_rank;
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const int64_t num_experts = std::uniform_int_distribution<int64_t>(1, slots)(rng);
    Map old_layer(static_cast<size_t>(slots));
    for (int64_t s = 0; s < slots; ++s) {
      old_layer[static_cast<size_t>(s)] =
          s < num_experts ? s : (unit(rng) < empty_fraction ? -1 : std::uniform_int_distribution<int64_t>(0, num_experts - 1)(rng));
    }
    std::shuffle(old_layer.begin(), old_layer.end(), rng);
    Map new_layer(static_cast<size_t>(slots));
    for (int64_t s = 0; s < slots; ++s) {
      new_layer[static_cast<size_t>(s)] =
          unit(rng) < empty_fraction ? -1 : std::uniform_int_distribution<int64_t>(0, num_experts - 1)(rng);
    }
    c.old_map.insert(c.old_map.end(), old_layer.begin(), old_layer.end());
    c.new_map.insert(c.new_map.end(), new_layer.begin(), new_layer.end());
  }
  return c;
}

TEST(TransferPlan, RandomMapsWithReplicasAndEmptySlots) {
  std::mt19937_64 rng(20240611);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t ep = std::uniform_int_distribution<int64_t>(1, 9)(rng);
    const int64_t per_rank = std::uniform_int_distribution<int64_t>(1, 6)(rng);
    const int64_t layers = std::uniform_int_distribution<int64_t>(0, 3)(rng);
    Case c = random_case(rng, layers, ep, per_rank, trial % 3 == 0 ? 0.0 : 0.3);
    c.ranks_per_node = std::uniform_int_distribution<int64_t>(0, 4)(rng);
    c.write_before_commit = trial % 2 == 0;
    SCOPED_TRACE(::testing::Message() << "trial " << trial << " ep " << ep << " per_rank " << per_rank);
    check_plan(c, plan_of(c));
  }
}

TEST(TransferPlan, IdenticalMapsMoveNothing) {
  std::mt19937_64 rng(7);
  Case c = random_case(rng, 4, 8, 4, 0.2);
  c.new_map = c.old_map;
  const auto plan = plan_of(c);
  check_plan(c, plan);
  EXPECT_EQ(plan.sends.experts.size(), 0u);
  EXPECT_EQ(plan.local_copies.dst_rows.size(), 0u);
  EXPECT_EQ(plan.duplicate_fills.dst_rows.size(), 0u);
  EXPECT_EQ(static_cast<int64_t>(plan.unchanged.rows.size()),
            std::count_if(c.old_map.begin(), c.old_map.end(), [](int64_t e) { return e >= 0; }));
  for (int64_t rows : plan.buffer_rows) EXPECT_EQ(rows, 0);
}

TEST(TransferPlan, FullPermutations) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t ep = std::uniform_int_distribution<int64_t>(1, 8)(rng);
    const int64_t per_rank = std::uniform_int_distribution<int64_t>(1, 8)(rng);
    Case c{{}, {}, 2, ep, per_rank};
    for (int layer = 0; layer < 2; ++layer) {
      Map a(static_cast<size_t>(ep * per_rank)), b;
      std::iota(a.begin(), a.end(), 0);
      b = a;
      std::shuffle(a.begin(), a.end(), rng);
      std::shuffle(b.begin(), b.end(), rng);
      c.old_map.insert(c.old_map.end(), a.begin(), a.end());
      c.new_map.insert(c.new_map.end(), b.begin(), b.end());
    }
    check_plan(c, plan_of(c));
  }
}

TEST(TransferPlan, EverythingOnOneRankAndBack) {
  const int64_t ep = 4, per_rank = 8, experts = 8;
  Case gather{{}, {}, 1, ep, per_rank};
  gather.old_map.assign(static_cast<size_t>(ep * per_rank), -1);
  gather.new_map.assign(static_cast<size_t>(ep * per_rank), -1);
  for (int64_t e = 0; e < experts; ++e) {
    gather.old_map[static_cast<size_t>(e * ep)] = e;          // spread over the ranks
    gather.new_map[static_cast<size_t>(2 * per_rank + e)] = e;  // all on rank 2
  }
  const auto plan = plan_of(gather);
  check_plan(gather, plan);
  Case scatter{gather.new_map, gather.old_map, 1, ep, per_rank};
  check_plan(scatter, plan_of(scatter));
  // One rank holding everything, every other rank needing every expert.
  Case broadcast{{}, {}, 1, ep, per_rank};
  broadcast.old_map.assign(static_cast<size_t>(ep * per_rank), -1);
  for (int64_t row = 0; row < per_rank; ++row) broadcast.old_map[static_cast<size_t>(row)] = row;
  for (int64_t s = 0; s < ep * per_rank; ++s) broadcast.new_map.push_back((s * 5) % per_rank);
  check_plan(broadcast, plan_of(broadcast));
}

TEST(TransferPlan, ReceiversAreSpreadOverHolders) {
  // Expert 0 on ranks 0 and 1, needed by ranks 2..7: three receivers each.
  const int64_t ep = 8, per_rank = 2;
  Case c{{}, {}, 1, ep, per_rank};
  for (int64_t r = 0; r < ep; ++r) {
    c.old_map.push_back(r < 2 ? 0 : r);
    c.old_map.push_back(-1);
    c.new_map.push_back(r < 2 ? 0 : r);
    c.new_map.push_back(0);
  }
  c.new_map[1] = -1;
  c.new_map[3] = -1;
  const auto plan = plan_of(c);
  check_plan(c, plan);
  EXPECT_EQ(plan.sends.offsets[1] - plan.sends.offsets[0], 3);
  EXPECT_EQ(plan.sends.offsets[2] - plan.sends.offsets[1], 3);
}

TEST(TransferPlan, LoadIsBalancedAcrossExperts) {
  // Experts 0..3 are each on ranks 0 and 1; ranks 2..5 need all four. Greedy
  // per expert in isolation would load one sender with everything on ties.
  const int64_t ep = 6, per_rank = 4;
  Case c{{}, {}, 1, ep, per_rank};
  for (int64_t r = 0; r < ep; ++r)
    for (int64_t row = 0; row < per_rank; ++row) {
      c.old_map.push_back(r < 2 ? row : -1);
      c.new_map.push_back(row);
    }
  const auto plan = plan_of(c);
  check_plan(c, plan);
  EXPECT_EQ(plan.sends.offsets[1] - plan.sends.offsets[0], 8);
  EXPECT_EQ(plan.sends.offsets[2] - plan.sends.offsets[1], 8);
}

TEST(TransferPlan, SameNodeSourcesArePreferred) {
  // Expert 0 on ranks 0 and 2; rank 3 needs it. Without nodes rank 0 (nearest
  // after rank 3 in rank order) sends; with 2 ranks per node rank 2 does.
  Case c{{0, 1, 0, 2}, {0, 1, 0, 0}, 1, 4, 1};
  auto plan = plan_of(c);
  check_plan(c, plan);
  ASSERT_EQ(plan.receives.src_ranks.size(), 1u);
  EXPECT_EQ(plan.receives.src_ranks[0], 0);
  c.ranks_per_node = 2;
  plan = plan_of(c);
  check_plan(c, plan);
  EXPECT_EQ(plan.receives.src_ranks[0], 2);
}

TEST(TransferPlan, LocalCopiesPreferRowsThatStay) {
  // Rank 0 holds expert 5 in row 1 (kept) and row 0 (changing): the new copy
  // in row 2 is read directly from row 1, without the buffer.
  Case c{{5, 5, 7, 6}, {6, 5, 5, 7}, 1, 1, 4};
  c.write_before_commit = false;
  const auto plan = plan_of(c);
  check_plan(c, plan);
  ASSERT_EQ(plan.local_copies.dst_rows.size(), 3u);
  EXPECT_EQ(plan.local_copies.dst_rows[1], 2);
  EXPECT_EQ(plan.local_copies.src_rows[1], 1);
  EXPECT_EQ(plan.local_copies.buffer_rows[1], -1);
  EXPECT_EQ(plan.buffer_rows[0], 2);
}

TEST(TransferPlan, RowsTheExchangeDoesNotReadAreWrittenInPlace) {
  // Rank 0 (old 0 3 1 7 -> new 0 1 9 8): row 1 gets expert 1 from row 2, and no
  // one reads row 1 (expert 3 is dropped): copied in place before the exchange.
  // Row 2 receives 9 but is read by that copy: through the buffer. Row 3
  // receives 8 and its expert 7 is dropped: straight into place.
  // Rank 1 (old 9 8 4 5 -> new 8 8 4 5): row 0 copies from row 1, which keeps
  // expert 8, after the exchange (row 0's expert 9 is sent to rank 0).
  Case c{{0, 3, 1, 7, 9, 8, 4, 5}, {0, 1, 9, 8, 8, 8, 4, 5}, 1, 2, 4};
  auto plan = plan_of(c);
  check_plan(c, plan);
  ASSERT_EQ(plan.local_copies.stages.size(), 2u);
  EXPECT_EQ(plan.local_copies.stages[0], moe_ext::core::kCopyBeforeExchange);
  EXPECT_EQ(plan.local_copies.stages[1], moe_ext::core::kCopyAfterExchange);
  ASSERT_EQ(plan.receives.buffer_rows.size(), 2u);
  EXPECT_EQ(plan.receives.buffer_rows[0], 0);   // row 2, via the buffer
  EXPECT_EQ(plan.receives.buffer_rows[1], -1);  // row 3, in place
  EXPECT_EQ(plan.buffer_rows[0], 1);
  EXPECT_EQ(plan.buffer_rows[1], 0);
  c.write_before_commit = false;  // serving: nothing in place before the commit step
  plan = plan_of(c);
  check_plan(c, plan);
  EXPECT_EQ(plan.local_copies.stages[0], moe_ext::core::kCopyThroughBuffer);
  EXPECT_EQ(plan.buffer_rows[0], 3);
}

TEST(TransferPlan, IsDeterministic) {
  std::mt19937_64 rng(3);
  Case c = random_case(rng, 5, 16, 8, 0.1);
  c.ranks_per_node = 4;
  const auto a = plan_of(c), b = plan_of(c);
  EXPECT_EQ(a.sends.experts, b.sends.experts);
  EXPECT_EQ(a.sends.dst_ranks, b.sends.dst_ranks);
  EXPECT_EQ(a.receives.src_ranks, b.receives.src_ranks);
  EXPECT_EQ(a.local_copies.src_rows, b.local_copies.src_rows);
  EXPECT_EQ(a.duplicate_fills.dst_rows, b.duplicate_fills.dst_rows);
}

void expect_same_plan(const ExpertTransferPlan& a, const ExpertTransferPlan& b) {
  EXPECT_EQ(a.unchanged.offsets, b.unchanged.offsets);
  EXPECT_EQ(a.unchanged.rows, b.unchanged.rows);
  EXPECT_EQ(a.local_copies.offsets, b.local_copies.offsets);
  EXPECT_EQ(a.local_copies.src_rows, b.local_copies.src_rows);
  EXPECT_EQ(a.local_copies.dst_rows, b.local_copies.dst_rows);
  EXPECT_EQ(a.local_copies.buffer_rows, b.local_copies.buffer_rows);
  EXPECT_EQ(a.local_copies.stages, b.local_copies.stages);
  EXPECT_EQ(a.sends.offsets, b.sends.offsets);
  EXPECT_EQ(a.sends.experts, b.sends.experts);
  EXPECT_EQ(a.sends.src_rows, b.sends.src_rows);
  EXPECT_EQ(a.sends.dst_ranks, b.sends.dst_ranks);
  EXPECT_EQ(a.sends.dst_rows, b.sends.dst_rows);
  EXPECT_EQ(a.receives.offsets, b.receives.offsets);
  EXPECT_EQ(a.receives.experts, b.receives.experts);
  EXPECT_EQ(a.receives.dst_rows, b.receives.dst_rows);
  EXPECT_EQ(a.receives.src_ranks, b.receives.src_ranks);
  EXPECT_EQ(a.receives.src_rows, b.receives.src_rows);
  EXPECT_EQ(a.receives.buffer_rows, b.receives.buffer_rows);
  EXPECT_EQ(a.duplicate_fills.offsets, b.duplicate_fills.offsets);
  EXPECT_EQ(a.duplicate_fills.src_rows, b.duplicate_fills.src_rows);
  EXPECT_EQ(a.duplicate_fills.dst_rows, b.duplicate_fills.dst_rows);
  EXPECT_EQ(a.buffer_rows, b.buffer_rows);
}

TEST(TransferPlan, ThreadCountDoesNotChangeThePlan) {
  std::mt19937_64 rng(11);
  for (bool write_before_commit : {true, false}) {
    Case c = random_case(rng, 13, 8, 6, 0.1);
    c.ranks_per_node = 4;
    c.write_before_commit = write_before_commit;
    const auto serial = plan_of(c, 1);
    check_plan(c, serial);
    for (int64_t threads : {2, 3, 5, 13, 40}) {
      const auto parallel = plan_of(c, threads);
      check_plan(c, parallel);
      expect_same_plan(serial, parallel);
    }
  }
}

TEST(TransferPlan, RefusesBadArguments) {
  Map old_map{0, 1, 2, 3}, new_map{3, 2, 1, 0};
  auto call = [&](TransferPlanArgs args, const Map& o, const Map& n) {
    return plan_expert_transfer(o.data(), n.data(), args);
  };
  TransferPlanArgs good;
  good.num_layers = 1;
  good.ep_size = 2;
  good.slots_per_rank = 2;
  EXPECT_NO_THROW(call(good, old_map, new_map));
  auto bad = good;
  bad.ep_size = 0;
  EXPECT_THROW(call(bad, old_map, new_map), std::invalid_argument);
  bad = good;
  bad.slots_per_rank = 0;
  EXPECT_THROW(call(bad, old_map, new_map), std::invalid_argument);
  bad = good;
  bad.num_layers = -1;
  EXPECT_THROW(call(bad, old_map, new_map), std::invalid_argument);
  bad = good;
  bad.num_threads = -1;
  EXPECT_THROW(call(bad, old_map, new_map), std::invalid_argument);
  bad = good;
  bad.ranks_per_node = -2;
  EXPECT_THROW(call(bad, old_map, new_map), std::invalid_argument);
  bad = good;
  bad.num_logical_experts = 3;  // id 3 is out of range
  EXPECT_THROW(call(bad, old_map, new_map), std::invalid_argument);
  EXPECT_THROW(call(good, Map{0, -2, 2, 3}, new_map), std::invalid_argument);
  EXPECT_THROW(call(good, old_map, Map{0, 1, 2, -5}), std::invalid_argument);
  // Expert 4 is wanted but nobody holds it: its weights cannot be produced.
  try {
    call(good, old_map, Map{0, 1, 4, 3});
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("no rank holds it"), std::string::npos) << error.what();
  }
  // Expert 0 held only by a removed slot: also lost.
  EXPECT_THROW(call(good, Map{-1, 1, 2, 3}, Map{0, 1, 2, 3}), std::invalid_argument);
  // Huge ids without num_logical_experts are refused instead of sizing tables by them.
  EXPECT_THROW(call(good, Map{0, 1, 2, int64_t{1} << 40}, Map{0, 1, 2, int64_t{1} << 40}),
               std::invalid_argument);
}

TEST(TransferPlan, EmptyInputs) {
  TransferPlanArgs args;
  args.num_layers = 0;
  args.ep_size = 4;
  args.slots_per_rank = 2;
  const auto plan = plan_expert_transfer(nullptr, nullptr, args);
  EXPECT_EQ(plan.sends.offsets.size(), 1u);
  Case all_empty{Map(8, -1), Map(8, -1), 1, 4, 2};
  check_plan(all_empty, plan_of(all_empty));
}

}  // namespace
