// Entry points of moe_ext's AscendC kernels (one per element/index type).
//
// With CANN, cmake/MoeExtAscend.cmake compiles this file with ascendc_library
// (the real kernel_operator.h); in CI tests/cpp/test_ascend_kernels.cpp
// compiles it against the host twin (csrc/ascend/twin/) and launches each
// entry block by block. Every launch takes its tiling as an int64 argument
// block (kernels/common.h, filled from csrc/core/ascend/tiling.h) and, where
// the tensor lengths are not in the tiling, the count as a scalar argument.
#include "kernels/expert_histogram.h"
#include "kernels/gather_rows.h"
#include "kernels/permute_indices.h"
#include "kernels/permute_layout.h"
#include "kernels/permute_rows.h"
#include "kernels/row_inverse.h"
#include "kernels/unpermute.h"

using moe_ext::ascend::ExpertHistogramPartial;
using moe_ext::ascend::FillKernel;
using moe_ext::ascend::InverseBuildKernel;
using moe_ext::ascend::UnpermuteBackwardKernel;
using moe_ext::ascend::ZeroUnnamedRowsKernel;
using moe_ext::ascend::ExpertHistogramReduce;
using moe_ext::ascend::GatherRowsKernel;
using moe_ext::ascend::PermuteIndicesKernel;
using moe_ext::ascend::PermuteKeyCount;
using moe_ext::ascend::PermutePlace;
using moe_ext::ascend::PermuteRowsKernel;
using moe_ext::ascend::PermuteScan;
using moe_ext::ascend::UnpermuteKernel;

#define MOE_EXT_GATHER_ROWS_ENTRY(NAME, T, IndexT)                                                       \
  extern "C" __global__ __aicore__ void NAME(GM_ADDR x, GM_ADDR indices, GM_ADDR out, GM_ADDR tiling,    \
                                             int64_t num_out_rows) {                                     \
    GatherRowsKernel<T, IndexT> kernel;                                                                  \
    kernel.Init(x, indices, out, tiling, num_out_rows);                                                  \
    kernel.Process();                                                                                    \
  }

// Rows travel as words of their element size: 2 bytes (bf16, fp16), 4 (fp32), 8 (fp64).
MOE_EXT_GATHER_ROWS_ENTRY(moe_ext_gather_rows_b2_i32, uint16_t, int32_t)
MOE_EXT_GATHER_ROWS_ENTRY(moe_ext_gather_rows_b2_i64, uint16_t, int64_t)
MOE_EXT_GATHER_ROWS_ENTRY(moe_ext_gather_rows_b4_i32, float, int32_t)
MOE_EXT_GATHER_ROWS_ENTRY(moe_ext_gather_rows_b4_i64, float, int64_t)
MOE_EXT_GATHER_ROWS_ENTRY(moe_ext_gather_rows_b8_i32, double, int32_t)
MOE_EXT_GATHER_ROWS_ENTRY(moe_ext_gather_rows_b8_i64, double, int64_t)

#define MOE_EXT_HISTOGRAM_ENTRY(NAME, IdT)                                                      \
  extern "C" __global__ __aicore__ void NAME(GM_ADDR ids, GM_ADDR workspace, GM_ADDR tiling) {  \
    ExpertHistogramPartial<IdT> kernel;                                                         \
    kernel.Init(ids, workspace, tiling);                                                        \
    kernel.Process();                                                                           \
  }

MOE_EXT_HISTOGRAM_ENTRY(moe_ext_expert_histogram_partial_i32, int32_t)
MOE_EXT_HISTOGRAM_ENTRY(moe_ext_expert_histogram_partial_i64, int64_t)

extern "C" __global__ __aicore__ void moe_ext_expert_histogram_reduce(GM_ADDR workspace, GM_ADDR counts,
                                                                      GM_ADDR tiling) {
  ExpertHistogramReduce kernel;
  kernel.Init(workspace, counts, tiling);
  kernel.Process();
}

