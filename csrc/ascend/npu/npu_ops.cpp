// moe_ext's ops on the NPU dispatch key (PrivateUse1, the key torch_npu
// registers its device under): each op checks and plans its launches with
// csrc/core/ascend/launch_plan.h and launches the AscendC kernels of
// csrc/ascend/routing_kernels.cpp on the current NPU stream.
//
// This translation unit is EXEMPT from the stable-ABI rule of the op glue
// (csrc/torch_ops.cpp, csrc/cpu, csrc/cuda): it uses ATen, c10 and torch_npu's
// C++ API (c10_npu::getCurrentNPUStream, at_npu::native::OpCommand) because the
// NPU stream and torch_npu's task queue exist nowhere else. It is built into
// moe_ext/_C_npu.so only when CANN and torch_npu are both found
// (cmake/MoeExtNpuOps.cmake, option MOE_EXT_BUILD_NPU_OPS) and is tied to the
// torch / torch_npu it was built against.
//
// Kept thin on purpose: every decision (argument checks, kernel choice by
// dtype, block counts, UB budgets, tiling words, workspace sizes) is in the
// launch plans, which CI executes on the host twin. What only this file does,
// and what is therefore NOT verified anywhere (no CANN, no torch_npu, no NPU
// on the machines this project is tested on; CI only compiles it against real
// ATen headers and stand-ins for the torch_npu / CANN launch headers):
//   - the ACLRT_LAUNCH_KERNEL calls (argument order as in the plan comments),
//   - taking the stream with getCurrentNPUStream().stream(false) and launching
//     through OpCommand::RunOpApi, the pattern of op-plugin's cpp_extension
//     example, so that the launch is ordered with torch_npu's own task queue,
//   - the host-to-device copy of the tiling words (pinned, non-blocking),
//   - the core count and UB size from PlatformAscendCManager (the plans are
//     tested with the A2 values and with smaller ones),
//   - output allocation on the input's device, and freeing the workspaces
//     (inverse index, tiling words, ...) when the op returns while its launches
//     may still be queued: safe under torch_npu's caching allocator as long as
//     every later use of the memory is on the same stream, which is the
//     allocator's contract as on CUDA (not checked here).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "core/ascend/launch_plan.h"
#include "tiling/platform/platform_ascendc.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/framework/OpCommand.h"

// The launch headers ascendc_library generates, one per kernel entry.
#include "aclrtlaunch_moe_ext_expert_histogram_partial_i32.h"
#include "aclrtlaunch_moe_ext_expert_histogram_partial_i64.h"
#include "aclrtlaunch_moe_ext_expert_histogram_reduce.h"
#include "aclrtlaunch_moe_ext_fill_b2.h"
#include "aclrtlaunch_moe_ext_gather_rows_b2_i32.h"
#include "aclrtlaunch_moe_ext_gather_rows_b2_i64.h"
#include "aclrtlaunch_moe_ext_gather_rows_b4_i32.h"
#include "aclrtlaunch_moe_ext_gather_rows_b4_i64.h"
#include "aclrtlaunch_moe_ext_gather_rows_b8_i32.h"
#include "aclrtlaunch_moe_ext_gather_rows_b8_i64.h"
#include "aclrtlaunch_moe_ext_generate_permute_indices_i32.h"
#include "aclrtlaunch_moe_ext_generate_permute_indices_i64.h"
#include "aclrtlaunch_moe_ext_inverse_build_i32.h"
#include "aclrtlaunch_moe_ext_inverse_build_i64.h"
#include "aclrtlaunch_moe_ext_permute_key_count_i32_m32.h"
#include "aclrtlaunch_moe_ext_permute_key_count_i32_m64.h"
#include "aclrtlaunch_moe_ext_permute_key_count_i64_m32.h"
#include "aclrtlaunch_moe_ext_permute_key_count_i64_m64.h"
#include "aclrtlaunch_moe_ext_permute_place_i32_m32.h"
#include "aclrtlaunch_moe_ext_permute_place_i32_m64.h"
#include "aclrtlaunch_moe_ext_permute_place_i64_m32.h"
#include "aclrtlaunch_moe_ext_permute_place_i64_m64.h"
#include "aclrtlaunch_moe_ext_permute_rows_b2.h"
#include "aclrtlaunch_moe_ext_permute_rows_b4.h"
#include "aclrtlaunch_moe_ext_permute_rows_b8.h"
#include "aclrtlaunch_moe_ext_permute_scan.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_bf16_pbf16_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_bf16_pbf16_i64.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_bf16_pf32_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_bf16_pf32_i64.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_f16_pf16_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_f16_pf16_i64.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_f16_pf32_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_f16_pf32_i64.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_f32_pf32_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_backward_f32_pf32_i64.h"
#include "aclrtlaunch_moe_ext_unpermute_bf16_pbf16_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_bf16_pbf16_i64.h"
#include "aclrtlaunch_moe_ext_unpermute_bf16_pf32_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_bf16_pf32_i64.h"
#include "aclrtlaunch_moe_ext_unpermute_f16_pf16_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_f16_pf16_i64.h"
#include "aclrtlaunch_moe_ext_unpermute_f16_pf32_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_f16_pf32_i64.h"
#include "aclrtlaunch_moe_ext_unpermute_f32_pf32_i32.h"
#include "aclrtlaunch_moe_ext_unpermute_f32_pf32_i64.h"
#include "aclrtlaunch_moe_ext_zero_unnamed_rows.h"

