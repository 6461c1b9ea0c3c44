#include "core/ascend/launch_plan.h"

#include <algorithm>
#include <limits>

#include "core/check.h"
#include "core/permute_indices.h"
#include "core/str_cat.h"

namespace moe_ext::core::ascend {

namespace {

constexpr int64_t kInt32Limit = std::numeric_limits<int32_t>::max();

template <typename... Parts>
[[noreturn]] void type_error(const Parts&... parts) {
  throw PlanTypeError(str_cat(parts...));
}

std::string shape_str(const TensorDesc& t) {
  std::string out = "[";
  for (size_t i = 0; i < t.sizes.size(); ++i) out += str_cat(i ? ", " : "", t.sizes[i]);
  return out + "]";
}

void check_dim(const TensorDesc& t, const char* op, const char* name, size_t dim) {
  MOE_CHECK_ARG(t.sizes.size() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", shape_str(t));
  for (int64_t s : t.sizes) MOE_CHECK_ARG(s >= 0, op, ": ", name, " has a negative size in ", shape_str(t));
}

void check_index(const TensorDesc& t, const char* op, const char* name) {
  if (t.dtype != Dtype::kInt32 && t.dtype != Dtype::kInt64)
    type_error(op, ": ", name, " must be int32 or int64, got ", dtype_name(t.dtype));
}

// Row moves copy bytes as words of the element size.
int64_t row_word_bytes(const TensorDesc& t, const char* op, const char* name) {
  const int64_t bytes = dtype_bytes(t.dtype);
  if (bytes != 2 && bytes != 4 && bytes != 8)
    type_error(op, ": ", name, " must have 2-, 4- or 8-byte elements on the AscendC path, got ", dtype_name(t.dtype));
  return bytes;
}

// Arithmetic kernels: float, half, bfloat16 rows (the vector unit has no fp64).
const char* float_code(const TensorDesc& t, const char* op, const char* name) {
  switch (t.dtype) {
    case Dtype::kFloat32: return "f32";
    case Dtype::kFloat16: return "f16";
    case Dtype::kBFloat16: return "bf16";
    default: break;
  }
  type_error(op, ": ", name, " must be float32, float16 or bfloat16 on the AscendC path, got ", dtype_name(t.dtype));
}

const char* index_code(const TensorDesc& t) { return t.dtype == Dtype::kInt64 ? "i64" : "i32"; }

int64_t checked_bytes(int64_t elements, int64_t element_bytes, const char* op, const char* what) {
  MOE_CHECK_ARG(elements <= std::numeric_limits<uint32_t>::max() / element_bytes, op, ": ", what, " of ", elements,
                " elements exceeds the 4 GiB a single DataCopyPad block can move");
  return elements * element_bytes;
}

Launch make_launch(std::string kernel, const BlockSplit& split, int64_t ub_bytes, const KernelTilingWords& words) {
  Launch launch;
  launch.kernel = std::move(kernel);
  launch.blocks = split.blocks;
  launch.ub_bytes = ub_bytes;
  launch.words = words;
  return launch;
}

Launch skipped() {
  Launch launch;
  launch.blocks = 0;  // nothing to do: launches() leaves it out
  return launch;
}

void keep(std::vector<Launch>& out, const Launch& launch) {
  if (launch.blocks > 0) out.push_back(launch);
}

// A row copy of `rows` rows of `row_bytes` (words of `word` bytes) from `source_rows` rows.
Launch row_copy(std::string kernel, int64_t rows, int64_t row_bytes, int64_t word, int64_t source_rows,
                const AscendTarget& target) {
  if (rows == 0 || row_bytes == 0) return skipped();
  const RowTiling tiling = plan_row_tiling(rows, row_bytes, 0, 1, 2, target.vector_cores, target.ub_bytes);
  return make_launch(std::move(kernel), tiling.split, tiling.ub_bytes_used,
                     kernel_tiling_words(tiling.split, tiling.rows_per_tile, row_bytes / word,
                                         tiling.row_stride_ub / word, source_rows, 0));
}

InversePlan plan_inverse(const TensorDesc& indices, int64_t rows, const char* op, const AscendTarget& target) {
  MOE_CHECK_ARG(indices.numel() <= kInt32Limit, op, ": at most 2^31 - 1 indices on the AscendC path (the inverse "
                "index is int32), got ", indices.numel());
  InversePlan plan;
  plan.rows = rows;
  const int64_t count = indices.numel();
  if (rows == 0 && count == 0) {
    plan.build = skipped();
    return plan;
  }
  // Chunks of a multiple of 8 rows, about one per core, at most half the UB; the other half
  // stages the indices.
  const int64_t cap = std::max<int64_t>(8, (target.ub_bytes / 2) / 4 / 8 * 8);
  const int64_t per_core = (std::max<int64_t>(rows, 1) + target.vector_cores - 1) / target.vector_cores;
  plan.chunk = std::min(cap, (per_core + 7) / 8 * 8);
  const int64_t chunks = std::max<int64_t>(1, (rows + plan.chunk - 1) / plan.chunk);
  const BlockSplit split = split_over_cores(chunks, target.vector_cores, 1);
  const int64_t index_bytes = dtype_bytes(indices.dtype), per_unit = kUbAlignBytes / index_bytes;
  const int64_t staged = ub_round_up(plan.chunk * 4);
  MOE_CHECK_ARG(staged + 2 * kUbAlignBytes <= target.ub_bytes, op, ": the target's UB of ", target.ub_bytes,
                " bytes is too small for the inverse index");
  const int64_t units_fit = (target.ub_bytes - staged) / (2 * kUbAlignBytes);
  const int64_t units_needed = std::max<int64_t>(1, (count + per_unit - 1) / per_unit);
  const int64_t per_tile = std::min(units_fit, units_needed) * per_unit;
  plan.build = make_launch(str_cat("moe_ext_inverse_build_", index_code(indices)), split,
                           staged + 2 * ub_round_up(per_tile * index_bytes),
                           kernel_tiling_words(split, per_tile, count, plan.chunk, rows, 0));
  return plan;
}

int64_t round32(int64_t bytes) { return ub_round_up(bytes); }

// probs staged per token: K of P, widened to float when P is not float.
int64_t probs_ub(const TensorDesc* probs, int64_t topk) {
  if (probs == nullptr) return 0;
  return round32(topk * dtype_bytes(probs->dtype)) + (probs->dtype != Dtype::kFloat32 ? round32(topk * 4) : 0);
}

// The moe_unpermute family's common checks; returns the token count.
int64_t check_unpermute(const TensorDesc& permuted, const TensorDesc& row_idx, const TensorDesc* probs, int64_t topk,
                        const char* op) {
  check_dim(permuted, op, "permuted", 2);
  float_code(permuted, op, "permuted");
  check_dim(row_idx, op, "expanded_row_idx", 1);
  check_index(row_idx, op, "expanded_row_idx");
  MOE_CHECK_ARG(topk >= 1, op, ": topk must be >= 1, got ", topk);
  MOE_CHECK_ARG(row_idx.numel() % topk == 0, op, ": expanded_row_idx has ", row_idx.numel(),
                " entries, not a multiple of topk = ", topk);
  const int64_t tokens = row_idx.numel() / topk;
  if (probs != nullptr) {
    check_dim(*probs, op, "probs", 2);
    MOE_CHECK_ARG(probs->sizes[0] == tokens && probs->sizes[1] == topk, op, ": probs must be [T, K] = [", tokens,
                  ", ", topk, "] to match expanded_row_idx (T * K = ", row_idx.numel(), "), got ", shape_str(*probs));
    if (probs->dtype != Dtype::kFloat32 && probs->dtype != permuted.dtype)
      type_error(op, ": probs must be float32 or the dtype of permuted (", dtype_name(permuted.dtype), "), got ",
                 dtype_name(probs->dtype));
  }
  return tokens;
}

std::string unpermute_suffix(const TensorDesc& permuted, const TensorDesc& row_idx, const TensorDesc* probs,
                             const char* op) {
  const char* t = float_code(permuted, op, "permuted");
  // Without probs the kernel never reads P: the float-probs entry serves.
  const char* p = probs != nullptr && probs->dtype != Dtype::kFloat32 ? t : "f32";
  return str_cat(t, "_p", p, "_", index_code(row_idx));
}

}  // namespace

const char* dtype_name(Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat32: return "float32";
    case Dtype::kFloat16: return "float16";
    case Dtype::kBFloat16: return "bfloat16";
    case Dtype::kFloat64: return "float64";
    case Dtype::kInt32: return "int32";
    case Dtype::kInt64: return "int64";
    default: return "an unsupported dtype";
  }
}

int64_t dtype_bytes(Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat16:
    case Dtype::kBFloat16: return 2;
    case Dtype::kFloat32:
    case Dtype::kInt32: return 4;
    case Dtype::kFloat64:
    case Dtype::kInt64: return 8;
    default: return 0;
  }
}