// moe_unpermute forward / backward: rows T (f32, f16, bf16), probs P (f32 or T), index i32 / i64.
#define MOE_EXT_UNPERMUTE_ENTRIES(SUFFIX, T, P, IndexT)                                                       \
  extern "C" __global__ __aicore__ void moe_ext_unpermute_##SUFFIX(GM_ADDR permuted, GM_ADDR row_idx,        \
                                                                   GM_ADDR probs, GM_ADDR out, GM_ADDR tiling, \
                                                                   int64_t num_tokens) {                       \
    UnpermuteKernel<T, P, IndexT> kernel;                                                                      \
    kernel.Init(permuted, row_idx, probs, out, tiling, num_tokens);                                            \
    kernel.Process();                                                                                          \
  }                                                                                                            \
  extern "C" __global__ __aicore__ void moe_ext_unpermute_backward_##SUFFIX(                                  \
      GM_ADDR grad_out, GM_ADDR permuted, GM_ADDR row_idx, GM_ADDR probs, GM_ADDR grad_permuted,              \
      GM_ADDR grad_probs, GM_ADDR tiling, int64_t num_tokens) {                                                \
    UnpermuteBackwardKernel<T, P, IndexT> kernel;                                                              \
    kernel.Init(grad_out, permuted, row_idx, probs, grad_permuted, grad_probs, tiling, num_tokens);           \
    kernel.Process();                                                                                          \
  }

MOE_EXT_UNPERMUTE_ENTRIES(f32_pf32_i32, float, float, int32_t)
MOE_EXT_UNPERMUTE_ENTRIES(f32_pf32_i64, float, float, int64_t)
MOE_EXT_UNPERMUTE_ENTRIES(f16_pf32_i32, half, float, int32_t)
MOE_EXT_UNPERMUTE_ENTRIES(f16_pf32_i64, half, float, int64_t)
MOE_EXT_UNPERMUTE_ENTRIES(f16_pf16_i32, half, half, int32_t)
MOE_EXT_UNPERMUTE_ENTRIES(f16_pf16_i64, half, half, int64_t)
MOE_EXT_UNPERMUTE_ENTRIES(bf16_pf32_i32, bfloat16_t, float, int32_t)
MOE_EXT_UNPERMUTE_ENTRIES(bf16_pf32_i64, bfloat16_t, float, int64_t)
MOE_EXT_UNPERMUTE_ENTRIES(bf16_pbf16_i32, bfloat16_t, bfloat16_t, int32_t)
MOE_EXT_UNPERMUTE_ENTRIES(bf16_pbf16_i64, bfloat16_t, bfloat16_t, int64_t)

// The inverse index of scatter_rows and the unpermute backward (kernels/row_inverse.h), one launch;
// op = 0 (scatter_rows) or 1 (moe_unpermute_backward) picks the wording of the device checks.
#define MOE_EXT_INVERSE_ENTRY(SUFFIX, IndexT)                                                                \
  extern "C" __global__ __aicore__ void moe_ext_inverse_build_##SUFFIX(GM_ADDR indices, GM_ADDR inverse,      \
                                                                      GM_ADDR tiling, int64_t op) {          \
    InverseBuildKernel<IndexT> kernel;                                                                       \
    kernel.Init(indices, inverse, tiling, op);                                                               \
    kernel.Process();                                                                                        \
  }

MOE_EXT_INVERSE_ENTRY(i32, int32_t)
MOE_EXT_INVERSE_ENTRY(i64, int64_t)

// Zeros in 2-byte words (grad_probs when they are not computed).
extern "C" __global__ __aicore__ void moe_ext_fill_b2(GM_ADDR out, GM_ADDR tiling) {
  FillKernel<uint16_t> kernel;
  kernel.Init(out, tiling, 0);
  kernel.Process();
}

