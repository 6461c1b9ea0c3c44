// The inverse of a row index on AscendC vector cores, and the fills around it:
// scatter_rows and the backward of moe_unpermute are gathers through
// inverse[row] = p (the position p whose index names `row`, -1 when none), so
// that every output row has exactly one writer and no atomics are needed.
// Three launches (a block never reads what another block of the same launch
// writes, rule R6 of the twin):
//   1. FillKernel<int32_t>   inverse[:] = -1
//   2. InverseWrite          inverse[indices[p]] = p for every p with indices[p] >= 0
//                            (indices outside [-1, rows) fail the device check)
//   3. InverseVerify         every p re-reads inverse[indices[p]] and checks it is p:
//                            when two positions name one row only one write survives,
//                            so the other position fails the check ("names a row twice")
//                            whichever write the hardware kept.
// Tiling words (stream kernels): kItemsPerTile = elements per UB tile,
// kRowElements = the element count (indices for 2/3, filled elements for 1),
// kSourceRows = rows of the inverse (2/3).
#pragma once

#include "kernels/common.h"

namespace moe_ext::ascend {

// out[0, count) = value, written from one UB tile duplicated once per block.
template <typename T>
class FillKernel {
 public:
  __aicore__ inline void Init(GM_ADDR out, GM_ADDR tiling, T value) {
    tiling_ = load_tiling(tiling);
    value_ = value;
    out_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), static_cast<uint64_t>(tiling_.row_elements));
    if (tiling_.items_per_tile > 0)
      pipe_.InitBuffer(tile_buffer_, tiling_.items_per_tile * static_cast<int64_t>(sizeof(T)));
  }

  __aicore__ inline void Process() {
    if (tiling_.range.start >= tiling_.range.end) return;
    AscendC::LocalTensor<T> tile = tile_buffer_.template Get<T>();
    AscendC::Duplicate(tile, value_, tiling_.items_per_tile);
    for (int64_t first = tiling_.range.start; first < tiling_.range.end; first += tiling_.items_per_tile) {
      const int64_t n = min64(tiling_.items_per_tile, tiling_.range.end - first);
      AscendC::DataCopyPad(out_[first], tile,
                           AscendC::DataCopyExtParams{1, static_cast<uint32_t>(n * sizeof(T)), 0, 0, 0});
    }
  }

 private:
  AscendC::TPipe pipe_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> tile_buffer_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<T> out_;
  T value_{};
};

// Shared by InverseWrite / InverseVerify: walks this block's indices in UB tiles.
template <typename IndexT>
class InverseBase {
 public:
  __aicore__ inline void InitBase(GM_ADDR indices, GM_ADDR inverse, GM_ADDR tiling, int64_t op) {
    tiling_ = load_tiling(tiling);
    rows_ = tiling_.source_rows;
    op_ = op;
    indices_.SetGlobalBuffer(reinterpret_cast<__gm__ IndexT*>(indices), static_cast<uint64_t>(tiling_.row_elements));
    inverse_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(inverse), static_cast<uint64_t>(rows_));
    pipe_.InitBuffer(queue_, 2, tiling_.items_per_tile * static_cast<int64_t>(sizeof(IndexT)));
  }

  template <typename Visit>
  __aicore__ inline void ForEachNamedRow(Visit&& visit) {
    for (int64_t first = tiling_.range.start; first < tiling_.range.end; first += tiling_.items_per_tile) {
      const int64_t n = min64(tiling_.items_per_tile, tiling_.range.end - first);
      AscendC::LocalTensor<IndexT> tile = queue_.template AllocTensor<IndexT>();
      AscendC::DataCopyPad(tile, indices_[first],
                           AscendC::DataCopyExtParams{1, static_cast<uint32_t>(n * sizeof(IndexT)), 0, 0, 0},
                           AscendC::DataCopyPadExtParams<IndexT>{false, 0, 0, IndexT(0)});
      queue_.EnQue(tile);
      tile = queue_.template DeQue<IndexT>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = static_cast<int64_t>(tile.GetValue(i));
        if (op_ == 0) {
          MOE_ASCEND_CHECK(row >= -1 && row < rows_, "scatter_rows: indices out of range [-1, num_rows)");
        } else {
          MOE_ASCEND_CHECK(row >= -1 && row < rows_,
                           "moe_unpermute_backward: expanded_row_idx out of range [-1, rows of permuted)");
        }
        if (row >= 0) visit(first + i, row);
      }
      queue_.FreeTensor(tile);
    }
  }

 protected:
  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> queue_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<IndexT> indices_;
  AscendC::GlobalTensor<int32_t> inverse_;
  int64_t rows_ = 0, op_ = 0;  // op_: 0 = scatter_rows, 1 = moe_unpermute_backward (the check's wording)
};

template <typename IndexT>
class InverseWrite : public InverseBase<IndexT> {
 public:
  __aicore__ inline void Init(GM_ADDR indices, GM_ADDR inverse, GM_ADDR tiling, int64_t op) {
    this->InitBase(indices, inverse, tiling, op);
  }
  __aicore__ inline void Process() {
    this->ForEachNamedRow([&](int64_t p, int64_t row) { this->inverse_.SetValue(row, static_cast<int32_t>(p)); });
  }
};

template <typename IndexT>
class InverseVerify : public InverseBase<IndexT> {
 public:
  __aicore__ inline void Init(GM_ADDR indices, GM_ADDR inverse, GM_ADDR tiling, int64_t op) {
    this->InitBase(indices, inverse, tiling, op);
  }
  __aicore__ inline void Process() {
    this->ForEachNamedRow([&](int64_t p, int64_t row) {
      const bool once = static_cast<int64_t>(this->inverse_.GetValue(row)) == p;
      if (this->op_ == 0) {
        MOE_ASCEND_CHECK(once, "scatter_rows: indices names a row twice");
      } else {
        MOE_ASCEND_CHECK(once, "moe_unpermute_backward: expanded_row_idx names a row twice");
      }
    });
  }
};

}  // namespace moe_ext::ascend