namespace moe_ext::npu {
namespace {

namespace plan = moe_ext::core::ascend;
using at::Tensor;

// ---------------------------------------------------------------- kernel tables, by launch group
// Each maps a plan's kernel name to a call of that entry; a name missing here is a moe_ext bug.
using Stream = aclrtStream;

using GatherCall = std::function<int(uint32_t, Stream, void*, void*, void*, void*, int64_t)>;
const std::map<std::string, GatherCall>& gather_table() {
  static const std::map<std::string, GatherCall> table = {
#define G(NAME) {#NAME, [](uint32_t b, Stream s, void* x, void* i, void* o, void* w, int64_t n) { \
    return static_cast<int>(ACLRT_LAUNCH_KERNEL(NAME)(b, s, x, i, o, w, n)); }}
      G(moe_ext_gather_rows_b2_i32), G(moe_ext_gather_rows_b2_i64), G(moe_ext_gather_rows_b4_i32),
      G(moe_ext_gather_rows_b4_i64), G(moe_ext_gather_rows_b8_i32), G(moe_ext_gather_rows_b8_i64),
#undef G
  };
  return table;
}

using InverseCall = std::function<int(uint32_t, Stream, void*, void*, void*, int64_t)>;
const std::map<std::string, InverseCall>& inverse_table() {
  static const std::map<std::string, InverseCall> table = {
#define G(NAME) {#NAME, [](uint32_t b, Stream s, void* i, void* inv, void* w, int64_t op) { \
    return static_cast<int>(ACLRT_LAUNCH_KERNEL(NAME)(b, s, i, inv, w, op)); }}
      G(moe_ext_inverse_build_i32), G(moe_ext_inverse_build_i64),
#undef G
  };
  return table;
}

using UnpermuteCall = std::function<int(uint32_t, Stream, void*, void*, void*, void*, void*, int64_t)>;
const std::map<std::string, UnpermuteCall>& unpermute_table() {
  static const std::map<std::string, UnpermuteCall> table = {
#define G(S) {"moe_ext_unpermute_" #S, [](uint32_t b, Stream s, void* x, void* r, void* p, void* o, void* w, \
                                          int64_t t) { \
    return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_unpermute_##S)(b, s, x, r, p, o, w, t)); }}
      G(f32_pf32_i32), G(f32_pf32_i64), G(f16_pf32_i32), G(f16_pf32_i64), G(f16_pf16_i32),
      G(f16_pf16_i64), G(bf16_pf32_i32), G(bf16_pf32_i64), G(bf16_pbf16_i32), G(bf16_pbf16_i64),
#undef G
  };
  return table;
}