// Rows no index names become zeros (the row's bytes as 2-byte words).
extern "C" __global__ __aicore__ void moe_ext_zero_unnamed_rows(GM_ADDR out, GM_ADDR inverse, GM_ADDR tiling,
                                                                int64_t num_rows) {
  ZeroUnnamedRowsKernel<uint16_t> kernel;
  kernel.Init(out, inverse, tiling, num_rows);
  kernel.Process();
}

#define MOE_EXT_PERMUTE_INDICES_ENTRY(NAME, CountT)                                                   \
  extern "C" __global__ __aicore__ void NAME(GM_ADDR counts, GM_ADDR permuted_indices, GM_ADDR m_sizes, \
                                             GM_ADDR m_offsets, GM_ADDR tiling) {                      \
    PermuteIndicesKernel<CountT> kernel;                                                              \
    kernel.Init(counts, permuted_indices, m_sizes, m_offsets, tiling);                                \
    kernel.Process();                                                                                 \
  }

MOE_EXT_PERMUTE_INDICES_ENTRY(moe_ext_generate_permute_indices_i32, int32_t)
MOE_EXT_PERMUTE_INDICES_ENTRY(moe_ext_generate_permute_indices_i64, int64_t)

// moe_permute: key count -> scan -> place -> row copy (each token's row to its K positions).
#define MOE_EXT_PERMUTE_ENTRIES(SUFFIX, IdT, MapT)                                                         \
  extern "C" __global__ __aicore__ void moe_ext_permute_key_count_##SUFFIX(GM_ADDR ids, GM_ADDR expert_map,  \
                                                                          GM_ADDR workspace, GM_ADDR tiling) { \
    PermuteKeyCount<IdT, MapT> kernel;                                                                     \
    kernel.Init(ids, expert_map, workspace, tiling);                                                       \
    kernel.Process();                                                                                      \
  }                                                                                                        \
  extern "C" __global__ __aicore__ void moe_ext_permute_place_##SUFFIX(                                     \
      GM_ADDR ids, GM_ADDR expert_map, GM_ADDR workspace, GM_ADDR expanded_row_idx, GM_ADDR tiling) {       \
    PermutePlace<IdT, MapT> kernel;                                                                        \
    kernel.Init(ids, expert_map, workspace, expanded_row_idx, tiling);                                     \
    kernel.Process();                                                                                      \
  }

MOE_EXT_PERMUTE_ENTRIES(i32_m32, int32_t, int32_t)
MOE_EXT_PERMUTE_ENTRIES(i32_m64, int32_t, int64_t)
MOE_EXT_PERMUTE_ENTRIES(i64_m32, int64_t, int32_t)
MOE_EXT_PERMUTE_ENTRIES(i64_m64, int64_t, int64_t)

extern "C" __global__ __aicore__ void moe_ext_permute_scan(GM_ADDR workspace, GM_ADDR expert_tokens, GM_ADDR tiling,
                                                           int64_t cumulative) {
  PermuteScan kernel;
  kernel.Init(workspace, expert_tokens, tiling, cumulative);
  kernel.Process();
}

#define MOE_EXT_PERMUTE_ROWS_ENTRY(NAME, T)                                                                \
  extern "C" __global__ __aicore__ void NAME(GM_ADDR hidden, GM_ADDR expanded_row_idx, GM_ADDR permuted,   \
                                             GM_ADDR tiling, int64_t num_tokens) {                         \
    PermuteRowsKernel<T> kernel;                                                                           \
    kernel.Init(hidden, expanded_row_idx, permuted, tiling, num_tokens);                                   \
    kernel.Process();                                                                                      \
  }

MOE_EXT_PERMUTE_ROWS_ENTRY(moe_ext_permute_rows_b2, uint16_t)
MOE_EXT_PERMUTE_ROWS_ENTRY(moe_ext_permute_rows_b4, float)
MOE_EXT_PERMUTE_ROWS_ENTRY(moe_ext_permute_rows_b8, double)
