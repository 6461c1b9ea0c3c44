// expert_histogram on AscendC vector cores, in two launches and without
// atomics (deterministic, like the CUDA kernel's fixed-order reduction):
//   1. ExpertHistogramPartial: each block streams its share of the ids through
//      UB tiles and counts them in a UB histogram; ids outside [0, E) (the -1
//      padding) are not counted; the block writes its row of the partial-count
//      workspace [blocks, E] (int64).
//   2. ExpertHistogramReduce: each block sums one range of experts over the
//      partial rows, in block order.
#pragma once

#include "kernels/common.h"

namespace moe_ext::ascend {

template <typename IdT>
class ExpertHistogramPartial {
 public:
  __aicore__ inline void Init(GM_ADDR ids, GM_ADDR workspace, GM_ADDR tiling) {
    tiling_ = load_tiling(tiling);
    range_ = tiling_.range;
    experts_ = tiling_.extra;
    per_tile_ = tiling_.items_per_tile;
    const int64_t count = tiling_.row_elements;
    ids_.SetGlobalBuffer(reinterpret_cast<__gm__ IdT*>(ids), static_cast<uint64_t>(count));
    workspace_.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(workspace),
                               static_cast<uint64_t>(tiling_.blocks * experts_));
    pipe_.InitBuffer(queue_, 2, per_tile_ * static_cast<int64_t>(sizeof(IdT)));
    pipe_.InitBuffer(counts_buffer_, experts_ * static_cast<int64_t>(sizeof(int64_t)));
  }

  __aicore__ inline void Process() {
    AscendC::LocalTensor<int64_t> counts = counts_buffer_.template Get<int64_t>();
    for (int64_t e = 0; e < experts_; ++e) counts.SetValue(e, 0);  // scalar: int64 has no vector Duplicate on A2
    for (int64_t first = range_.start; first < range_.end; first += per_tile_) {
      const int64_t n = min64(per_tile_, range_.end - first);
      AscendC::LocalTensor<IdT> tile = queue_.template AllocTensor<IdT>();
      AscendC::DataCopyPad(tile, ids_[first], AscendC::DataCopyExtParams{1, static_cast<uint32_t>(n * sizeof(IdT)), 0, 0, 0},
                           AscendC::DataCopyPadExtParams<IdT>{false, 0, 0, IdT(0)});
      queue_.EnQue(tile);
      tile = queue_.template DeQue<IdT>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t id = static_cast<int64_t>(tile.GetValue(i));
        if (id >= 0 && id < experts_) counts.SetValue(id, counts.GetValue(id) + 1);
      }
      queue_.FreeTensor(tile);
    }
    const int64_t block = AscendC::GetBlockIdx();
    AscendC::DataCopyPad(workspace_[block * experts_], counts,
                         AscendC::DataCopyExtParams{1, static_cast<uint32_t>(experts_ * sizeof(int64_t)), 0, 0, 0});
  }

 private:
  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> queue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> counts_buffer_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<int64_t> workspace_;
  AscendC::GlobalTensor<IdT> ids_;
  BlockRange range_{0, 0};
  int64_t experts_ = 0, per_tile_ = 0;
};

class ExpertHistogramReduce {
 public:
  // tiling: kBlocks/kBase/kRemainder split the experts; kSourceRows = partial rows; kExtra = num_experts.
  __aicore__ inline void Init(GM_ADDR workspace, GM_ADDR counts, GM_ADDR tiling) {
    tiling_ = load_tiling(tiling);
    range_ = tiling_.range;
    experts_ = tiling_.extra;
    partial_rows_ = tiling_.source_rows;
    workspace_.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(workspace),
                               static_cast<uint64_t>(partial_rows_ * experts_));
    counts_.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(counts), static_cast<uint64_t>(experts_));
    const int64_t span = range_.end - range_.start;
    if (span > 0) {
      pipe_.InitBuffer(queue_, 2, span * static_cast<int64_t>(sizeof(int64_t)));
      pipe_.InitBuffer(sum_buffer_, span * static_cast<int64_t>(sizeof(int64_t)));
    }
  }

  __aicore__ inline void Process() {
    const int64_t span = range_.end - range_.start;
    if (span <= 0) return;
    AscendC::LocalTensor<int64_t> sum = sum_buffer_.template Get<int64_t>();
    for (int64_t e = 0; e < span; ++e) sum.SetValue(e, 0);
    const AscendC::DataCopyExtParams row{1, static_cast<uint32_t>(span * sizeof(int64_t)), 0, 0, 0};
    for (int64_t r = 0; r < partial_rows_; ++r) {
      AscendC::LocalTensor<int64_t> part = queue_.template AllocTensor<int64_t>();
      AscendC::DataCopyPad(part, workspace_[r * experts_ + range_.start], row,
                           AscendC::DataCopyPadExtParams<int64_t>{false, 0, 0, 0});
      queue_.EnQue(part);
      part = queue_.template DeQue<int64_t>();
      for (int64_t e = 0; e < span; ++e) sum.SetValue(e, sum.GetValue(e) + part.GetValue(e));
      queue_.FreeTensor(part);
    }
    AscendC::DataCopyPad(counts_[range_.start], sum, row);
  }

 private:
  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> queue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> sum_buffer_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<int64_t> workspace_, counts_;
  BlockRange range_{0, 0};
  int64_t experts_ = 0, partial_rows_ = 0;
};

}  // namespace moe_ext::ascend