int64_t TensorDesc::numel() const {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

std::vector<int64_t> pack_words(const std::vector<Launch>& launches) {
  std::vector<int64_t> out;
  for (const Launch& launch : launches) out.insert(out.end(), launch.words.begin(), launch.words.end());
  return out;
}

std::vector<Launch> GatherRowsPlan::launches() const {
  std::vector<Launch> out;
  keep(out, gather);
  return out;
}

GatherRowsPlan plan_gather_rows(const TensorDesc& x, const TensorDesc& indices, const AscendTarget& target) {
  constexpr const char* op = "gather_rows";
  check_dim(x, op, "x", 2);
  check_dim(indices, op, "indices", 1);
  check_index(indices, op, "indices");
  const int64_t word = row_word_bytes(x, op, "x");
  GatherRowsPlan plan;
  plan.out_rows = indices.numel();
  plan.source_rows = x.sizes[0];
  plan.row_bytes = checked_bytes(x.sizes[1], word, op, "a row of x");
  plan.gather = row_copy(str_cat("moe_ext_gather_rows_b", word, "_", index_code(indices)), plan.out_rows,
                         plan.row_bytes, word, plan.source_rows, target);
  return plan;
}

std::vector<Launch> ScatterRowsPlan::launches() const {
  std::vector<Launch> out;
  keep(out, inverse.build);
  keep(out, gather);
  return out;
}

ScatterRowsPlan plan_scatter_rows(const TensorDesc& x, const TensorDesc& indices, int64_t num_rows,
                                  const AscendTarget& target) {
  constexpr const char* op = "scatter_rows";
  check_dim(x, op, "x", 2);
  check_dim(indices, op, "indices", 1);
  check_index(indices, op, "indices");
  MOE_CHECK_ARG(indices.numel() == x.sizes[0], op, ": indices must have one entry per row of x (", x.sizes[0],
                "), got ", indices.numel());
  MOE_CHECK_ARG(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  const int64_t word = row_word_bytes(x, op, "x");
  ScatterRowsPlan plan;
  plan.out_rows = num_rows;
  plan.row_bytes = checked_bytes(x.sizes[1], word, op, "a row of x");
  plan.inverse = plan_inverse(indices, num_rows, op, target);
  plan.gather =
      row_copy(str_cat("moe_ext_gather_rows_b", word, "_i32"), num_rows, plan.row_bytes, word, x.sizes[0], target);
  return plan;
}

std::vector<Launch> UnpermutePlan::launches() const {
  std::vector<Launch> out;
  keep(out, unpermute);
  return out;
}

UnpermutePlan plan_moe_unpermute(const TensorDesc& permuted, const TensorDesc& expanded_row_idx,
                                 const TensorDesc* probs, int64_t topk, const AscendTarget& target) {
  constexpr const char* op = "moe_unpermute";
  UnpermutePlan plan;
  plan.num_tokens = check_unpermute(permuted, expanded_row_idx, probs, topk, op);
  plan.hidden = permuted.sizes[1];
  const int64_t element = dtype_bytes(permuted.dtype);
  const int64_t row = round32(checked_bytes(plan.hidden, element, op, "a row of permuted"));
  const int64_t row_f = round32(checked_bytes(plan.hidden, 4, op, "a float row"));
  const int64_t ub = 3 * row + row_f + (permuted.dtype != Dtype::kFloat32 ? 2 * row_f : 0) + probs_ub(probs, topk);
  MOE_CHECK_ARG(ub <= target.ub_bytes, op, ": a row of ", plan.hidden, " ", dtype_name(permuted.dtype),
                " needs ", ub, " bytes of UB per core but the target has ", target.ub_bytes,
                "; hidden sizes this large need a column-split kernel, which moe_ext does not have");
  if (plan.num_tokens == 0 || plan.hidden == 0) {
    plan.unpermute = skipped();
    return plan;
  }
  const BlockSplit split = split_over_cores(plan.num_tokens, target.vector_cores, 1);
  plan.unpermute = make_launch(str_cat("moe_ext_unpermute_", unpermute_suffix(permuted, expanded_row_idx, probs, op)),
                               split, ub, kernel_tiling_words(split, 1, plan.hidden, 0, permuted.sizes[0], topk));
  return plan;
}

std::vector<Launch> UnpermuteBackwardPlan::launches() const {
  std::vector<Launch> out;
  keep(out, inverse.build);
  keep(out, backward);
  keep(out, zero_rows);
  if (zero_grad_probs_needed) keep(out, zero_grad_probs);
  return out;
}

UnpermuteBackwardPlan plan_moe_unpermute_backward(const TensorDesc& grad_output, const TensorDesc& permuted,
                                                  const TensorDesc& expanded_row_idx, const TensorDesc* probs,
                                                  int64_t topk, bool compute_grad_probs,
                                                  const AscendTarget& target) {
  constexpr const char* op = "moe_unpermute_backward";
  UnpermuteBackwardPlan plan;
  plan.num_tokens = check_unpermute(permuted, expanded_row_idx, probs, topk, op);
  plan.hidden = permuted.sizes[1];
  plan.rows = permuted.sizes[0];
  check_dim(grad_output, op, "grad_output", 2);
  MOE_CHECK_ARG(grad_output.sizes[0] == plan.num_tokens && grad_output.sizes[1] == plan.hidden, op,
                ": grad_output must be [T, H] = [", plan.num_tokens, ", ", plan.hidden, "], got ",
                shape_str(grad_output));
  if (grad_output.dtype != permuted.dtype)
    type_error(op, ": grad_output must have the dtype of permuted (", dtype_name(permuted.dtype), "), got ",
               dtype_name(grad_output.dtype));
  plan.has_probs = probs != nullptr;
  plan.grad_probs_computed = plan.has_probs && compute_grad_probs;
  const int64_t element = dtype_bytes(permuted.dtype);
  const int64_t row = round32(checked_bytes(plan.hidden, element, op, "a row of permuted"));
  const int64_t row_f = round32(checked_bytes(plan.hidden, 4, op, "a float row"));
  const int64_t repeats = (plan.hidden + 63) / 64;
  int64_t ub = 4 * row + row_f + (permuted.dtype != Dtype::kFloat32 ? 2 * row_f : 0) + round32(repeats * 4) + 32 +
               probs_ub(probs, topk);
  if (plan.grad_probs_computed)
    ub += round32(topk * 4) + (probs->dtype != Dtype::kFloat32 ? round32(topk * dtype_bytes(probs->dtype)) : 0);
  MOE_CHECK_ARG(ub <= target.ub_bytes, op, ": a row of ", plan.hidden, " ", dtype_name(permuted.dtype), " needs ",
                ub, " bytes of UB per core but the target has ", target.ub_bytes,
                "; hidden sizes this large need a column-split kernel, which moe_ext does not have");
  plan.inverse = plan_inverse(expanded_row_idx, plan.rows, op, target);
  if (plan.num_tokens > 0) {
    const BlockSplit split = split_over_cores(plan.num_tokens, target.vector_cores, 1);
    plan.backward = make_launch(
        str_cat("moe_ext_unpermute_backward_", unpermute_suffix(permuted, expanded_row_idx, probs, op)), split, ub,
        kernel_tiling_words(split, 1, plan.hidden, 0, plan.rows, topk));
  } else {
    plan.backward = skipped();
  }
  const int64_t row_bytes = plan.hidden * element;
  if (plan.rows > 0 && row_bytes > 0) {
    const BlockSplit split = split_over_cores(plan.rows, target.vector_cores, 1);
    plan.zero_rows = make_launch("moe_ext_zero_unnamed_rows", split, round32(row_bytes),
                                 kernel_tiling_words(split, 1, row_bytes / 2, 0, 0, 0));
  } else {
    plan.zero_rows = skipped();
  }
  const int64_t prob_words = plan.has_probs ? plan.num_tokens * topk * dtype_bytes(probs->dtype) / 2 : 0;
  plan.zero_grad_probs_needed = plan.has_probs && !compute_grad_probs && prob_words > 0;
  if (plan.zero_grad_probs_needed) {
    const StreamTiling fill = plan_stream_tiling(prob_words, 2, 0, 1, target.vector_cores, target.ub_bytes);
    plan.zero_grad_probs = make_launch("moe_ext_fill_b2", fill.split, fill.ub_bytes_used,
                                       kernel_tiling_words(fill.split, fill.elements_per_tile, prob_words, 0, 0, 0));
  }
  return plan;
}

std::vector<Launch> HistogramPlan::launches() const {
  std::vector<Launch> out;
  keep(out, partial);
  keep(out, reduce);
  return out;
}

HistogramPlan plan_expert_histogram(const TensorDesc& topk_ids, int64_t num_experts, const AscendTarget& target) {
  constexpr const char* op = "expert_histogram";
  check_index(topk_ids, op, "topk_ids");
  MOE_CHECK_ARG(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  HistogramPlan plan;
  plan.count = topk_ids.numel();
  plan.num_experts = num_experts;
  MOE_CHECK_ARG(num_experts <= target.ub_bytes / 8, op, ": num_experts = ", num_experts,
                " does not fit one core's UB as int64 counts (at most ", target.ub_bytes / 8, ")");
  const StreamTiling stream = plan_stream_tiling(plan.count, dtype_bytes(topk_ids.dtype), num_experts * 8, 2,
                                                 target.vector_cores, target.ub_bytes);
  plan.workspace_elements = stream.split.blocks * num_experts;
  plan.partial = make_launch(str_cat("moe_ext_expert_histogram_partial_", index_code(topk_ids)), stream.split,
                             stream.ub_bytes_used,
                             kernel_tiling_words(stream.split, stream.elements_per_tile, plan.count, 0, 0, num_experts));
  // The reduce stages 2 partial spans + 1 sum span of int64 per block, at least 64 experts a core.
  const BlockSplit experts = split_over_cores(num_experts, target.vector_cores, 64);
  const int64_t span = experts.base + (experts.remainder > 0 ? 1 : 0);
  MOE_CHECK_ARG(3 * round32(span * 8) <= target.ub_bytes, op, ": num_experts = ", num_experts,
                " is too many for the reduce's UB on ", target.vector_cores, " cores");
  plan.reduce = make_launch("moe_ext_expert_histogram_reduce", experts, 3 * round32(span * 8),
                            kernel_tiling_words(experts, 0, 0, 0, stream.split.blocks, num_experts));
  return plan;
}

std::vector<Launch> PermutePlan::launches() const {
  std::vector<Launch> out;
  keep(out, key_count);
  keep(out, scan);
  keep(out, place);
  keep(out, row_copy);
  return out;
}

PermutePlan plan_moe_permute(const TensorDesc& hidden_states, const TensorDesc& topk_ids, int64_t num_experts,
                             int64_t active_start, int64_t active_end, const TensorDesc* expert_map,
                             const AscendTarget& target) {
  constexpr const char* op = "moe_permute";
  check_dim(hidden_states, op, "hidden_states", 2);
  check_dim(topk_ids, op, "topk_ids", 2);
  check_index(topk_ids, op, "topk_ids");
  MOE_CHECK_ARG(topk_ids.sizes[0] == hidden_states.sizes[0], op, ": topk_ids must have one row per token (",
                hidden_states.sizes[0], "), got ", shape_str(topk_ids));
  MOE_CHECK_ARG(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  MOE_CHECK_ARG(0 <= active_start && active_start <= active_end && active_end <= num_experts, op,
                ": the active range must satisfy 0 <= active_start <= active_end <= num_experts = ", num_experts,
                ", got [", active_start, ", ", active_end, ")");
  if (expert_map != nullptr) {
    check_dim(*expert_map, op, "expert_map", 1);
    check_index(*expert_map, op, "expert_map");
    MOE_CHECK_ARG(expert_map->sizes[0] == num_experts, op, ": expert_map must have num_experts = ", num_experts,
                  " entries, got ", expert_map->sizes[0]);
  }
  const int64_t word = row_word_bytes(hidden_states, op, "hidden_states");
  PermutePlan plan;
  plan.tokens = hidden_states.sizes[0];
  plan.topk = topk_ids.sizes[1];
  plan.rows = topk_ids.numel();
  plan.hidden = hidden_states.sizes[1];
  plan.active = active_end - active_start;
  MOE_CHECK_ARG(plan.rows <= kInt32Limit, op, ": at most 2^31 - 1 rows (T * K) on the AscendC path, got ", plan.rows);
  const int64_t id_bytes = dtype_bytes(topk_ids.dtype);
  MOE_CHECK_ARG(plan.active * 8 + 3 * 32 <= target.ub_bytes, op, ": ", plan.active,
                " active experts do not fit one core's UB as int64 counts");
  // 2 id tiles + 1 int32 output tile (no larger than an id tile) + the per-key counts.
  const StreamTiling stream = plan_stream_tiling(plan.rows, id_bytes, plan.active * 8, 3, target.vector_cores,
                                                 target.ub_bytes);
  plan.workspace_elements = stream.split.blocks * plan.active;
  const auto words =
      kernel_tiling_words(stream.split, stream.elements_per_tile, plan.rows, active_start, active_end, num_experts);
  const std::string suffix = str_cat(index_code(topk_ids), "_m",
                                     expert_map != nullptr && expert_map->dtype == Dtype::kInt64 ? "64" : "32");
  plan.key_count = make_launch(str_cat("moe_ext_permute_key_count_", suffix), stream.split, stream.ub_bytes_used, words);
  BlockSplit one;
  one.blocks = 1;
  plan.scan = make_launch("moe_ext_permute_scan", one, 0, words);
  plan.place = make_launch(str_cat("moe_ext_permute_place_", suffix), stream.split, stream.ub_bytes_used, words);
  // The row copy: tokens split over cores, each token's row read once and written to its K rows.
  const int64_t row_bytes = checked_bytes(plan.hidden, word, op, "a row of hidden_states");
  if (plan.tokens > 0 && row_bytes > 0 && plan.topk > 0) {
    const RowTiling rows = plan_row_tiling(plan.tokens, row_bytes, 0, 1, 2, target.vector_cores, target.ub_bytes);
    plan.row_copy = make_launch(str_cat("moe_ext_permute_rows_b", word), rows.split, rows.ub_bytes_used,
                                kernel_tiling_words(rows.split, rows.rows_per_tile, row_bytes / word,
                                                    rows.row_stride_ub / word, plan.rows, plan.topk));
  } else {
    plan.row_copy = skipped();
  }
  return plan;
}

std::vector<Launch> PermuteIndicesPlan::launches() const {
  std::vector<Launch> out;
  keep(out, launch);
  return out;
}

PermuteIndicesPlan plan_generate_permute_indices(const TensorDesc& counts, int64_t experts_per_rank,
                                                 int64_t num_ranks, int64_t max_len, int64_t alignment,
                                                 const AscendTarget& target) {
  constexpr const char* op = "generate_permute_indices";
  check_dim(counts, op, "tokens_per_expert_group", 1);
  check_index(counts, op, "tokens_per_expert_group");
  check_permute_indices_shape(counts.sizes[0], experts_per_rank, num_ranks, max_len, alignment);
  MOE_CHECK_ARG(max_len <= kInt32Limit, op, ": max_len must be < 2^31 on the AscendC path, got ", max_len);
  PermuteIndicesPlan plan;
  const BlockSplit split = split_over_cores(experts_per_rank, target.vector_cores, 1);
  const int64_t per_tile = std::min<int64_t>(2048, (target.ub_bytes / 2) / 32 * 8);  // int32 tiles, 2 buffers
  plan.launch = make_launch(str_cat("moe_ext_generate_permute_indices_", index_code(counts)), split,
                            4 * round32(per_tile * 4),  // 2 index tiles + the sizes and offsets tiles
                            kernel_tiling_words(split, per_tile, max_len, alignment, num_ranks, experts_per_rank));
  return plan;
}

}  // namespace moe_ext::core::ascend
