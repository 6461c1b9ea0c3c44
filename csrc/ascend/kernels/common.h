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

__aicore__ inline BlockRange block_range(const AscendC::GlobalTensor<int64_t>& tiling) {
  const int64_t block = AscendC::GetBlockIdx();
  const int64_t base = tiling.GetValue(kBase), remainder = tiling.GetValue(kRemainder);
  const int64_t start = block * base + (block < remainder ? block : remainder);
  return {start, start + base + (block < remainder ? 1 : 0)};
}

__aicore__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace moe_ext::ascend
