// What every moe_ext AscendC kernel shares: the API header (CANN's on device,
// csrc/ascend/twin/kernel_operator.h in CI), the device check, and the layout
// of the int64 argument block each launch reads its tiling from.
#pragma once

#include <cassert>
#include <cstdint>

#include "kernel_operator.h"

#ifndef MOE_ASCEND_CHECK
// On device a failed check traps the core (assert); the twin throws instead.
#define MOE_ASCEND_CHECK(cond, message) assert(cond)
#endif

namespace moe_ext::ascend {

// The tiling argument block (int64 words in GM), filled on the host from
// moe_ext::core::ascend::{RowTiling, StreamTiling} (csrc/core/ascend/tiling.h).
enum TilingWord : int32_t {
  kBlocks = 0,          // cores launched
  kBase = 1,            // work items per block before the remainder
  kRemainder = 2,       // the first kRemainder blocks take one more item
  kItemsPerTile = 3,    // rows (row kernels) or elements (stream kernels) per UB tile
  kRowElements = 4,     // row kernels: elements per row; stream kernels: total element count
  kRowStride = 5,       // row kernels: UB elements between staged rows (32-byte multiple)
  kSourceRows = 6,      // rows of the source tensor (index range check)
  kExtra = 7,           // kernel-specific: topk (unpermute), num_experts (histogram)
  kTilingWords = 8,
};

struct BlockRange {
  int64_t start;
  int64_t end;
};

// The argument block read once at a kernel's Init, and this block's share of the work items.
struct KernelTiling {
  int64_t blocks = 1, base = 0, remainder = 0, items_per_tile = 0, row_elements = 0, row_stride = 0,
          source_rows = 0, extra = 0;
  BlockRange range{0, 0};
};

__aicore__ inline KernelTiling load_tiling(GM_ADDR tiling) {
  AscendC::GlobalTensor<int64_t> words;
  words.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(tiling), kTilingWords);
  KernelTiling t;
  t.blocks = words.GetValue(kBlocks);
  t.base = words.GetValue(kBase);
  t.remainder = words.GetValue(kRemainder);
  t.items_per_tile = words.GetValue(kItemsPerTile);
  t.row_elements = words.GetValue(kRowElements);
  t.row_stride = words.GetValue(kRowStride);
  t.source_rows = words.GetValue(kSourceRows);
  t.extra = words.GetValue(kExtra);
  const int64_t block = AscendC::GetBlockIdx();
  t.range.start = block * t.base + (block < t.remainder ? block : t.remainder);
  t.range.end = t.range.start + t.base + (block < t.remainder ? 1 : 0);
  return t;
}

__aicore__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace moe_ext::ascend