using BackwardCall = std::function<int(uint32_t, Stream, void*, void*, void*, void*, void*, void*, void*, int64_t)>;
const std::map<std::string, BackwardCall>& backward_table() {
  static const std::map<std::string, BackwardCall> table = {
#define G(S) {"moe_ext_unpermute_backward_" #S, [](uint32_t b, Stream s, void* g, void* x, void* r, void* p, \
                                                   void* gx, void* gp, void* w, int64_t t) { \
    return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_unpermute_backward_##S)(b, s, g, x, r, p, gx, gp, w, t)); }}
      G(f32_pf32_i32), G(f32_pf32_i64), G(f16_pf32_i32), G(f16_pf32_i64), G(f16_pf16_i32),
      G(f16_pf16_i64), G(bf16_pf32_i32), G(bf16_pf32_i64), G(bf16_pbf16_i32), G(bf16_pbf16_i64),
#undef G
  };
  return table;
}

template <typename Call>
const Call& find(const std::map<std::string, Call>& table, const std::string& name) {
  const auto it = table.find(name);
  TORCH_INTERNAL_ASSERT(it != table.end(), "moe_ext: no AscendC entry point named ", name);
  return it->second;
}

// ---------------------------------------------------------------- glue

plan::Dtype to_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return plan::Dtype::kFloat32;
    case at::kHalf: return plan::Dtype::kFloat16;
    case at::kBFloat16: return plan::Dtype::kBFloat16;
    case at::kDouble: return plan::Dtype::kFloat64;
    case at::kInt: return plan::Dtype::kInt32;
    case at::kLong: return plan::Dtype::kInt64;
    default: return plan::Dtype::kOther;
  }
}

plan::TensorDesc desc(const Tensor& t) { return {to_dtype(t.scalar_type()), t.sizes().vec()}; }

// The plan's errors as torch's Python-typed errors (TypeError / ValueError).
template <typename Body>
auto planned(Body&& body) {
  try {
    return body();
  } catch (const plan::PlanTypeError& error) {
    throw c10::TypeError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, error.what());
  } catch (const std::invalid_argument& error) {
    throw c10::ValueError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, error.what());
  }
}

// The device's vector cores and UB per core, asked once from CANN's PlatformAscendCManager (the
// documented way for kernels launched directly); the plans size every launch from them.
plan::AscendTarget target() {
  static const plan::AscendTarget cached = [] {
    const auto* platform = platform_ascendc::PlatformAscendCManager::GetInstance();
    TORCH_CHECK(platform != nullptr, "moe_ext: CANN's PlatformAscendCManager gave no platform");
    uint64_t ub_bytes = 0;
    platform->GetCoreMemSize(platform_ascendc::CoreMemType::UB, ub_bytes);
    plan::AscendTarget found;
    found.vector_cores = static_cast<int64_t>(platform->GetCoreNumAiv());
    found.ub_bytes = static_cast<int64_t>(ub_bytes);
    TORCH_CHECK(found.vector_cores >= 1 && found.ub_bytes >= 32 * 1024,
                "moe_ext: unexpected Ascend platform: ", found.vector_cores, " vector cores, ", found.ub_bytes,
                " bytes of UB per core");
    return found;
  }();
  return cached;
}

void* ptr(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; }

// The launches' tiling words on the device, 8 int64 each, in launch order.
Tensor device_words(const std::vector<plan::Launch>& launches, const Tensor& like) {
  const std::vector<int64_t> words = plan::pack_words(launches);
  Tensor host = at::empty({static_cast<int64_t>(words.size())}, at::TensorOptions(at::kLong).pinned_memory(true));
  std::copy(words.begin(), words.end(), host.data_ptr<int64_t>());
  return host.to(like.device(), /*non_blocking=*/true);
}

