#include "core/ascend/tiling.h"

#include <algorithm>
#include <limits>

#include "core/check.h"

namespace moe_ext::core::ascend {

namespace {

// Overflow-safe a * b for the non-negative sizes used here; refuses what cannot fit.
int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  MOE_CHECK_ARG(a == 0 || b <= std::numeric_limits<int64_t>::max() / a, "ascend tiling: ", what,
                " overflows int64 (", a, " x ", b, ")");
  return a * b;
}

}  // namespace

int64_t ub_round_up(int64_t bytes) {
  MOE_CHECK_ARG(bytes >= 0 && bytes <= std::numeric_limits<int64_t>::max() - kUbAlignBytes,
                "ascend tiling: byte count must be in [0, 2^63 - 32), got ", bytes);
  return (bytes + kUbAlignBytes - 1) / kUbAlignBytes * kUbAlignBytes;
}

int64_t BlockSplit::start(int64_t block) const {
  return block * base + std::min(block, remainder);
}

int64_t BlockSplit::end(int64_t block) const {
  return start(block) + base + (block < remainder ? 1 : 0);
}

BlockSplit split_over_cores(int64_t items, int64_t max_cores, int64_t min_items_per_core) {
  MOE_CHECK_ARG(items >= 0, "ascend tiling: items must be >= 0, got ", items);
  MOE_CHECK_ARG(max_cores >= 1, "ascend tiling: max_cores must be >= 1, got ", max_cores);
  MOE_CHECK_ARG(min_items_per_core >= 1, "ascend tiling: min_items_per_core must be >= 1, got ",
                min_items_per_core);
  BlockSplit split;
  split.items = items;
  // ceil(items / min_items_per_core) without overflow, at least one core
  const int64_t wanted = items / min_items_per_core + (items % min_items_per_core != 0 ? 1 : 0);
  split.blocks = std::max<int64_t>(1, std::min(max_cores, wanted));
  split.base = items / split.blocks;
  split.remainder = items % split.blocks;
  return split;
}

RowTiling plan_row_tiling(int64_t num_rows, int64_t row_bytes, int64_t scratch_bytes_per_row, int64_t queues,
                          int64_t buffers, int64_t max_cores, int64_t ub_bytes) {
  MOE_CHECK_ARG(num_rows >= 0, "ascend row tiling: num_rows must be >= 0, got ", num_rows);
  MOE_CHECK_ARG(row_bytes >= 1, "ascend row tiling: row_bytes must be >= 1, got ", row_bytes);
  MOE_CHECK_ARG(scratch_bytes_per_row >= 0, "ascend row tiling: scratch_bytes_per_row must be >= 0, got ",
                scratch_bytes_per_row);
  MOE_CHECK_ARG(queues >= 1, "ascend row tiling: queues must be >= 1, got ", queues);
  MOE_CHECK_ARG(buffers >= 1 && buffers <= 8, "ascend row tiling: buffers must be in [1, 8], got ", buffers);
  MOE_CHECK_ARG(ub_bytes >= kUbAlignBytes, "ascend row tiling: ub_bytes must be >= 32, got ", ub_bytes);
  RowTiling tiling;
  tiling.split = split_over_cores(num_rows, max_cores, 1);
  tiling.row_bytes = row_bytes;
  tiling.row_stride_ub = ub_round_up(row_bytes);
  const int64_t per_row = checked_mul(checked_mul(tiling.row_stride_ub, queues, "row tile"), buffers, "row tile") +
                          ub_round_up(scratch_bytes_per_row);
  MOE_CHECK_ARG(per_row <= ub_bytes, "ascend row tiling: one row needs ", per_row, " bytes of UB (row of ",
                row_bytes, " bytes, ", queues, " queues x ", buffers, " buffers, ", scratch_bytes_per_row,
                " scratch) but a core has ", ub_bytes, "; rows this long need a column-split kernel");
  const int64_t rows_per_block = tiling.split.base + (tiling.split.remainder > 0 ? 1 : 0);
  tiling.rows_per_tile = std::max<int64_t>(1, std::min(ub_bytes / per_row, std::max<int64_t>(1, rows_per_block)));
  tiling.ub_bytes_used = tiling.rows_per_tile * per_row;
  return tiling;
}

StreamTiling plan_stream_tiling(int64_t count, int64_t element_bytes, int64_t fixed_ub_bytes, int64_t buffers,
                                int64_t max_cores, int64_t ub_bytes) {
  MOE_CHECK_ARG(count >= 0, "ascend stream tiling: count must be >= 0, got ", count);
  MOE_CHECK_ARG(element_bytes >= 1 && element_bytes <= kUbAlignBytes && kUbAlignBytes % element_bytes == 0,
                "ascend stream tiling: element_bytes must divide 32, got ", element_bytes);
  MOE_CHECK_ARG(buffers >= 1 && buffers <= 8, "ascend stream tiling: buffers must be in [1, 8], got ", buffers);
  const int64_t fixed = ub_round_up(fixed_ub_bytes);
  MOE_CHECK_ARG(fixed + buffers * kUbAlignBytes <= ub_bytes, "ascend stream tiling: ", fixed,
                " fixed bytes plus one 32-byte tile per buffer exceed the ", ub_bytes, "-byte UB of a core");
  StreamTiling tiling;
  const int64_t per_unit = kUbAlignBytes / element_bytes;       // elements per 32 bytes
  tiling.split = split_over_cores(count, max_cores, 8 * per_unit);  // small streams stay on few cores
  const int64_t units_fit = (ub_bytes - fixed) / (buffers * kUbAlignBytes);
  const int64_t per_block = tiling.split.base + (tiling.split.remainder > 0 ? 1 : 0);
  const int64_t units_needed = std::max<int64_t>(1, per_block / per_unit + (per_block % per_unit != 0 ? 1 : 0));
  tiling.elements_per_tile = std::min(units_fit, units_needed) * per_unit;
  tiling.ub_bytes_used = fixed + buffers * ub_round_up(tiling.elements_per_tile * element_bytes);
  return tiling;
}

KernelTilingWords kernel_tiling_words(const BlockSplit& split, int64_t items_per_tile, int64_t row_elements,
                                      int64_t row_stride, int64_t source_rows, int64_t extra) {
  return {split.blocks, split.base, split.remainder, items_per_tile, row_elements, row_stride, source_rows, extra};
}

}  // namespace moe_ext::core::ascend
