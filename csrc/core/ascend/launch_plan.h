// The launch plan of each moe_ext op on Ascend: argument checks (shapes and
// dtypes; values are checked by the kernels on the device), which AscendC
// entry point (csrc/ascend/routing_kernels.cpp) each launch calls, its block
// count, its UB budget and its tiling words, and the int32/int64 workspaces
// the launcher allocates. Torch-free and CANN-free, so that everything the NPU
// launcher (csrc/ascend/npu/npu_ops.cpp, built only with CANN + torch_npu)
// decides is compiled and tested here: tests/cpp/test_ascend_kernels.cpp runs
// every plan, launch by launch, on the host twin of the AscendC API with each
// launch's UB capacity set to the plan's own budget (so an under-budget plan
// fails rule R3) and compares the results with the CPU contracts.
//
// A launcher passes, in order, the buffers each launch group names (see the
// comments on the plan structs) plus a device copy of `words` (all launches'
// tiling words, 8 int64 each, in the order of `launches()`).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/ascend/tiling.h"

namespace moe_ext::core::ascend {

enum class Dtype { kFloat32, kFloat16, kBFloat16, kFloat64, kInt32, kInt64, kOther };
const char* dtype_name(Dtype dtype);
int64_t dtype_bytes(Dtype dtype);  // 0 for kOther

// What a plan needs to know of a tensor.
struct TensorDesc {
  Dtype dtype = Dtype::kOther;
  std::vector<int64_t> sizes;
  int64_t numel() const;
};

// A wrong dtype (the launcher raises TypeError for it; other refusals are ValueError).
class PlanTypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// The target: vector cores per device and UB bytes per core (GetCoreMemSize on device).
struct AscendTarget {
  int64_t vector_cores = 40;       // Atlas A2 (910B): 20 AI cores x 2 vector cores
  int64_t ub_bytes = 192 * 1024;   // Atlas A2 vector core
};

struct Launch {
  std::string kernel;          // entry point in csrc/ascend/routing_kernels.cpp
  int64_t blocks = 1;          // blockDim of the launch
  int64_t ub_bytes = 0;        // UB the launch allocates per core (<= target.ub_bytes)
  KernelTilingWords words{};   // its tiling words
};

// gather_rows(x [N, H], indices [P]) -> out [P, H]. Launch group "gather":
// (x, indices, out, words, P).
struct GatherRowsPlan {
  int64_t out_rows = 0, source_rows = 0, row_bytes = 0;
  Launch gather;
  std::vector<Launch> launches() const;
};
GatherRowsPlan plan_gather_rows(const TensorDesc& x, const TensorDesc& indices, const AscendTarget& target);

// The inverse index shared by scatter_rows and the unpermute backward: one launch "build"
// (indices, inverse, words, op) over chunks of `chunk` rows (kernels/row_inverse.h).
struct InversePlan {
  int64_t rows = 0;   // int32 elements of the inverse workspace
  int64_t chunk = 0;  // rows a block builds in UB at once
  Launch build;
};

// scatter_rows(x [P, H], indices [P], num_rows) -> out [num_rows, H]: the inverse (op 0), then
// "gather" (x, inverse, out, words, num_rows) with int32 indices.
struct ScatterRowsPlan {
  int64_t out_rows = 0, row_bytes = 0;
  InversePlan inverse;
  Launch gather;
  std::vector<Launch> launches() const;
};
ScatterRowsPlan plan_scatter_rows(const TensorDesc& x, const TensorDesc& indices, int64_t num_rows,
                                  const AscendTarget& target);

// moe_unpermute(permuted [R, H], expanded_row_idx [T*K], probs [T, K] or none, topk) -> [T, H]:
// (permuted, row_idx, probs or null, out, words, T).
struct UnpermutePlan {
  int64_t num_tokens = 0, hidden = 0;
  Launch unpermute;
  std::vector<Launch> launches() const;
};
UnpermutePlan plan_moe_unpermute(const TensorDesc& permuted, const TensorDesc& expanded_row_idx,
                                 const TensorDesc* probs, int64_t topk, const AscendTarget& target);

// moe_unpermute_backward: the inverse (op 1), then "backward" (grad_out, permuted, row_idx,
// probs or null, grad_permuted, grad_probs or null when !grad_probs_computed, words, T), then
// "zero_rows" (grad_permuted, inverse, words, R); when probs are given but compute_grad_probs is
// false, "zero_grad_probs" (grad_probs, words) fills them with zeros.
struct UnpermuteBackwardPlan {
  int64_t num_tokens = 0, hidden = 0, rows = 0;
  bool has_probs = false, grad_probs_computed = false;
  InversePlan inverse;
  Launch backward, zero_rows;
  bool zero_grad_probs_needed = false;
  Launch zero_grad_probs;
  std::vector<Launch> launches() const;
};
UnpermuteBackwardPlan plan_moe_unpermute_backward(const TensorDesc& grad_output, const TensorDesc& permuted,
                                                  const TensorDesc& expanded_row_idx, const TensorDesc* probs,
                                                  int64_t topk, bool compute_grad_probs,
                                                  const AscendTarget& target);

// expert_histogram(topk_ids, E) -> int64 [E]: "partial" (ids, workspace, words), then
// "reduce" (workspace, counts, words); workspace = int64 [partial.blocks * E].
struct HistogramPlan {
  int64_t count = 0, num_experts = 0, workspace_elements = 0;
  Launch partial, reduce;
  std::vector<Launch> launches() const;
};
HistogramPlan plan_expert_histogram(const TensorDesc& topk_ids, int64_t num_experts, const AscendTarget& target);

// moe_permute(hidden [T, H], topk_ids [T, K], E, start, end, expert_map or none, cumsum):
// "key_count" (ids, map or null, workspace, words); "scan" (workspace, expert_tokens, words,
// cumsum); "place" (ids, map or null, workspace, expanded_row_idx, words); "rows" (hidden,
// expanded_row_idx, permuted, words, T). workspace = int64 [key_count.blocks * (end - start)].
struct PermutePlan {
  int64_t tokens = 0, topk = 0, rows = 0, hidden = 0, active = 0, workspace_elements = 0;
  Launch key_count, scan, place, row_copy;
  std::vector<Launch> launches() const;
};
PermutePlan plan_moe_permute(const TensorDesc& hidden_states, const TensorDesc& topk_ids, int64_t num_experts,
                             int64_t active_start, int64_t active_end, const TensorDesc* expert_map,
                             const AscendTarget& target);

// generate_permute_indices(counts [ranks * E], E, ranks, max_len, alignment):
// (counts, permuted_indices, m_sizes, m_offsets, words); outputs int32.
struct PermuteIndicesPlan {
  Launch launch;
  std::vector<Launch> launches() const;
};
PermuteIndicesPlan plan_generate_permute_indices(const TensorDesc& counts, int64_t experts_per_rank,
                                                 int64_t num_ranks, int64_t max_len, int64_t alignment,
                                                 const AscendTarget& target);

// All launches' words, 8 per launch in order: what the launcher copies to the device once per call.
std::vector<int64_t> pack_words(const std::vector<Launch>& launches);

}  // namespace moe_ext::core::ascend