// Launches `call(stream)` through torch_npu's task queue, ordered with its own ops.
void launch(const char* name, std::function<int(Stream)> call) {
  const Stream stream = c10_npu::getCurrentNPUStream().stream(false);
  at_npu::native::OpCommand::RunOpApi(name, [stream, call]() -> int {
    const int status = call(stream);
    TORCH_CHECK(status == 0, "moe_ext: an AscendC kernel launch failed with status ", status);
    return 0;
  });
}

// Words of launch i inside the packed device tensor.
void* words_at(const Tensor& words, size_t i) { return static_cast<int64_t*>(words.data_ptr()) + 8 * i; }

// The inverse index of `indices` into `inverse` (one launch); returns the next launch index.
size_t run_inverse(const plan::InversePlan& p, const Tensor& indices, const Tensor& inverse, const Tensor& words,
                   size_t i, int64_t op) {
  if (p.build.blocks == 0) return i;
  void *w = words_at(words, i++), *idx = ptr(indices), *inv = ptr(inverse);
  const auto& call = find(inverse_table(), p.build.kernel);
  const auto blocks = static_cast<uint32_t>(p.build.blocks);
  launch(p.build.kernel.c_str(), [=](Stream s) { return call(blocks, s, idx, inv, w, op); });
  return i;
}

// ---------------------------------------------------------------- the ops

Tensor gather_rows(const Tensor& x_in, const Tensor& indices_in) {
  const Tensor x = x_in.contiguous(), indices = indices_in.contiguous();
  const auto p = planned([&] { return plan::plan_gather_rows(desc(x), desc(indices), target()); });
  Tensor out = at::empty({p.out_rows, x.size(1)}, x.options());
  const auto launches = p.launches();
  if (launches.empty()) return out;
  const Tensor words = device_words(launches, x);
  const auto& call = find(gather_table(), p.gather.kernel);
  void *a = ptr(x), *b = ptr(indices), *c = ptr(out), *w = words_at(words, 0);
  const auto blocks = static_cast<uint32_t>(p.gather.blocks);
  const int64_t rows = p.out_rows;
  launch(p.gather.kernel.c_str(), [=](Stream s) { return call(blocks, s, a, b, c, w, rows); });
  return out;
}

Tensor scatter_rows(const Tensor& x_in, const Tensor& indices_in, int64_t num_rows) {
  const Tensor x = x_in.contiguous(), indices = indices_in.contiguous();
  const auto p = planned([&] { return plan::plan_scatter_rows(desc(x), desc(indices), num_rows, target()); });
  Tensor out = at::empty({num_rows, x.size(1)}, x.options());
  const auto launches = p.launches();
  if (launches.empty()) return out;
  Tensor inverse = at::empty({num_rows}, x.options().dtype(at::kInt));
  const Tensor words = device_words(launches, x);
  size_t i = run_inverse(p.inverse, indices, inverse, words, 0, /*op=*/0);
  if (p.gather.blocks > 0) {
    const auto& call = find(gather_table(), p.gather.kernel);
    void *a = ptr(x), *b = ptr(inverse), *c = ptr(out), *w = words_at(words, i);
    const auto blocks = static_cast<uint32_t>(p.gather.blocks);
    launch(p.gather.kernel.c_str(), [=](Stream s) { return call(blocks, s, a, b, c, w, num_rows); });
  }
  return out;
}

