// The launch plans of csrc/core/ascend/launch_plan.h executed on the host twin
// of the AscendC API, launch by launch, each with exactly the UB the plan
// budgets (so a plan that under-budgets fails rule R3): scatter_rows, the
// moe_unpermute forward and backward in fp32 / fp16 / bf16 with fp32 or
// same-dtype probs, gather_rows, expert_histogram, moe_permute and
// generate_permute_indices, against the CPU contracts on random and edge
// shapes; the plans' argument checks; the twin's Cast (R7) and ReduceSum (R8).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/ascend/launch_plan.h"
#include "core/permute_indices.h"
#include "core/routing_layout.h"
#include "kernel_operator.h"

namespace ascend = moe_ext::core::ascend;
using AscendC::twin::RuleViolation;
using ascend::Dtype;
using ascend::TensorDesc;

// ---------------------------------------------------------------- the entry table
// Every entry point of csrc/ascend/routing_kernels.cpp a plan may name, by launch group: a plan
// naming a kernel that does not exist fails the lookup.
using GatherFn = void (*)(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
using UnpermuteFn = void (*)(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
using BackwardFn = void (*)(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
using InverseFn = void (*)(GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
using Stream3Fn = void (*)(GM_ADDR, GM_ADDR, GM_ADDR);
using KeyCountFn = void (*)(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);
using PlaceFn = void (*)(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);
using RowsFn = void (*)(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
using IndicesFn = void (*)(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);

#define DECLARE_GATHER(N) void N(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
#define DECLARE_UNPERMUTE(S)                                                        \
  void moe_ext_unpermute_##S(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t); \
  void moe_ext_unpermute_backward_##S(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
#define DECLARE_PERMUTE(S)                                                      \
  void moe_ext_permute_key_count_##S(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);       \
  void moe_ext_permute_place_##S(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);
extern "C" {
DECLARE_GATHER(moe_ext_gather_rows_b2_i32)
DECLARE_GATHER(moe_ext_gather_rows_b2_i64)
DECLARE_GATHER(moe_ext_gather_rows_b4_i32)
DECLARE_GATHER(moe_ext_gather_rows_b4_i64)
DECLARE_GATHER(moe_ext_gather_rows_b8_i32)
DECLARE_GATHER(moe_ext_gather_rows_b8_i64)
DECLARE_UNPERMUTE(f32_pf32_i32)
DECLARE_UNPERMUTE(f32_pf32_i64)
DECLARE_UNPERMUTE(f16_pf32_i32)
DECLARE_UNPERMUTE(f16_pf32_i64)
DECLARE_UNPERMUTE(f16_pf16_i32)
DECLARE_UNPERMUTE(f16_pf16_i64)
DECLARE_UNPERMUTE(bf16_pf32_i32)
DECLARE_UNPERMUTE(bf16_pf32_i64)
DECLARE_UNPERMUTE(bf16_pbf16_i32)
DECLARE_UNPERMUTE(bf16_pbf16_i64)
void moe_ext_fill_b2(GM_ADDR, GM_ADDR);
void moe_ext_inverse_build_i32(GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_inverse_build_i64(GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_zero_unnamed_rows(GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_expert_histogram_partial_i32(GM_ADDR, GM_ADDR, GM_ADDR);
void moe_ext_expert_histogram_partial_i64(GM_ADDR, GM_ADDR, GM_ADDR);
void moe_ext_expert_histogram_reduce(GM_ADDR, GM_ADDR, GM_ADDR);
DECLARE_PERMUTE(i32_m32)
DECLARE_PERMUTE(i32_m64)
DECLARE_PERMUTE(i64_m32)
DECLARE_PERMUTE(i64_m64)
void moe_ext_permute_scan(GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_permute_rows_b2(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_permute_rows_b4(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_permute_rows_b8(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, int64_t);
void moe_ext_generate_permute_indices_i32(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);
void moe_ext_generate_permute_indices_i64(GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR, GM_ADDR);
}

namespace {

#define ENTRY(N) {#N, &N}
#define UNPERMUTE_PAIR(S) {"moe_ext_unpermute_" #S, &moe_ext_unpermute_##S}
#define BACKWARD_PAIR(S) {"moe_ext_unpermute_backward_" #S, &moe_ext_unpermute_backward_##S}

const std::map<std::string, GatherFn> kGather = {
    ENTRY(moe_ext_gather_rows_b2_i32), ENTRY(moe_ext_gather_rows_b2_i64), ENTRY(moe_ext_gather_rows_b4_i32),
    ENTRY(moe_ext_gather_rows_b4_i64), ENTRY(moe_ext_gather_rows_b8_i32), ENTRY(moe_ext_gather_rows_b8_i64)};
const std::map<std::string, UnpermuteFn> kUnpermute = {
    UNPERMUTE_PAIR(f32_pf32_i32), UNPERMUTE_PAIR(f32_pf32_i64), UNPERMUTE_PAIR(f16_pf32_i32),
    UNPERMUTE_PAIR(f16_pf32_i64), UNPERMUTE_PAIR(f16_pf16_i32), UNPERMUTE_PAIR(f16_pf16_i64),
    UNPERMUTE_PAIR(bf16_pf32_i32), UNPERMUTE_PAIR(bf16_pf32_i64), UNPERMUTE_PAIR(bf16_pbf16_i32),
    UNPERMUTE_PAIR(bf16_pbf16_i64)};
const std::map<std::string, BackwardFn> kBackward = {
    BACKWARD_PAIR(f32_pf32_i32), BACKWARD_PAIR(f32_pf32_i64), BACKWARD_PAIR(f16_pf32_i32),
    BACKWARD_PAIR(f16_pf32_i64), BACKWARD_PAIR(f16_pf16_i32), BACKWARD_PAIR(f16_pf16_i64),
    BACKWARD_PAIR(bf16_pf32_i32), BACKWARD_PAIR(bf16_pf32_i64), BACKWARD_PAIR(bf16_pbf16_i32),
    BACKWARD_PAIR(bf16_pbf16_i64)};
const std::map<std::string, InverseFn> kInverse = {ENTRY(moe_ext_inverse_build_i32),
                                                   ENTRY(moe_ext_inverse_build_i64)};
const std::map<std::string, Stream3Fn> kHistogram = {ENTRY(moe_ext_expert_histogram_partial_i32),
                                                     ENTRY(moe_ext_expert_histogram_partial_i64),
                                                     ENTRY(moe_ext_expert_histogram_reduce)};
const std::map<std::string, KeyCountFn> kKeyCount = {
    ENTRY(moe_ext_permute_key_count_i32_m32), ENTRY(moe_ext_permute_key_count_i32_m64),
    ENTRY(moe_ext_permute_key_count_i64_m32), ENTRY(moe_ext_permute_key_count_i64_m64)};
const std::map<std::string, PlaceFn> kPlace = {ENTRY(moe_ext_permute_place_i32_m32), ENTRY(moe_ext_permute_place_i32_m64),
                                               ENTRY(moe_ext_permute_place_i64_m32), ENTRY(moe_ext_permute_place_i64_m64)};
const std::map<std::string, RowsFn> kRows = {ENTRY(moe_ext_permute_rows_b2), ENTRY(moe_ext_permute_rows_b4),
                                             ENTRY(moe_ext_permute_rows_b8)};
const std::map<std::string, IndicesFn> kIndices = {ENTRY(moe_ext_generate_permute_indices_i32),
                                                   ENTRY(moe_ext_generate_permute_indices_i64)};

template <typename Fn>
Fn lookup(const std::map<std::string, Fn>& table, const std::string& name) {
  const auto it = table.find(name);
  if (it == table.end()) throw std::runtime_error("the plan names a kernel that does not exist: " + name);
  return it->second;
}

template <typename T>
GM_ADDR gm(T* pointer) {
  return reinterpret_cast<GM_ADDR>(pointer);
}
template <typename T>
GM_ADDR gm(std::vector<T>& v) {
  return reinterpret_cast<GM_ADDR>(v.data());
}

// Runs one launch of a plan on the twin: its blocks, exactly its UB budget, its words.
template <typename Body>
void run(const ascend::Launch& launch, Body&& body) {
  ASSERT_GT(launch.blocks, 0);
  ascend::KernelTilingWords words = launch.words;
  AscendC::twin::launch(launch.blocks, launch.ub_bytes, [&] { body(gm(words.data())); });
}

const ascend::AscendTarget kA2{};
const ascend::AscendTarget kSmallUb{40, 16 * 1024};  // many tiles

// ---------------------------------------------------------------- independent float references
// bf16: the nearest of the two neighbours (ties to the even one), by comparing distances in double.
uint16_t ref_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint32_t lo = bits & 0xFFFF0000u, hi = lo + 0x10000u;
  float flo, fhi;
  std::memcpy(&flo, &lo, 4);
  std::memcpy(&fhi, &hi, 4);
  const double dlo = std::fabs(double(value) - double(flo)), dhi = std::fabs(double(fhi) - double(value));
  if (dlo < dhi) return static_cast<uint16_t>(lo >> 16);
  if (dhi < dlo) return static_cast<uint16_t>(hi >> 16);
  return static_cast<uint16_t>(((lo >> 16) & 1u) == 0 ? lo >> 16 : hi >> 16);
}
float bf16_value(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, 4);
  return out;
}
uint16_t ref_half(float value) {
  const _Float16 h = static_cast<_Float16>(value);  // the compiler's IEEE conversion, round to nearest even
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
float half_value(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

// A float element type of a test: its storage, widening and narrowing.
struct FloatKind {
  Dtype dtype;
  int64_t bytes;
  float (*widen)(const uint8_t*);
  void (*narrow)(float, uint8_t*);
};
const FloatKind kF32{Dtype::kFloat32, 4, [](const uint8_t* p) { float f; std::memcpy(&f, p, 4); return f; },
                     [](float f, uint8_t* p) { std::memcpy(p, &f, 4); }};
const FloatKind kF16{Dtype::kFloat16, 2, [](const uint8_t* p) { uint16_t b; std::memcpy(&b, p, 2); return half_value(b); },
                     [](float f, uint8_t* p) { const uint16_t b = ref_half(f); std::memcpy(p, &b, 2); }};
const FloatKind kBF16{Dtype::kBFloat16, 2,
                      [](const uint8_t* p) { uint16_t b; std::memcpy(&b, p, 2); return bf16_value(b); },
                      [](float f, uint8_t* p) { const uint16_t b = ref_bf16(f); std::memcpy(p, &b, 2); }};

// A buffer of `count` elements of a kind, filled with random values representable in it.
std::vector<uint8_t> random_floats(const FloatKind& kind, int64_t count, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  std::vector<uint8_t> out(static_cast<size_t>(count * kind.bytes));
  for (int64_t i = 0; i < count; ++i) kind.narrow(uniform(rng), out.data() + i * kind.bytes);
  return out;
}

std::vector<int64_t> random_row_idx(int64_t rows, int64_t source_rows, std::mt19937_64& rng, bool unique) {
  std::vector<int64_t> perm(static_cast<size_t>(source_rows));
  for (int64_t i = 0; i < source_rows; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int64_t> out(static_cast<size_t>(rows));
  for (int64_t f = 0; f < rows; ++f) {
    if (rng() % 4 == 0 || (unique && f >= source_rows) || source_rows == 0) {
      out[f] = -1;
    } else {
      out[f] = unique ? perm[f] : static_cast<int64_t>(rng() % source_rows);
    }
  }
  return out;
}

template <typename IndexT>
std::vector<IndexT> narrow_index(const std::vector<int64_t>& v) {
  return std::vector<IndexT>(v.begin(), v.end());
}

}  // namespace

// ---------------------------------------------------------------- scatter_rows

namespace {

template <typename IndexT>
void run_scatter(const ascend::ScatterRowsPlan& plan, std::vector<uint8_t>& x, std::vector<IndexT>& indices,
                 std::vector<uint8_t>& out) {
  std::vector<int32_t> inverse(static_cast<size_t>(plan.out_rows), 777);
  if (plan.inverse.build.blocks > 0)
    run(plan.inverse.build, [&](GM_ADDR w) { lookup(kInverse, plan.inverse.build.kernel)(gm(indices), gm(inverse), w, 0); });
  if (plan.gather.blocks > 0)
    run(plan.gather, [&](GM_ADDR w) { lookup(kGather, plan.gather.kernel)(gm(x), gm(inverse), gm(out), w, plan.out_rows); });
}

template <typename IndexT>
void check_scatter(std::mt19937_64& rng, int64_t count, int64_t num_rows, int64_t hidden, Dtype dtype,
                   const ascend::AscendTarget& target) {
  const int64_t elem = ascend::dtype_bytes(dtype);
  std::vector<uint8_t> x(static_cast<size_t>(count * hidden * elem));
  for (auto& b : x) b = static_cast<uint8_t>(rng());
  std::vector<IndexT> indices = narrow_index<IndexT>(random_row_idx(count, num_rows, rng, true));
  const TensorDesc xd{dtype, {count, hidden}}, id{sizeof(IndexT) == 8 ? Dtype::kInt64 : Dtype::kInt32, {count}};
  const auto plan = ascend::plan_scatter_rows(xd, id, num_rows, target);
  std::vector<uint8_t> out(static_cast<size_t>(num_rows * hidden * elem), 0xEE);
  run_scatter(plan, x, indices, out);
  std::vector<uint8_t> expected(out.size(), 0);
  const size_t row = static_cast<size_t>(hidden * elem);
  for (int64_t p = 0; p < count; ++p)
    if (indices[p] >= 0) std::memcpy(expected.data() + indices[p] * row, x.data() + p * row, row);
  ASSERT_EQ(out, expected) << count << " rows -> " << num_rows << " of " << hidden << " x " << elem << " bytes";
}

}  // namespace

TEST(AscendPlans, ScatterRowsMatchesTheContract) {
  std::mt19937_64 rng(11);
  for (Dtype dtype : {Dtype::kFloat32, Dtype::kBFloat16, Dtype::kFloat64}) {
    for (auto shape : {std::pair<int64_t, int64_t>{0, 0}, {0, 5}, {3, 0}, {1, 1}, {40, 40}, {37, 90}, {200, 150}}) {
      for (int64_t hidden : {1, 7, 64, 600}) {
        check_scatter<int32_t>(rng, shape.first, shape.second, hidden, dtype, kSmallUb);
        check_scatter<int64_t>(rng, shape.first, shape.second, hidden, dtype, kA2);
      }
    }
  }
  // a tiny target: the inverse in 8 chunks of 128 rows over 3 cores, several chunks per core
  const ascend::AscendTarget tiny{3, 1024};
  check_scatter<int32_t>(rng, 900, 1000, 3, Dtype::kFloat32, tiny);
  check_scatter<int64_t>(rng, 1000, 1000, 5, Dtype::kFloat16, tiny);
  const auto plan = ascend::plan_scatter_rows({Dtype::kFloat32, {900, 3}}, {Dtype::kInt32, {900}}, 1000, tiny);
  EXPECT_EQ(plan.inverse.chunk, 128);
  EXPECT_EQ(plan.inverse.build.blocks, 3);
}

TEST(AscendPlans, ScatterRowsRefusesARowNamedTwiceAndIndicesOutOfRange) {
  std::vector<uint8_t> x(4 * 8 * 4, 1);
  const TensorDesc xd{Dtype::kFloat32, {4, 8}}, id{Dtype::kInt32, {4}};
  const auto plan = ascend::plan_scatter_rows(xd, id, 6, kA2);
  std::vector<uint8_t> out(6 * 8 * 4);
  std::vector<int32_t> twice{0, 3, -1, 3};
  try {
    run_scatter(plan, x, twice, out);
    FAIL() << "a row named twice was accepted";
  } catch (const RuleViolation& error) {
    EXPECT_NE(std::string(error.what()).find("names a row twice"), std::string::npos) << error.what();
  }
  std::vector<int32_t> outside{0, 6, -1, 2};
  EXPECT_THROW(run_scatter(plan, x, outside, out), RuleViolation);
  std::vector<int32_t> below{0, -2, 1, 2};
  EXPECT_THROW(run_scatter(plan, x, below, out), RuleViolation);
}

// ---------------------------------------------------------------- moe_unpermute forward / backward

namespace {

struct UnpermuteCase {
  const FloatKind* rows;
  const FloatKind* probs;  // nullptr: no probs
  bool index64;
};

template <typename IndexT>
void check_unpermute_case(const UnpermuteCase& c, std::mt19937_64& rng, int64_t tokens, int64_t topk, int64_t hidden,
                          bool compute_grad_probs, const ascend::AscendTarget& target) {
  const FloatKind& kind = *c.rows;
  const int64_t rows = tokens * topk + 3;  // a few rows no index names
  auto permuted = random_floats(kind, rows * hidden, rng);
  auto grad_out = random_floats(kind, tokens * hidden, rng);
  const auto idx64 = random_row_idx(tokens * topk, rows, rng, true);
  auto row_idx = narrow_index<IndexT>(idx64);
  std::vector<uint8_t> probs;
  if (c.probs) probs = random_floats(*c.probs, tokens * topk, rng);
  const TensorDesc pd{kind.dtype, {rows, hidden}}, id{c.index64 ? Dtype::kInt64 : Dtype::kInt32, {tokens * topk}};
  TensorDesc probs_d;
  if (c.probs) probs_d = TensorDesc{c.probs->dtype, {tokens, topk}};
  const TensorDesc* probs_ptr = c.probs ? &probs_d : nullptr;
  auto weight = [&](int64_t f) { return c.probs ? c.probs->widen(probs.data() + f * c.probs->bytes) : 1.0f; };
  auto value = [&](const std::vector<uint8_t>& buf, int64_t i) { return kind.widen(buf.data() + i * kind.bytes); };
  const std::string what = std::to_string(tokens) + "x" + std::to_string(topk) + " H=" + std::to_string(hidden) +
                           " " + ascend::dtype_name(kind.dtype) + " probs " +
                           (c.probs ? ascend::dtype_name(c.probs->dtype) : "none");

  // forward: bit for bit the CPU kernel's ordered float sum, narrowed once
  const auto plan = ascend::plan_moe_unpermute(pd, id, probs_ptr, topk, target);
  std::vector<uint8_t> out(static_cast<size_t>(tokens * hidden * kind.bytes), 0xEE);
  if (plan.unpermute.blocks > 0)
    run(plan.unpermute, [&](GM_ADDR w) {
      lookup(kUnpermute, plan.unpermute.kernel)(gm(permuted), gm(row_idx), c.probs ? gm(probs) : nullptr, gm(out), w,
                                                tokens);
    });
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < hidden; ++h) {
      float sum = 0.0f;
      for (int64_t k = 0; k < topk; ++k) {
        const int64_t r = idx64[t * topk + k];
        if (r >= 0) sum += weight(t * topk + k) * value(permuted, r * hidden + h);
      }
      std::vector<uint8_t> expected(static_cast<size_t>(kind.bytes));
      kind.narrow(sum, expected.data());
      ASSERT_EQ(0, std::memcmp(expected.data(), out.data() + (t * hidden + h) * kind.bytes, kind.bytes))
          << "forward " << what << " token " << t << " col " << h;
    }
  }

  // backward
  const TensorDesc gd{kind.dtype, {tokens, hidden}};
  const auto back = ascend::plan_moe_unpermute_backward(gd, pd, id, probs_ptr, topk, compute_grad_probs, target);
  std::vector<uint8_t> grad_permuted(static_cast<size_t>(rows * hidden * kind.bytes), 0xEE);
  std::vector<uint8_t> grad_probs(c.probs ? static_cast<size_t>(tokens * topk * c.probs->bytes) : 0, 0xEE);
  std::vector<int32_t> inverse(static_cast<size_t>(rows), 777);
  if (back.inverse.build.blocks > 0)
    run(back.inverse.build, [&](GM_ADDR w) { lookup(kInverse, back.inverse.build.kernel)(gm(row_idx), gm(inverse), w, 1); });
  if (back.backward.blocks > 0)
    run(back.backward, [&](GM_ADDR w) {
      lookup(kBackward, back.backward.kernel)(gm(grad_out), gm(permuted), gm(row_idx), c.probs ? gm(probs) : nullptr,
                                              gm(grad_permuted), back.grad_probs_computed ? gm(grad_probs) : nullptr,
                                              w, tokens);
    });
  if (back.zero_rows.blocks > 0)
    run(back.zero_rows, [&](GM_ADDR w) { moe_ext_zero_unnamed_rows(gm(grad_permuted), gm(inverse), w, rows); });
  if (back.zero_grad_probs_needed) run(back.zero_grad_probs, [&](GM_ADDR w) { moe_ext_fill_b2(gm(grad_probs), w); });
  std::vector<uint8_t> expected_gp(grad_permuted.size(), 0);
  for (int64_t f = 0; f < tokens * topk; ++f) {
    const int64_t r = idx64[f];
    if (r < 0) continue;
    for (int64_t h = 0; h < hidden; ++h)
      kind.narrow(weight(f) * value(grad_out, (f / topk) * hidden + h), expected_gp.data() + (r * hidden + h) * kind.bytes);
  }
  ASSERT_EQ(grad_permuted, expected_gp) << "grad_permuted " << what;
  if (!c.probs) return;
  for (int64_t f = 0; f < tokens * topk; ++f) {
    const float got = c.probs->widen(grad_probs.data() + f * c.probs->bytes);
    const int64_t r = idx64[f];
    if (!compute_grad_probs || r < 0) {
      ASSERT_EQ(got, 0.0f) << "grad_probs " << what << " at " << f;
      continue;
    }
    float dot = 0.0f, magnitude = 0.0f;  // the CPU kernel's sequential float dot
    for (int64_t h = 0; h < hidden; ++h) {
      const float term = value(grad_out, (f / topk) * hidden + h) * value(permuted, r * hidden + h);
      dot += term;
      magnitude += std::fabs(term);
    }
    // ReduceSum adds in the A2 order (twin rule R8), then the result is narrowed to P
    const float narrowing = c.probs->dtype == Dtype::kFloat32 ? 0.0f
                            : c.probs->dtype == Dtype::kBFloat16 ? std::ldexp(std::fabs(dot), -8)
                                                                 : std::ldexp(std::fabs(dot), -11);
    ASSERT_NEAR(got, dot, 1e-5f * magnitude + narrowing + 1e-30f) << "grad_probs " << what << " at " << f;
  }
}

}  // namespace

TEST(AscendPlans, UnpermuteForwardAndBackwardMatchTheCpuContract) {
  std::mt19937_64 rng(12);
  const std::vector<UnpermuteCase> cases = {
      {&kF32, &kF32, false}, {&kF32, nullptr, true},   {&kF16, &kF32, false}, {&kF16, &kF16, true},
      {&kBF16, &kF32, true}, {&kBF16, &kBF16, false}, {&kBF16, nullptr, false}, {&kF16, nullptr, true}};
  for (const auto& c : cases) {
    for (auto shape : {std::pair<int64_t, int64_t>{0, 1}, {1, 1}, {5, 2}, {33, 8}}) {
      for (int64_t hidden : {1, 17, 64, 129}) {
        for (bool compute : {true, false}) {
          if (c.index64) {
            check_unpermute_case<int64_t>(c, rng, shape.first, shape.second, hidden, compute, kA2);
          } else {
            check_unpermute_case<int32_t>(c, rng, shape.first, shape.second, hidden, compute, kA2);
          }
        }
      }
    }
  }
  // a model-sized row on the A2 budget, and one that only fits a large UB
  check_unpermute_case<int32_t>({&kBF16, &kF32, false}, rng, 3, 8, 7168, true, kA2);
  check_unpermute_case<int64_t>({&kF32, &kF32, true}, rng, 2, 2, 5000, true, kA2);
}

TEST(AscendPlans, UnpermuteBackwardRefusesARowNamedTwice) {
  std::vector<float> permuted(4 * 8, 1.0f), grad(2 * 8, 1.0f), probs(4, 0.5f), gp(4 * 8), gprobs(4);
  std::vector<int32_t> row_idx{0, 2, 2, 1}, inverse(4);
  const TensorDesc pd{Dtype::kFloat32, {4, 8}}, id{Dtype::kInt32, {4}}, gd{Dtype::kFloat32, {2, 8}},
      prd{Dtype::kFloat32, {2, 2}};
  const auto back = ascend::plan_moe_unpermute_backward(gd, pd, id, &prd, 2, true, kA2);
  try {
    run(back.inverse.build, [&](GM_ADDR w) { lookup(kInverse, back.inverse.build.kernel)(gm(row_idx), gm(inverse), w, 1); });
    FAIL() << "a row named twice was accepted";
  } catch (const RuleViolation& error) {
    EXPECT_NE(std::string(error.what()).find("moe_unpermute_backward: expanded_row_idx names a row twice"),
              std::string::npos)
        << error.what();
  }
}

// ---------------------------------------------------------------- the other ops through their plans

TEST(AscendPlans, GatherHistogramPermuteAndIndicesRunFromTheirPlans) {
  std::mt19937_64 rng(13);
  // gather_rows, bf16 rows, int64 indices
  for (int64_t count : {0, 1, 50}) {
    const int64_t source = 20, hidden = 33;
    std::vector<uint16_t> x(static_cast<size_t>(source * hidden));
    for (auto& v : x) v = static_cast<uint16_t>(rng());
    auto idx = random_row_idx(count, source, rng, false);
    const auto plan = ascend::plan_gather_rows({Dtype::kBFloat16, {source, hidden}}, {Dtype::kInt64, {count}}, kSmallUb);
    std::vector<uint16_t> out(static_cast<size_t>(count * hidden), 0xEEEE);
    for (const auto& launch : plan.launches())
      run(launch, [&](GM_ADDR w) { lookup(kGather, launch.kernel)(gm(x), gm(idx), gm(out), w, count); });
    for (int64_t p = 0; p < count; ++p)
      for (int64_t h = 0; h < hidden; ++h)
        ASSERT_EQ(out[p * hidden + h], idx[p] < 0 ? 0 : x[idx[p] * hidden + h]);
  }
  // expert_histogram
  for (int64_t experts : {1, 300}) {
    for (int64_t count : {0, 5000}) {
      std::vector<int32_t> ids(static_cast<size_t>(count));
      for (auto& id : ids) id = static_cast<int32_t>(static_cast<int64_t>(rng() % (experts + 2)) - 1);
      const auto plan = ascend::plan_expert_histogram({Dtype::kInt32, {count}}, experts, kA2);
      std::vector<int64_t> workspace(static_cast<size_t>(plan.workspace_elements), -5), counts(experts, -5),
          expected(experts);
      run(plan.partial, [&](GM_ADDR w) { lookup(kHistogram, plan.partial.kernel)(gm(ids), gm(workspace), w); });
      run(plan.reduce, [&](GM_ADDR w) { lookup(kHistogram, plan.reduce.kernel)(gm(workspace), gm(counts), w); });
      moe_ext::core::expert_histogram(ids.data(), count, experts, expected.data());
      ASSERT_EQ(counts, expected);
    }
  }
  // moe_permute with an expert map (int64 ids, int64 map, fp16 rows)
  for (int64_t tokens : {0, 70}) {
    const int64_t topk = 4, experts = 16, hidden = 24;
    std::vector<int64_t> ids(static_cast<size_t>(tokens * topk)), map(experts);
    for (auto& id : ids) id = static_cast<int64_t>(rng() % experts);
    int64_t next = 0;
    for (auto& m : map) m = rng() % 3 ? next++ : -1;
    const int64_t start = 1, end = std::max<int64_t>(start, next - 1);
    std::vector<int32_t> expected_idx(ids.size());
    std::vector<int64_t> expected_tokens(static_cast<size_t>(end - start));
    const int64_t valid = moe_ext::core::build_routing_layout(ids.data(), tokens, topk, experts, map.data(), start, end,
                                                              true, expected_idx.data(), expected_tokens.data());
    const TensorDesc map_d{Dtype::kInt64, {experts}};
    const auto plan = ascend::plan_moe_permute({Dtype::kFloat16, {tokens, hidden}}, {Dtype::kInt64, {tokens, topk}},
                                               experts, start, end, &map_d, kSmallUb);
    std::vector<uint16_t> hidden_states(static_cast<size_t>(tokens * hidden));
    for (auto& v : hidden_states) v = static_cast<uint16_t>(rng());
    std::vector<int64_t> workspace(static_cast<size_t>(plan.workspace_elements), -3), expert_tokens(end - start, -3);
    std::vector<int32_t> row_idx(ids.size(), 555);
    std::vector<uint16_t> permuted(static_cast<size_t>(tokens * topk * hidden), 0xEEEE);
    run(plan.key_count, [&](GM_ADDR w) { lookup(kKeyCount, plan.key_count.kernel)(gm(ids), gm(map), gm(workspace), w); });
    run(plan.scan, [&](GM_ADDR w) { moe_ext_permute_scan(gm(workspace), gm(expert_tokens), w, 1); });
    run(plan.place, [&](GM_ADDR w) {
      lookup(kPlace, plan.place.kernel)(gm(ids), gm(map), gm(workspace), gm(row_idx), w);
    });
    if (plan.row_copy.blocks > 0)
      run(plan.row_copy, [&](GM_ADDR w) {
        lookup(kRows, plan.row_copy.kernel)(gm(hidden_states), gm(row_idx), gm(permuted), w, tokens);
      });
    ASSERT_EQ(row_idx, expected_idx);
    ASSERT_EQ(expert_tokens, expected_tokens);
    for (size_t i = static_cast<size_t>(valid * hidden); i < permuted.size(); ++i) ASSERT_EQ(permuted[i], 0xEEEE);
    for (size_t f = 0; f < ids.size(); ++f) {
      if (expected_idx[f] < 0) continue;
      for (int64_t h = 0; h < hidden; ++h) {
        ASSERT_EQ(permuted[expected_idx[f] * hidden + h], hidden_states[(f / topk) * hidden + h]);
      }
    }
  }
  // generate_permute_indices
  {
    const int64_t experts = 6, ranks = 4, alignment = 8;
    std::vector<int32_t> counts(experts * ranks);
    int64_t total = 0;
    for (auto& c : counts) total += (c = static_cast<int32_t>(rng() % 30));
    const int64_t max_len = total + experts * alignment;
    const auto plan =
        ascend::plan_generate_permute_indices({Dtype::kInt32, {experts * ranks}}, experts, ranks, max_len, alignment, kA2);
    std::vector<int32_t> got(max_len, 9), sizes(experts, 9), offsets(experts, 9), e_got(max_len), e_sizes(experts),
        e_offsets(experts);
    run(plan.launch, [&](GM_ADDR w) {
      lookup(kIndices, plan.launch.kernel)(gm(counts), gm(got), gm(sizes), gm(offsets), w);
    });
    moe_ext::core::generate_permute_indices(counts.data(), experts, ranks, max_len, alignment, e_got.data(),
                                            e_sizes.data(), e_offsets.data());
    EXPECT_EQ(got, e_got);
    EXPECT_EQ(sizes, e_sizes);
    EXPECT_EQ(offsets, e_offsets);
  }
}

TEST(AscendPlans, RefuseBadArgumentsClearly) {
  const TensorDesc rows{Dtype::kFloat32, {4, 8}}, idx{Dtype::kInt32, {4}};
  EXPECT_THROW(ascend::plan_gather_rows({Dtype::kOther, {4, 8}}, idx, kA2), ascend::PlanTypeError);
  EXPECT_THROW(ascend::plan_gather_rows(rows, {Dtype::kFloat32, {4}}, kA2), ascend::PlanTypeError);
  EXPECT_THROW(ascend::plan_gather_rows({Dtype::kFloat32, {4}}, idx, kA2), std::invalid_argument);
  EXPECT_THROW(ascend::plan_scatter_rows(rows, {Dtype::kInt32, {3}}, 4, kA2), std::invalid_argument);
  EXPECT_THROW(ascend::plan_scatter_rows(rows, idx, -1, kA2), std::invalid_argument);
  EXPECT_THROW(ascend::plan_moe_unpermute({Dtype::kFloat64, {4, 8}}, idx, nullptr, 2, kA2), ascend::PlanTypeError);
  EXPECT_THROW(ascend::plan_moe_unpermute(rows, idx, nullptr, 3, kA2), std::invalid_argument);
  const TensorDesc bad_probs{Dtype::kFloat16, {2, 2}};
  EXPECT_THROW(ascend::plan_moe_unpermute(rows, idx, &bad_probs, 2, kA2), ascend::PlanTypeError);
  try {
    ascend::plan_moe_unpermute({Dtype::kFloat32, {4, 100000}}, idx, nullptr, 2, kA2);
    FAIL() << "a row larger than the UB was accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("column-split"), std::string::npos) << error.what();
  }
  EXPECT_THROW(ascend::plan_moe_unpermute_backward({Dtype::kFloat16, {2, 8}}, rows, idx, nullptr, 2, true, kA2),
               ascend::PlanTypeError);
  EXPECT_THROW(ascend::plan_moe_permute(rows, {Dtype::kInt32, {4, 2}}, 8, 3, 2, nullptr, kA2), std::invalid_argument);
  EXPECT_THROW(ascend::plan_expert_histogram(idx, 0, kA2), std::invalid_argument);
}

// ---------------------------------------------------------------- the twin's Cast (R7) and ReduceSum (R8)

TEST(AscendTwin, CastRoundsHalfToEvenAndRefusesUnmodelledModes) {
  std::mt19937_64 rng(14);
  std::vector<float> values = {0.0f, -0.0f, 1.0f, 1.00390625f, 1.005859375f, 65504.0f, 65520.0f, 1e-8f, 6e-8f,
                               3e-5f, -2.5e-6f, 3.0e38f, INFINITY, -INFINITY};
  for (int i = 0; i < 20000; ++i) {
    uint32_t bits = static_cast<uint32_t>(rng());
    if ((bits & 0x7F800000u) == 0x7F800000u) bits &= 0xBFFFFFFFu;  // no nan in the bulk
    float f;
    std::memcpy(&f, &bits, 4);
    values.push_back(f);
  }
  const int64_t n = static_cast<int64_t>(values.size());
  AscendC::twin::launch(1, 10 * n + 3 * 32, [&] {
    AscendC::TPipe pipe;
    AscendC::TBuf<AscendC::TPosition::VECCALC> fbuf, hbuf, wbuf;
    pipe.InitBuffer(fbuf, 4 * n);
    pipe.InitBuffer(hbuf, 2 * n);
    pipe.InitBuffer(wbuf, 4 * n);
    auto f = fbuf.Get<float>();
    for (int64_t i = 0; i < n; ++i) f.SetValue(i, values[i]);
    auto bf = hbuf.Get<bfloat16_t>();
    AscendC::Cast(bf, f, AscendC::RoundMode::CAST_RINT, n);
    auto wide = wbuf.Get<float>();
    AscendC::Cast(wide, bf, AscendC::RoundMode::CAST_NONE, n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(bf.GetValue(i).bits, ref_bf16(values[i])) << values[i];
      ASSERT_EQ(wide.GetValue(i), bf16_value(ref_bf16(values[i])));
    }
    auto h = hbuf.Get<half>();
    AscendC::Cast(h, f, AscendC::RoundMode::CAST_RINT, n);
    AscendC::Cast(wide, h, AscendC::RoundMode::CAST_NONE, n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(h.GetValue(i).bits, ref_half(values[i])) << values[i];
      ASSERT_EQ(wide.GetValue(i), half_value(ref_half(values[i])));
    }
    EXPECT_THROW(AscendC::Cast(bf, f, AscendC::RoundMode::CAST_TRUNC, n), RuleViolation);
    EXPECT_THROW(AscendC::Cast(wide, h, AscendC::RoundMode::CAST_RINT, n), RuleViolation);
  });
}

TEST(AscendTwin, ReduceSumAddsInTheDocumentedA2Order) {
  // 64 floats per repeat summed as a tree, repeats in order: 1e8 + 1 (x64) loses the ones inside a
  // repeat's tree only where they meet the large value, so the result is order-specific.
  std::vector<float> values(130, 1.0f);
  values[0] = 1e8f;
  float expected_first = 1.0f * 32;  // the tree of repeat 0: 63 ones and 1e8
  {
    // pairs: (1e8 + 1), then 31 pairs of (1 + 1) = 2; the tree adds 1e8+1 = 1e8 (rounded) to the rest
    std::vector<float> lane(values.begin(), values.begin() + 64);
    for (int width = 32; width >= 1; width /= 2)
      for (int i = 0; i < width; ++i) lane[i] = lane[2 * i] + lane[2 * i + 1];
    expected_first = lane[0];
  }
  const float expected = (expected_first + 64.0f) + 2.0f;
  float sequential = 0.0f;
  for (float v : values) sequential += v;
  ASSERT_NE(expected, sequential);  // the case distinguishes the orders
  AscendC::twin::launch(1, 4096, [&] {
    AscendC::TPipe pipe;
    AscendC::TBuf<AscendC::TPosition::VECCALC> src, work, dst;
    pipe.InitBuffer(src, 4 * 130);
    pipe.InitBuffer(work, 32);
    pipe.InitBuffer(dst, 32);
    auto s = src.Get<float>();
    for (int i = 0; i < 130; ++i) s.SetValue(i, values[i]);
    AscendC::ReduceSum(dst.Get<float>(), s, work.Get<float>(), 130);
    EXPECT_EQ(dst.Get<float>().GetValue(0), expected);
  });
}

TEST(AscendTwin, ScalarGmWritesFollowTheDataCacheRules) {
  std::vector<int32_t> gm_data(64, 0);
  auto tensor = [&] {
    AscendC::GlobalTensor<int32_t> t;
    t.SetGlobalBuffer(gm_data.data(), 64);
    return t;
  };
  constexpr auto kEntire = AscendC::CacheLine::ENTIRE_DATA_CACHE;
  constexpr auto kOut = AscendC::DcciDst::CACHELINE_OUT;
  // a SetValue never written out
  EXPECT_THROW(AscendC::twin::launch(1, 1024, [&] { tensor().SetValue(3, 1); }), RuleViolation);
  // written out: fine
  EXPECT_NO_THROW(AscendC::twin::launch(1, 1024, [&] {
    auto t = tensor();
    t.SetValue(3, 1);
    AscendC::DataCacheCleanAndInvalid<int32_t, kEntire, kOut>(t);
  }));
  // two blocks SetValue into one 64-byte line (elements 0..15), even when each cleans its own
  EXPECT_THROW(AscendC::twin::launch(2, 1024, [&] {
                 auto t = tensor();
                 t.SetValue(AscendC::GetBlockIdx(), 7);
                 AscendC::DataCacheCleanAndInvalid<int32_t, kEntire, kOut>(t);
               }),
               RuleViolation);
  // ... but a line apart they may
  EXPECT_NO_THROW(AscendC::twin::launch(2, 1024, [&] {
    auto t = tensor();
    t.SetValue(16 * AscendC::GetBlockIdx(), 7);
    AscendC::DataCacheCleanAndInvalid<int32_t, kEntire, kOut>(t);
  }));
  // a DMA copy by another block into a line one block wrote with SetValue
  EXPECT_THROW(AscendC::twin::launch(2, 1024, [&] {
                 AscendC::TPipe pipe;
                 AscendC::TBuf<AscendC::TPosition::VECCALC> buffer;
                 pipe.InitBuffer(buffer, 64);
                 auto t = tensor();
                 if (AscendC::GetBlockIdx() == 0) {
                   t.SetValue(0, 7);
                   AscendC::DataCacheCleanAndInvalid<int32_t, kEntire, kOut>(t);
                 } else {
                   AscendC::DataCopyPad(t[8], buffer.Get<int32_t>(), AscendC::DataCopyExtParams{1, 16, 0, 0, 0});
                 }
               }),
               RuleViolation);
  // a DMA copy by the same block over its own line still dirty
  EXPECT_THROW(AscendC::twin::launch(1, 1024, [&] {
                 AscendC::TPipe pipe;
                 AscendC::TBuf<AscendC::TPosition::VECCALC> buffer;
                 pipe.InitBuffer(buffer, 64);
                 auto t = tensor();
                 t.SetValue(0, 7);
                 AscendC::DataCopyPad(t[4], buffer.Get<int32_t>(), AscendC::DataCopyExtParams{1, 16, 0, 0, 0});
                 AscendC::DataCacheCleanAndInvalid<int32_t, kEntire, kOut>(t);
               }),
               RuleViolation);
}
