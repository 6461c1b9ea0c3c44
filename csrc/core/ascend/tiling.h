// Host-side tiling of the AscendC kernels (csrc/ascend/): how a launch splits
// its work over vector cores and into Unified Buffer (UB) tiles. Pure
// functions, torch-free, gtested (tests/cpp/test_ascend_tiling.cpp).
//
// The rules they encode (each from Ascend C's documentation, see
// csrc/ascend/twin/kernel_operator.h for the page of each):
//   - every UB operand starts 32-byte aligned, so each tile's UB footprint is
//     rounded up to 32 bytes;
//   - the UB of one vector core holds everything a kernel allocates at once:
//     `buffers` copies of each queue's tile (2 = double buffering) plus the
//     scratch buffers; the capacity is a parameter (GetCoreMemSize on device);
//   - a kernel is launched on `blocks` cores; block b handles the half-open
//     range [start(b), end(b)) of the work items, all ranges contiguous,
//     sizes differing by at most one.
#pragma once

#include <array>
#include <cstdint>

namespace moe_ext::core::ascend {

constexpr int64_t kUbAlignBytes = 32;

// Bytes rounded up to the 32-byte UB unit.
int64_t ub_round_up(int64_t bytes);

// A launch over `items` work items (rows, tokens or ids).
struct BlockSplit {
  int64_t blocks = 0;          // cores launched (>= 1, even for 0 items)
  int64_t items = 0;           // total work items
  int64_t base = 0;            // items per block, before the remainder
  int64_t remainder = 0;       // the first `remainder` blocks take one more
  int64_t start(int64_t block) const;
  int64_t end(int64_t block) const;
};

// Splits `items` over at most `max_cores` cores, at least `min_items_per_core`
// items per core where possible (small launches use fewer cores).
BlockSplit split_over_cores(int64_t items, int64_t max_cores, int64_t min_items_per_core);

// Tiling of a row kernel: each work item is one row of `row_bytes` bytes
// staged through UB; `buffers` copies of the row tile live in each of
// `queues` queues, plus `scratch_bytes_per_row` of fp32 (or other) scratch per
// staged row. rows_per_tile is the largest count that fits in `ub_bytes`.
struct RowTiling {
  BlockSplit split;
  int64_t row_bytes = 0;        // useful bytes of one row
  int64_t row_stride_ub = 0;    // bytes between staged rows in UB (32-byte multiple)
  int64_t rows_per_tile = 0;    // rows staged per tile (>= 1)
  int64_t ub_bytes_used = 0;    // total UB the kernel allocates
};

RowTiling plan_row_tiling(int64_t num_rows, int64_t row_bytes, int64_t scratch_bytes_per_row, int64_t queues,
                          int64_t buffers, int64_t max_cores, int64_t ub_bytes);

// Tiling of a streaming kernel over `count` scalars of `element_bytes` each
// (ids, indices): elements per tile, a multiple of 32 bytes' worth, that fit
// `buffers` tiles plus `fixed_ub_bytes` (e.g. a per-core histogram) in UB.
struct StreamTiling {
  BlockSplit split;
  int64_t elements_per_tile = 0;
  int64_t ub_bytes_used = 0;
};

StreamTiling plan_stream_tiling(int64_t count, int64_t element_bytes, int64_t fixed_ub_bytes, int64_t buffers,
                                int64_t max_cores, int64_t ub_bytes);

// The int64 argument block a kernel launch reads (the word order of
// csrc/ascend/kernels/common.h's TilingWord): blocks, base, remainder,
// items_per_tile, row_elements (stream kernels: the element count), row_stride
// (UB elements between staged rows), source_rows, extra (topk / num_experts).
using KernelTilingWords = std::array<int64_t, 8>;

KernelTilingWords kernel_tiling_words(const BlockSplit& split, int64_t items_per_tile, int64_t row_elements,
                                      int64_t row_stride, int64_t source_rows, int64_t extra);

}  // namespace moe_ext::core::ascend