Tensor moe_unpermute(const Tensor& permuted_in, const Tensor& row_idx_in, const std::optional<Tensor>& probs_in,
                     int64_t topk) {
  const Tensor permuted = permuted_in.contiguous(), row_idx = row_idx_in.contiguous();
  const std::optional<Tensor> probs = probs_in ? std::optional<Tensor>(probs_in->contiguous()) : std::nullopt;
  const plan::TensorDesc probs_desc = probs ? desc(*probs) : plan::TensorDesc{};
  const auto p = planned([&] {
    return plan::plan_moe_unpermute(desc(permuted), desc(row_idx), probs ? &probs_desc : nullptr, topk, target());
  });
  Tensor out = at::empty({p.num_tokens, p.hidden}, permuted.options());
  const auto launches = p.launches();
  if (launches.empty()) return out;
  const Tensor words = device_words(launches, permuted);
  const auto& call = find(unpermute_table(), p.unpermute.kernel);
  void *x = ptr(permuted), *r = ptr(row_idx), *pr = probs ? ptr(*probs) : nullptr, *o = ptr(out),
       *w = words_at(words, 0);
  const auto blocks = static_cast<uint32_t>(p.unpermute.blocks);
  const int64_t tokens = p.num_tokens;
  launch(p.unpermute.kernel.c_str(), [=](Stream s) { return call(blocks, s, x, r, pr, o, w, tokens); });
  return out;
}

std::tuple<Tensor, Tensor> moe_unpermute_backward(const Tensor& grad_in, const Tensor& permuted_in,
                                                  const Tensor& row_idx_in, const std::optional<Tensor>& probs_in,
                                                  int64_t topk, bool compute_grad_probs) {
  const Tensor grad = grad_in.contiguous(), permuted = permuted_in.contiguous(), row_idx = row_idx_in.contiguous();
  const std::optional<Tensor> probs = probs_in ? std::optional<Tensor>(probs_in->contiguous()) : std::nullopt;
  const plan::TensorDesc probs_desc = probs ? desc(*probs) : plan::TensorDesc{};
  const auto p = planned([&] {
    return plan::plan_moe_unpermute_backward(desc(grad), desc(permuted), desc(row_idx),
                                             probs ? &probs_desc : nullptr, topk, compute_grad_probs, target());
  });
  Tensor grad_permuted = at::empty({p.rows, p.hidden}, permuted.options());
  Tensor grad_probs = probs ? at::empty({p.num_tokens, topk}, probs->options()) : at::empty({0}, permuted.options());
  const auto launches = p.launches();
  if (launches.empty()) return {grad_permuted, grad_probs};
  Tensor inverse = at::empty({p.rows}, permuted.options().dtype(at::kInt));
  const Tensor words = device_words(launches, permuted);
  size_t i = run_inverse(p.inverse, row_idx, inverse, words, 0, /*op=*/1);
  if (p.backward.blocks > 0) {
    const auto& call = find(backward_table(), p.backward.kernel);
    void *g = ptr(grad), *x = ptr(permuted), *r = ptr(row_idx), *pr = probs ? ptr(*probs) : nullptr,
         *gx = ptr(grad_permuted), *gp = p.grad_probs_computed ? ptr(grad_probs) : nullptr,
         *w = words_at(words, i++);
    const auto blocks = static_cast<uint32_t>(p.backward.blocks);
    const int64_t tokens = p.num_tokens;
    launch(p.backward.kernel.c_str(), [=](Stream s) { return call(blocks, s, g, x, r, pr, gx, gp, w, tokens); });
  }
  if (p.zero_rows.blocks > 0) {
    void *gx = ptr(grad_permuted), *inv = ptr(inverse), *w = words_at(words, i++);
    const auto blocks = static_cast<uint32_t>(p.zero_rows.blocks);
    const int64_t rows = p.rows;
    launch("moe_ext_zero_unnamed_rows", [=](Stream s) {
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_zero_unnamed_rows)(blocks, s, gx, inv, w, rows));
    });
  }
  if (p.zero_grad_probs_needed) {
    void *gp = ptr(grad_probs), *w = words_at(words, i++);
    const auto blocks = static_cast<uint32_t>(p.zero_grad_probs.blocks);
    launch("moe_ext_fill_b2", [=](Stream s) {
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_fill_b2)(blocks, s, gp, w));
    });
  }
  return {grad_permuted, grad_probs};
}

