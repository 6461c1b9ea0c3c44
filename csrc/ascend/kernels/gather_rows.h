// gather_rows on an AscendC vector core: out[p] = x[indices[p]], a zero row
// where indices[p] == -1 (the contract of moe_ext.ops.gather_rows; also the
// row pass of group_by_local_expert, and of scatter_rows through the inverse
// index). Each block copies its range of output rows through UB tiles of kItemsPerTile rows, double buffered: the next
// tile's rows are read while the current tile is written out. Rows of any
// element type travel as their bytes (T = uint16_t / float / double words).
#pragma once

#include "kernels/common.h"

namespace moe_ext::ascend {

template <typename T, typename IndexT>
class GatherRowsKernel {
 public:
  __aicore__ inline void Init(GM_ADDR x, GM_ADDR indices, GM_ADDR out, GM_ADDR tiling, int64_t num_out_rows) {
    tiling_ = load_tiling(tiling);
    range_ = tiling_.range;
    row_elements_ = tiling_.row_elements;
    row_stride_ = tiling_.row_stride;
    rows_per_tile_ = tiling_.items_per_tile;
    source_rows_ = tiling_.source_rows;
    x_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(x), static_cast<uint64_t>(source_rows_ * row_elements_));
    indices_.SetGlobalBuffer(reinterpret_cast<__gm__ IndexT*>(indices), static_cast<uint64_t>(num_out_rows));
    out_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), static_cast<uint64_t>(num_out_rows * row_elements_));
    pipe_.InitBuffer(queue_, 2, rows_per_tile_ * row_stride_ * static_cast<int64_t>(sizeof(T)));
  }

  __aicore__ inline void Process() {
    if (range_.start >= range_.end || row_elements_ == 0) return;
    int64_t tile = range_.start;
    CopyIn(tile);
    while (tile < range_.end) {
      const int64_t next = tile + rows_per_tile_;
      if (next < range_.end) CopyIn(next);  // in flight while `tile` is written
      CopyOut(tile);
      tile = next;
    }
  }

 private:
  __aicore__ inline void CopyIn(int64_t first) {
    AscendC::LocalTensor<T> rows = queue_.template AllocTensor<T>();
    const int64_t count = min64(rows_per_tile_, range_.end - first);
    const AscendC::DataCopyExtParams one_row{1, static_cast<uint32_t>(row_elements_ * sizeof(T)), 0, 0, 0};
    for (int64_t r = 0; r < count; ++r) {
      const int64_t source = static_cast<int64_t>(indices_.GetValue(first + r));
      MOE_ASCEND_CHECK(source >= -1 && source < source_rows_, "gather_rows: index out of [-1, rows of x)");
      if (source >= 0) {
        AscendC::DataCopyPad(rows[r * row_stride_], x_[source * row_elements_], one_row,
                             AscendC::DataCopyPadExtParams<T>{false, 0, 0, T(0)});
      } else {
        AscendC::Duplicate(rows[r * row_stride_], T(0), row_stride_);
      }
    }
    queue_.EnQue(rows);
  }

  __aicore__ inline void CopyOut(int64_t first) {
    AscendC::LocalTensor<T> rows = queue_.template DeQue<T>();
    const int64_t count = min64(rows_per_tile_, range_.end - first);
    const AscendC::DataCopyExtParams tile_rows{static_cast<uint16_t>(count),
                                               static_cast<uint32_t>(row_elements_ * sizeof(T)), 0, 0, 0};
    AscendC::DataCopyPad(out_[first * row_elements_], rows, tile_rows);
    queue_.FreeTensor(rows);
  }

  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> queue_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<T> x_, out_;
  AscendC::GlobalTensor<IndexT> indices_;
  BlockRange range_{0, 0};
  int64_t row_elements_ = 0, row_stride_ = 0, rows_per_tile_ = 1, source_rows_ = 0;
};

}  // namespace moe_ext::ascend
