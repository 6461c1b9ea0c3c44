// The row copy of moe_permute on AscendC vector cores, in scatter form: each
// block takes a contiguous range of tokens, reads their rows into UB in tiles
// (double buffered: the next tile is read while the current one is written)
// and writes each token's row to its K positions expanded_row_idx[t*K + k]
// (skipping -1). Every permuted row is named by exactly one (t, k), so it has
// one writer; rows no index names (past the valid count) stay unwritten, as
// the contract says; a token row is read once for its K copies. All GM writes
// are DMA (DataCopyPad), never scalar SetValue (twin rule R9).
// Tiling words: split over tokens; kItemsPerTile = tokens per tile; kRowElements = elements per
// row (as words of T); kRowStride = UB words between staged rows (32-byte multiple);
// kSourceRows = rows of permuted (T*K, the bound of expanded_row_idx); kExtra = topk.
#pragma once

#include "kernels/common.h"

namespace moe_ext::ascend {

template <typename T>
class PermuteRowsKernel {
 public:
  __aicore__ inline void Init(GM_ADDR hidden, GM_ADDR expanded_row_idx, GM_ADDR permuted, GM_ADDR tiling,
                              int64_t num_tokens) {
    tiling_ = load_tiling(tiling);
    row_elements_ = tiling_.row_elements;
    row_stride_ = tiling_.row_stride;
    per_tile_ = tiling_.items_per_tile;
    rows_ = tiling_.source_rows;
    topk_ = tiling_.extra;
    hidden_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(hidden), static_cast<uint64_t>(num_tokens * row_elements_));
    row_idx_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(expanded_row_idx), static_cast<uint64_t>(rows_));
    permuted_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(permuted), static_cast<uint64_t>(rows_ * row_elements_));
    pipe_.InitBuffer(queue_, 2, per_tile_ * row_stride_ * static_cast<int64_t>(sizeof(T)));
  }

  __aicore__ inline void Process() {
    const BlockRange range = tiling_.range;
    if (range.start >= range.end || row_elements_ == 0) return;
    int64_t tile = range.start;
    CopyIn(tile);
    while (tile < range.end) {
      const int64_t next = tile + per_tile_;
      if (next < range.end) CopyIn(next);  // in flight while `tile` is written
      CopyOut(tile);
      tile = next;
    }
  }

 private:
  __aicore__ inline void CopyIn(int64_t first) {
    AscendC::LocalTensor<T> rows = queue_.template AllocTensor<T>();
    const int64_t count = min64(per_tile_, tiling_.range.end - first);
    // `count` token rows, contiguous in GM, each landing at a 32-byte-aligned UB stride
    AscendC::DataCopyPad(rows, hidden_[first * row_elements_],
                         AscendC::DataCopyExtParams{static_cast<uint16_t>(count),
                                                    static_cast<uint32_t>(row_elements_ * sizeof(T)), 0,
                                                    static_cast<uint32_t>(StrideGapBlocks()), 0},
                         AscendC::DataCopyPadExtParams<T>{false, 0, 0, T{}});
    queue_.EnQue(rows);
  }

  __aicore__ inline void CopyOut(int64_t first) {
    AscendC::LocalTensor<T> rows = queue_.template DeQue<T>();
    const int64_t count = min64(per_tile_, tiling_.range.end - first);
    const AscendC::DataCopyExtParams one_row{1, static_cast<uint32_t>(row_elements_ * sizeof(T)), 0, 0, 0};
    for (int64_t r = 0; r < count; ++r) {
      const int64_t token = first + r;
      for (int64_t k = 0; k < topk_; ++k) {
        const int64_t p = static_cast<int64_t>(row_idx_.GetValue(token * topk_ + k));
        MOE_ASCEND_CHECK(p >= -1 && p < rows_, "moe_permute: expanded_row_idx out of [-1, rows)");
        if (p >= 0) AscendC::DataCopyPad(permuted_[p * row_elements_], rows[r * row_stride_], one_row);
      }
    }
    queue_.FreeTensor(rows);
  }

  // UB gap between staged rows, in 32-byte blocks, beyond each row's own rounded length.
  __aicore__ inline int64_t StrideGapBlocks() const {
    const int64_t rounded = (row_elements_ * static_cast<int64_t>(sizeof(T)) + 31) / 32 * 32;
    return (row_stride_ * static_cast<int64_t>(sizeof(T)) - rounded) / 32;
  }

  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> queue_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<T> hidden_, permuted_;
  AscendC::GlobalTensor<int32_t> row_idx_;
  int64_t row_elements_ = 0, row_stride_ = 0, per_tile_ = 1, rows_ = 0, topk_ = 1;
};

}  // namespace moe_ext::ascend