Tensor expert_histogram(const Tensor& ids_in, int64_t num_experts) {
  const Tensor ids = ids_in.contiguous();
  const auto p = planned([&] { return plan::plan_expert_histogram(desc(ids), num_experts, target()); });
  Tensor counts = at::empty({num_experts}, ids.options().dtype(at::kLong));
  Tensor workspace = at::empty({p.workspace_elements}, ids.options().dtype(at::kLong));
  const auto launches = p.launches();
  const Tensor words = device_words(launches, ids);
  void *i = ptr(ids), *ws = ptr(workspace), *c = ptr(counts), *w0 = words_at(words, 0), *w1 = words_at(words, 1);
  const auto b0 = static_cast<uint32_t>(p.partial.blocks), b1 = static_cast<uint32_t>(p.reduce.blocks);
  if (ids.scalar_type() == at::kLong) {
    launch("moe_ext_expert_histogram_partial_i64", [=](Stream s) {
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_expert_histogram_partial_i64)(b0, s, i, ws, w0));
    });
  } else {
    launch("moe_ext_expert_histogram_partial_i32", [=](Stream s) {
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_expert_histogram_partial_i32)(b0, s, i, ws, w0));
    });
  }
  launch("moe_ext_expert_histogram_reduce", [=](Stream s) {
    return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_expert_histogram_reduce)(b1, s, ws, c, w1));
  });
  return counts;
}

std::tuple<Tensor, Tensor, Tensor> moe_permute(const Tensor& hidden_in, const Tensor& ids_in, int64_t num_experts,
                                               int64_t active_start, int64_t active_end,
                                               const std::optional<Tensor>& map_in, bool counts_cumsum) {
  const Tensor hidden = hidden_in.contiguous(), ids = ids_in.contiguous();
  const std::optional<Tensor> map = map_in ? std::optional<Tensor>(map_in->contiguous()) : std::nullopt;
  const plan::TensorDesc map_desc = map ? desc(*map) : plan::TensorDesc{};
  const auto p = planned([&] {
    return plan::plan_moe_permute(desc(hidden), desc(ids), num_experts, active_start, active_end,
                                  map ? &map_desc : nullptr, target());
  });
  Tensor permuted = at::empty({p.rows, p.hidden}, hidden.options());
  Tensor row_idx = at::empty({p.rows}, hidden.options().dtype(at::kInt));
  Tensor expert_tokens = at::empty({p.active}, hidden.options().dtype(at::kLong));
  Tensor workspace = at::empty({p.workspace_elements}, hidden.options().dtype(at::kLong));
  const auto launches = p.launches();
  const Tensor words = device_words(launches, hidden);
  void *id = ptr(ids), *mp = map ? ptr(*map) : nullptr, *ws = ptr(workspace), *ri = ptr(row_idx),
       *et = ptr(expert_tokens), *hs = ptr(hidden), *out = ptr(permuted);
  void *w_count = words_at(words, 0), *w_scan = words_at(words, 1), *w_place = words_at(words, 2),
       *w_rows = launches.size() > 3 ? words_at(words, 3) : nullptr;
  const auto b_count = static_cast<uint32_t>(p.key_count.blocks), b_place = static_cast<uint32_t>(p.place.blocks),
             b_rows = static_cast<uint32_t>(p.row_copy.blocks);
  const int64_t tokens = p.tokens, cumsum = counts_cumsum ? 1 : 0;
#define MOE_NPU_PERMUTE(S)                                                                                   \
  if (p.key_count.kernel == "moe_ext_permute_key_count_" #S) {                                           \
    launch(p.key_count.kernel.c_str(), [=](Stream s) {                                                   \
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_permute_key_count_##S)(b_count, s, id, mp, ws, w_count)); \
    });                                                                                                  \
    launch("moe_ext_permute_scan", [=](Stream s) {                                                       \
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_permute_scan)(1u, s, ws, et, w_scan, cumsum));  \
    });                                                                                                  \
    launch(p.place.kernel.c_str(), [=](Stream s) {                                                       \
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_permute_place_##S)(b_place, s, id, mp, ws, ri, w_place)); \
    });                                                                                                  \
  }
  MOE_NPU_PERMUTE(i32_m32)
  MOE_NPU_PERMUTE(i32_m64)
  MOE_NPU_PERMUTE(i64_m32)
  MOE_NPU_PERMUTE(i64_m64)
