// The inverse of a row index on AscendC vector cores: inverse[row] = p, the
// position p whose index names `row`, or -1 when none. scatter_rows and the
// backward of moe_unpermute are gathers through it, so every output row has
// exactly one writer and no atomics are needed.
//
// One launch, InverseBuildKernel. The inverse is cut into chunks of C rows;
// each block owns whole chunks, builds a chunk in UB (-1, then every index
// naming a row of the chunk writes its position there) and copies it out with
// one DataCopyPad. So every GM element has one writer, written by DMA: no
// scalar SetValue on GM, whose 64-byte data-cache lines would let cores
// overwrite each other (twin rule R9). A row named twice is found in UB by
// the block owning it and fails the device check; an index outside
// [-1, rows) fails it in every block. Each block reads all indices once per
// chunk it owns (indices are small next to the rows they move).
//
// FillKernel writes a constant through one UB tile (the zeros of grad_probs
// when they are not computed).
#pragma once

#include "kernels/common.h"

namespace moe_ext::ascend {

// out[0, count) = value; tiling: split over elements, kItemsPerTile = elements per tile,
// kRowElements = count.
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

// Tiling words: the split over chunks; kItemsPerTile = indices per UB tile; kRowElements = the
// index count; kRowStride = C, rows per chunk; kSourceRows = rows of the inverse.
// op: 0 = scatter_rows, 1 = moe_unpermute_backward (the wording of the device checks).
template <typename IndexT>
class InverseBuildKernel {
 public:
  __aicore__ inline void Init(GM_ADDR indices, GM_ADDR inverse, GM_ADDR tiling, int64_t op) {
    tiling_ = load_tiling(tiling);
    count_ = tiling_.row_elements;
    chunk_ = tiling_.row_stride;
    rows_ = tiling_.source_rows;
    op_ = op;
    indices_.SetGlobalBuffer(reinterpret_cast<__gm__ IndexT*>(indices), static_cast<uint64_t>(count_));
    inverse_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(inverse), static_cast<uint64_t>(rows_));
    pipe_.InitBuffer(queue_, 2, tiling_.items_per_tile * static_cast<int64_t>(sizeof(IndexT)));
    pipe_.InitBuffer(chunk_buffer_, chunk_ * static_cast<int64_t>(sizeof(int32_t)));
  }

  __aicore__ inline void Process() {
    for (int64_t c = tiling_.range.start; c < tiling_.range.end; ++c) Chunk(c * chunk_, min64(rows_, (c + 1) * chunk_));
  }

 private:
  __aicore__ inline void Chunk(int64_t lo, int64_t hi) {
    AscendC::LocalTensor<int32_t> owned = chunk_buffer_.template Get<int32_t>();
    AscendC::Duplicate(owned, int32_t(-1), chunk_);
    const int64_t per_tile = tiling_.items_per_tile;
    for (int64_t first = 0; first < count_; first += per_tile) {
      const int64_t n = min64(per_tile, count_ - first);
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
        if (row < lo || row >= hi) continue;
        const bool first_name = owned.GetValue(row - lo) < 0;
        if (op_ == 0) {
          MOE_ASCEND_CHECK(first_name, "scatter_rows: indices names a row twice");
        } else {
          MOE_ASCEND_CHECK(first_name, "moe_unpermute_backward: expanded_row_idx names a row twice");
        }
        owned.SetValue(row - lo, static_cast<int32_t>(first + i));
      }
      queue_.FreeTensor(tile);
    }
    if (hi > lo)
      AscendC::DataCopyPad(inverse_[lo], owned,
                           AscendC::DataCopyExtParams{1, static_cast<uint32_t>((hi - lo) * sizeof(int32_t)), 0, 0, 0});
  }

  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> queue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> chunk_buffer_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<IndexT> indices_;
  AscendC::GlobalTensor<int32_t> inverse_;
  int64_t count_ = 0, chunk_ = 8, rows_ = 0, op_ = 0;
};

}  // namespace moe_ext::ascend
