// moe_ext's AscendC kernels (csrc/ascend/) compiled against the host twin of
// the AscendC API (csrc/ascend/twin/kernel_operator.h) and launched block by
// block: results against the reference maths on random and edge shapes, with
// small Unified Buffers to force many tiles; and the twin's rule checks.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/ascend/tiling.h"
#include "core/permute_indices.h"
#include "core/routing_layout.h"
#include "kernel_operator.h"

extern "C" {
void moe_ext_gather_rows_b2_i32(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_gather_rows_b4_i32(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_gather_rows_b4_i64(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_gather_rows_b8_i64(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_expert_histogram_partial_i32(GM_ADDR, GM_ADDR, GM_ADDR);
void moe_ext_expert_histogram_partial_i64(GM_ADDR, GM_ADDR, GM_ADDR);
void moe_ext_expert_histogram_reduce(GM_ADDR, GM_ADDR, GM_ADDR);
void moe_ext_unpermute_f32_pf32_i32(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_generate_permute_indices_i64(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);
void moe_ext_permute_key_count_i64_m32(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);
void moe_ext_permute_place_i64_m32(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);
void moe_ext_permute_scan(GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_permute_rows_b4(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
}

namespace ascend = moe_ext::core::ascend;
using AscendC::twin::RuleViolation;

namespace {

constexpr int64_t kVectorCores = 40;  // an Atlas A2 (910B) has 20 AI cores = 40 vector cores

template <typename T>
GM_ADDR gm(T* pointer) {
  return reinterpret_cast<GM_ADDR>(pointer);
}

template <typename T, typename IndexT>
std::vector<T> run_gather(void (*entry)(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t), std::vector<T> x,
                          int64_t source_rows, int64_t row_elements, std::vector<IndexT> indices, int64_t ub_bytes) {
  const int64_t out_rows = static_cast<int64_t>(indices.size());
  const auto tiling = ascend::plan_row_tiling(out_rows, row_elements * int64_t(sizeof(T)), 0, 1, 2, kVectorCores,
                                              ub_bytes);
  auto words = ascend::kernel_tiling_words(tiling.split, tiling.rows_per_tile, row_elements,
                                           tiling.row_stride_ub / int64_t(sizeof(T)), source_rows, 0);
  std::vector<T> out(static_cast<size_t>(out_rows * row_elements), T(77));
  AscendC::twin::launch(tiling.split.blocks, ub_bytes, [&] {
    entry(gm(x.data()), gm(indices.data()), gm(out.data()), gm(words.data()), out_rows);
  });
  return out;
}

template <typename T, typename IndexT>
void check_gather(void (*entry)(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t), std::mt19937_64& rng,
                  int64_t source_rows, int64_t out_rows, int64_t row_elements, int64_t ub_bytes) {
  if (2 * ascend::ub_round_up(row_elements * int64_t(sizeof(T))) > ub_bytes) {  // a row must fit twice (double buffer)
    EXPECT_THROW(ascend::plan_row_tiling(out_rows, row_elements * int64_t(sizeof(T)), 0, 1, 2, kVectorCores, ub_bytes),
                 std::invalid_argument);
    return;
  }
  std::vector<T> x(static_cast<size_t>(source_rows * row_elements));
  for (auto& value : x) value = static_cast<T>(rng() % 1000);
  std::vector<IndexT> indices(static_cast<size_t>(out_rows));
  for (auto& index : indices)
    index = source_rows == 0 || rng() % 5 == 0 ? IndexT(-1) : static_cast<IndexT>(rng() % source_rows);
  const auto out = run_gather<T, IndexT>(entry, x, source_rows, row_elements, indices, ub_bytes);
  for (int64_t p = 0; p < out_rows; ++p) {
    for (int64_t c = 0; c < row_elements; ++c) {
      const T expected = indices[p] < 0 ? T(0) : x[static_cast<size_t>(indices[p] * row_elements + c)];
      ASSERT_EQ(out[static_cast<size_t>(p * row_elements + c)], expected)
          << "row " << p << " col " << c << " (" << source_rows << " -> " << out_rows << " rows of " << row_elements
          << ", UB " << ub_bytes << ")";
    }
  }
}

}  // namespace

TEST(AscendKernels, GatherRowsMatchesTheContract) {
  std::mt19937_64 rng(1);
  for (int64_t row_elements : {1, 3, 8, 100, 1031}) {
    for (int64_t ub : {int64_t(8 * 1024), AscendC::twin::kA2UbBytes}) {
      for (auto shape : {std::pair<int64_t, int64_t>{0, 0}, {5, 0}, {0, 4}, {1, 1}, {37, 90}, {300, 257}}) {
        check_gather<float, int32_t>(moe_ext_gather_rows_b4_i32, rng, shape.first, shape.second, row_elements, ub);
        check_gather<float, int64_t>(moe_ext_gather_rows_b4_i64, rng, shape.first, shape.second, row_elements, ub);
        check_gather<uint16_t, int32_t>(moe_ext_gather_rows_b2_i32, rng, shape.first, shape.second, row_elements, ub);
        check_gather<double, int64_t>(moe_ext_gather_rows_b8_i64, rng, shape.first, shape.second, row_elements, ub);
      }
    }
  }
}

TEST(AscendKernels, GatherRowsRefusesAnIndexOutOfRange) {
  std::vector<float> x(4 * 8, 1.0f);
  EXPECT_THROW((run_gather<float, int32_t>(moe_ext_gather_rows_b4_i32, x, 4, 8, {0, 4}, 8192)), RuleViolation);
  EXPECT_THROW((run_gather<float, int32_t>(moe_ext_gather_rows_b4_i32, x, 4, 8, {-2}, 8192)), RuleViolation);
}

namespace {

template <typename IdT>
std::vector<int64_t> run_histogram(void (*partial)(GM_ADDR, GM_ADDR, GM_ADDR), std::vector<IdT> ids,
                                   int64_t num_experts, int64_t ub_bytes) {
  const int64_t count = static_cast<int64_t>(ids.size());
  const auto stream = ascend::plan_stream_tiling(count, sizeof(IdT), num_experts * 8, 2, kVectorCores, ub_bytes);
  auto words = ascend::kernel_tiling_words(stream.split, stream.elements_per_tile, count, 0, 0, num_experts);
  std::vector<int64_t> workspace(static_cast<size_t>(stream.split.blocks * num_experts), -7);
  AscendC::twin::launch(stream.split.blocks, ub_bytes, [&] { partial(gm(ids.data()), gm(workspace.data()),
                                                                      gm(words.data())); });
  const auto experts = ascend::split_over_cores(num_experts, kVectorCores, 64);
  auto reduce_words = ascend::kernel_tiling_words(experts, 0, 0, 0, stream.split.blocks, num_experts);
  std::vector<int64_t> counts(static_cast<size_t>(num_experts), -7);
  AscendC::twin::launch(experts.blocks, ub_bytes, [&] { moe_ext_expert_histogram_reduce(
                                                            gm(workspace.data()), gm(counts.data()),
                                                            gm(reduce_words.data())); });
  return counts;
}

}  // namespace

TEST(AscendKernels, ExpertHistogramMatchesTheCore) {
  std::mt19937_64 rng(2);
  for (int64_t experts : {1, 7, 64, 257, 2000}) {
    for (int64_t count : {0, 1, 9, 1000, 40000}) {
      for (int64_t ub : {int64_t(24 * 1024), AscendC::twin::kA2UbBytes}) {
        if (experts * 8 + 2 * 32 > ub) continue;
        std::vector<int32_t> ids32(static_cast<size_t>(count));
        for (auto& id : ids32) id = static_cast<int32_t>(static_cast<int64_t>(rng() % (experts + 3)) - 1);
        std::vector<int64_t> ids64(ids32.begin(), ids32.end());
        std::vector<int64_t> expected(static_cast<size_t>(experts));
        moe_ext::core::expert_histogram(ids32.data(), count, experts, expected.data());
        EXPECT_EQ(run_histogram<int32_t>(moe_ext_expert_histogram_partial_i32, ids32, experts, ub), expected)
            << experts << " experts, " << count << " ids";
        EXPECT_EQ(run_histogram<int64_t>(moe_ext_expert_histogram_partial_i64, ids64, experts, ub), expected);
      }
    }
  }
}

TEST(AscendKernels, UnpermuteMatchesTheOrderedFp32Sum) {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (int64_t hidden : {1, 5, 8, 300, 2049}) {
    for (int64_t tokens : {0, 1, 17, 130}) {
      for (int64_t topk : {1, 2, 8}) {
        for (bool with_probs : {true, false}) {
          const int64_t rows = tokens * topk;
          std::vector<float> permuted(static_cast<size_t>(rows * hidden));
          for (auto& value : permuted) value = uniform(rng);
          std::vector<int32_t> row_idx(static_cast<size_t>(rows));
          for (int64_t f = 0; f < rows; ++f) row_idx[f] = rng() % 4 == 0 ? -1 : static_cast<int32_t>(rng() % rows);
          std::vector<float> probs(static_cast<size_t>(rows));
          for (auto& p : probs) p = uniform(rng);
          const auto tiling = ascend::plan_row_tiling(tokens, hidden * 4, hidden * 4, 3, 1, kVectorCores,
                                                      AscendC::twin::kA2UbBytes);
          auto words = ascend::kernel_tiling_words(tiling.split, 1, hidden, tiling.row_stride_ub / 4, rows, topk);
          std::vector<float> out(static_cast<size_t>(tokens * hidden), 99.0f);
          AscendC::twin::launch(tiling.split.blocks, AscendC::twin::kA2UbBytes, [&] {
            moe_ext_unpermute_f32_pf32_i32(gm(permuted.data()), gm(row_idx.data()),
                                      with_probs ? gm(probs.data()) : nullptr, gm(out.data()), gm(words.data()),
                                      tokens);
          });
          for (int64_t t = 0; t < tokens; ++t) {
            for (int64_t c = 0; c < hidden; ++c) {
              float sum = 0.0f;
              for (int64_t k = 0; k < topk; ++k) {
                const int32_t r = row_idx[t * topk + k];
                if (r < 0) continue;
                const float weight = with_probs ? probs[t * topk + k] : 1.0f;
                const float scaled = weight * permuted[static_cast<size_t>(r * hidden + c)];
                sum = sum + scaled;
              }
              ASSERT_EQ(out[static_cast<size_t>(t * hidden + c)], sum) << "token " << t << " col " << c;
            }
          }
        }
      }
    }
  }
}

TEST(AscendKernels, GeneratePermuteIndicesMatchesTheCore) {
  std::mt19937_64 rng(4);
  for (int64_t experts : {1, 3, 32}) {
    for (int64_t ranks : {1, 2, 8}) {
      for (int64_t alignment : {1, 8, 128}) {
        for (int64_t per_tile : {8, 2048}) {
          std::vector<int64_t> counts(static_cast<size_t>(experts * ranks));
          for (auto& c : counts) c = rng() % 3 == 0 ? 0 : static_cast<int64_t>(rng() % 40);
          int64_t tokens = 0;
          for (auto c : counts) tokens += c;
          const int64_t max_len = tokens + experts * alignment + 17;
          std::vector<int32_t> expected(static_cast<size_t>(max_len)), sizes(static_cast<size_t>(experts)),
              offsets(static_cast<size_t>(experts));
          moe_ext::core::generate_permute_indices(counts.data(), experts, ranks, max_len, alignment, expected.data(),
                                                  sizes.data(), offsets.data());
          const auto split = ascend::split_over_cores(experts, kVectorCores, 1);
          auto words = ascend::kernel_tiling_words(split, per_tile, max_len, alignment, ranks, experts);
          std::vector<int32_t> got(static_cast<size_t>(max_len), 12345), got_sizes(static_cast<size_t>(experts), -9),
              got_offsets(static_cast<size_t>(experts), -9);
          AscendC::twin::launch(split.blocks, AscendC::twin::kA2UbBytes, [&] {
            moe_ext_generate_permute_indices_i64(gm(counts.data()), gm(got.data()), gm(got_sizes.data()),
                                                 gm(got_offsets.data()), gm(words.data()));
          });
          EXPECT_EQ(got, expected) << experts << " experts x " << ranks << " ranks, alignment " << alignment;
          EXPECT_EQ(got_sizes, sizes);
          EXPECT_EQ(got_offsets, offsets);
        }
      }
    }
  }
}

TEST(AscendKernels, MoePermuteLayoutAndRowsMatchTheCore) {
  std::mt19937_64 rng(5);
  const int64_t ub = 16 * 1024;  // small: many id tiles per block
  for (int64_t tokens : {0, 1, 5, 300}) {
    for (int64_t topk : {1, 2, 8}) {
      for (int64_t experts : {1, 4, 64}) {
        for (int mode = 0; mode < 3; ++mode) {  // 0: all experts, 1: a range, 2: an expert map with -1 entries
          const int64_t rows = tokens * topk, hidden = 12;
          std::vector<int64_t> ids(static_cast<size_t>(rows));
          for (auto& id : ids) id = static_cast<int64_t>(rng() % experts);
          std::vector<int32_t> map;
          int64_t start = 0, end = experts;
          if (mode == 1) {
            start = static_cast<int64_t>(rng() % experts);
            end = start + static_cast<int64_t>(rng() % (experts - start + 1));
          } else if (mode == 2) {
            map.resize(static_cast<size_t>(experts));
            int32_t next = 0;
            for (auto& value : map) value = rng() % 2 ? next++ : -1;
            start = 0;
            end = next;
          }
          const int32_t* map_ptr = mode == 2 ? map.data() : nullptr;
          std::vector<int32_t> expected_idx(static_cast<size_t>(rows));
          std::vector<int64_t> expected_tokens(static_cast<size_t>(end - start));
          const int64_t valid = moe_ext::core::build_routing_layout(ids.data(), tokens, topk, experts, map_ptr,
                                                                    start, end, false, expected_idx.data(),
                                                                    expected_tokens.data());
          const auto stream = ascend::plan_stream_tiling(rows, 8, (end - start) * 8 + 1024, 3, kVectorCores, ub);
          auto words = ascend::kernel_tiling_words(stream.split, stream.elements_per_tile, rows, start, end, experts);
          std::vector<int64_t> workspace(static_cast<size_t>(stream.split.blocks * (end - start)), -3);
          std::vector<int32_t> row_idx(static_cast<size_t>(rows), 555);
          std::vector<int64_t> expert_tokens(static_cast<size_t>(end - start), -3);
          GM_ADDR map_gm = mode == 2 ? gm(map.data()) : nullptr;
          AscendC::twin::launch(stream.split.blocks, ub, [&] {
            moe_ext_permute_key_count_i64_m32(gm(ids.data()), map_gm, gm(workspace.data()), gm(words.data()));
          });
          AscendC::twin::launch(1, ub, [&] {
            moe_ext_permute_scan(gm(workspace.data()), gm(expert_tokens.data()), gm(words.data()), 0);
          });
          AscendC::twin::launch(stream.split.blocks, ub, [&] {
            moe_ext_permute_place_i64_m32(gm(ids.data()), map_gm, gm(workspace.data()), gm(row_idx.data()),
                                          gm(words.data()));
          });
          ASSERT_EQ(row_idx, expected_idx) << tokens << "x" << topk << " ids, " << experts << " experts, mode " << mode;
          ASSERT_EQ(expert_tokens, expected_tokens);
          // the row copy: permuted[p] = hidden[token of p] for p < valid, rows past valid untouched
          std::vector<float> hidden_states(static_cast<size_t>(tokens * hidden));
          for (auto& value : hidden_states) value = static_cast<float>(rng() % 100);
          std::vector<float> permuted(static_cast<size_t>(rows * hidden), -1.0f);
          if (tokens > 0) {
            const auto row_tiling = ascend::plan_row_tiling(tokens, hidden * 4, 0, 1, 2, kVectorCores, ub);
            auto row_words = ascend::kernel_tiling_words(row_tiling.split, row_tiling.rows_per_tile, hidden,
                                                         row_tiling.row_stride_ub / 4, rows, topk);
            AscendC::twin::launch(row_tiling.split.blocks, ub, [&] {
              moe_ext_permute_rows_b4(gm(hidden_states.data()), gm(row_idx.data()), gm(permuted.data()),
                                      gm(row_words.data()), tokens);
            });
          }
          for (int64_t f = 0; f < rows; ++f) {
            const int32_t p = expected_idx[f];
            if (p < 0) continue;
            for (int64_t c = 0; c < hidden; ++c)
              ASSERT_EQ(permuted[static_cast<size_t>(p * hidden + c)],
                        hidden_states[static_cast<size_t>((f / topk) * hidden + c)]);
          }
          for (size_t i = static_cast<size_t>(valid * hidden); i < permuted.size(); ++i) ASSERT_EQ(permuted[i], -1.0f);
        }
      }
    }
  }
}

TEST(AscendKernels, MoePermuteDropsNoExpertIdsAndRefusesOthers) {
  std::vector<int64_t> ids{2, -1, 0, 5};
  const auto stream = ascend::plan_stream_tiling(4, 8, 1024, 3, kVectorCores, 16 * 1024);
  auto words = ascend::kernel_tiling_words(stream.split, stream.elements_per_tile, 4, 0, 4, 4);
  std::vector<int64_t> workspace(static_cast<size_t>(stream.split.blocks * 4));
  EXPECT_THROW(AscendC::twin::launch(stream.split.blocks, 16 * 1024, [&] {
                 moe_ext_permute_key_count_i64_m32(gm(ids.data()), nullptr, gm(workspace.data()), gm(words.data()));
               }),
               RuleViolation);  // id 5 >= num_experts = 4
  ids[3] = 3;
  EXPECT_NO_THROW(AscendC::twin::launch(stream.split.blocks, 16 * 1024, [&] {
    moe_ext_permute_key_count_i64_m32(gm(ids.data()), nullptr, gm(workspace.data()), gm(words.data()));
  }));
  EXPECT_EQ(workspace, (std::vector<int64_t>{1, 0, 1, 1}));  // the -1 is not counted
}

// ---------------------------------------------------------------- the twin's rules

TEST(AscendTwin, EnforcesTheDocumentedRules) {
  std::vector<float> gm_data(64, 1.0f);
  auto run = [&](auto body) { AscendC::twin::launch(1, 1024, body); };
  // R2: DataCopy moves whole 32-byte units
  EXPECT_THROW(run([&] {
                 AscendC::TPipe pipe;
                 AscendC::TBuf<AscendC::TPosition::VECCALC> buffer;
                 pipe.InitBuffer(buffer, 64);
                 AscendC::GlobalTensor<float> src;
                 src.SetGlobalBuffer(gm_data.data(), 64);
                 AscendC::DataCopy(buffer.Get<float>(), src, 3);
               }),
               RuleViolation);
  // R1: a UB operand at a 4-byte offset
  EXPECT_THROW(run([&] {
                 AscendC::TPipe pipe;
                 AscendC::TBuf<AscendC::TPosition::VECCALC> buffer;
                 pipe.InitBuffer(buffer, 128);
                 AscendC::Duplicate(buffer.Get<float>()[1], 0.0f, 8);
               }),
               RuleViolation);
  // R3: more UB than the core has
  EXPECT_THROW(run([&] {
                 AscendC::TPipe pipe;
                 AscendC::TQue<AscendC::TPosition::VECIN, 2> queue;
                 pipe.InitBuffer(queue, 2, 600);
               }),
               RuleViolation);
  // R4: a third tensor enqueued on a depth-2 queue, and allocating past InitBuffer's num
  EXPECT_THROW(run([&] {
                 AscendC::TPipe pipe;
                 AscendC::TQue<AscendC::TPosition::VECIN, 1> queue;
                 pipe.InitBuffer(queue, 2, 64);
                 queue.EnQue(queue.AllocTensor<float>());
                 queue.EnQue(queue.AllocTensor<float>());
               }),
               RuleViolation);
  EXPECT_THROW(run([&] {
                 AscendC::TPipe pipe;
                 AscendC::TQue<AscendC::TPosition::VECIN, 2> queue;
                 pipe.InitBuffer(queue, 1, 64);
                 auto a = queue.AllocTensor<float>();
                 auto b = queue.AllocTensor<float>();
                 (void)a;
                 (void)b;
               }),
               RuleViolation);
  // R5: reading past a GlobalTensor
  EXPECT_THROW(run([&] {
                 AscendC::GlobalTensor<float> src;
                 src.SetGlobalBuffer(gm_data.data(), 64);
                 (void)src.GetValue(64);
               }),
               RuleViolation);
  // and a legal sequence passes
  EXPECT_NO_THROW(run([&] {
    AscendC::TPipe pipe;
    AscendC::TQue<AscendC::TPosition::VECIN, 2> queue;
    pipe.InitBuffer(queue, 2, 256);
    AscendC::GlobalTensor<float> src;
    src.SetGlobalBuffer(gm_data.data(), 64);
    auto tile = queue.AllocTensor<float>();
    AscendC::DataCopy(tile, src, 64);
    queue.EnQue(tile);
    tile = queue.DeQue<float>();
    queue.FreeTensor(tile);
  }));
}