#undef MOE_NPU_PERMUTE
  if (p.row_copy.blocks > 0) {
#define MOE_NPU_ROWS(B)                                                                                   \
  if (p.row_copy.kernel == "moe_ext_permute_rows_" #B) {                                                \
    launch(p.row_copy.kernel.c_str(), [=](Stream s) {                                                   \
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_permute_rows_##B)(b_rows, s, hs, ri, out, w_rows, tokens)); \
    });                                                                                                 \
  }
    MOE_NPU_ROWS(b2)
    MOE_NPU_ROWS(b4)
    MOE_NPU_ROWS(b8)
#undef MOE_NPU_ROWS
  }
  return {permuted, row_idx, expert_tokens};
}

std::tuple<Tensor, Tensor, Tensor> generate_permute_indices(const Tensor& counts_in, int64_t experts_per_rank,
                                                            int64_t num_ranks, int64_t max_len, int64_t alignment) {
  const Tensor counts = counts_in.contiguous();
  const auto p = planned([&] {
    return plan::plan_generate_permute_indices(desc(counts), experts_per_rank, num_ranks, max_len, alignment,
                                               target());
  });
  const auto int_options = counts.options().dtype(at::kInt);
  Tensor indices = at::empty({max_len}, int_options), sizes = at::empty({experts_per_rank}, int_options),
         offsets = at::empty({experts_per_rank}, int_options);
  const Tensor words = device_words(p.launches(), counts);
  void *c = ptr(counts), *i = ptr(indices), *sz = ptr(sizes), *of = ptr(offsets), *w = words_at(words, 0);
  const auto blocks = static_cast<uint32_t>(p.launch.blocks);
  if (counts.scalar_type() == at::kLong) {
    launch("moe_ext_generate_permute_indices_i64", [=](Stream s) {
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_generate_permute_indices_i64)(blocks, s, c, i, sz, of, w));
    });
  } else {
    launch("moe_ext_generate_permute_indices_i32", [=](Stream s) {
      return static_cast<int>(ACLRT_LAUNCH_KERNEL(moe_ext_generate_permute_indices_i32)(blocks, s, c, i, sz, of, w));
    });
  }
  return {indices, sizes, offsets};
}

}  // namespace
}  // namespace moe_ext::npu

// The schemas are defined once, by _C.so (csrc/torch_ops.cpp), which moe_ext's loader opens first.
// moe_permute_padded has no AscendC kernel: moe_ext/_npu_composites.py registers a torch composite
// for this key (built on moe_permute) when the loader opens this library.
TORCH_LIBRARY_IMPL(moe_ext, PrivateUse1, m) {
  m.impl("generate_permute_indices", TORCH_FN(moe_ext::npu::generate_permute_indices));
  m.impl("moe_permute", TORCH_FN(moe_ext::npu::moe_permute));
  m.impl("moe_unpermute", TORCH_FN(moe_ext::npu::moe_unpermute));
  m.impl("moe_unpermute_backward", TORCH_FN(moe_ext::npu::moe_unpermute_backward));
  m.impl("expert_histogram", TORCH_FN(moe_ext::npu::expert_histogram));
  m.impl("gather_rows", TORCH_FN(moe_ext::npu::gather_rows));
  m.impl("scatter_rows", TORCH_FN(moe_ext::npu::scatter_rows));
}
