// The routing layout of moe_permute on AscendC vector cores: a stable
// counting sort of the rows f = t*K + k by local expert key (contract in
// csrc/core/routing_layout.h, the dropless layout of npu_moe_init_routing_v2),
// in three launches and without atomics:
//   1. PermuteKeyCount: each block counts the keys of its contiguous range of
//      rows into its row of a [blocks, A] workspace (A = active range size);
//   2. PermuteScan (one block): per (block, key) start positions - keys in
//      order, blocks in order within a key, which is what makes the sort
//      stable - plus expert_tokens (counts or cumsum); its scalar GM writes
//      are written out with DataCacheCleanAndInvalid (twin rule R9);
//   3. PermutePlace: each block walks its rows again in order, giving each
//      kept row the next position of its key: expanded_row_idx[f] (gather
//      form, -1 when dropped), written through UB tiles by DMA.
// Then the row copy (kernels/permute_rows.h) moves each token's row to its K
// positions. A row is dropped when its id is -1 (no expert), its key
// (expert_map[id], or id) is -1 or outside [active_start, active_end); any
// other id outside [0, num_experts) or map value outside [-1, num_experts)
// fails the device check. Keys are compared before anything is subtracted.
#pragma once

#include "kernels/common.h"

namespace moe_ext::ascend {

// Tiling words shared by the three launches: split over rows (stage 1 and 3);
// kItemsPerTile = ids per UB tile; kRowElements = rows (T*K); kRowStride = active_start;
// kSourceRows = active_end; kExtra = num_experts. Stage 2 reads the stage-1 block count
// from kBlocks of the same words (it is launched on one block).
template <typename IdT, typename MapT>
class PermuteKeys {
 public:
  __aicore__ inline void InitKeys(GM_ADDR ids, GM_ADDR expert_map, GM_ADDR tiling) {
    tiling_ = load_tiling(tiling);
    range_ = tiling_.range;
    per_tile_ = tiling_.items_per_tile;
    rows_ = tiling_.row_elements;
    active_start_ = tiling_.row_stride;
    active_end_ = tiling_.source_rows;
    experts_ = tiling_.extra;
    ids_.SetGlobalBuffer(reinterpret_cast<__gm__ IdT*>(ids), static_cast<uint64_t>(rows_));
    has_map_ = expert_map != nullptr;
    if (has_map_) map_.SetGlobalBuffer(reinterpret_cast<__gm__ MapT*>(expert_map), static_cast<uint64_t>(experts_));
    pipe_.InitBuffer(id_queue_, 2, per_tile_ * static_cast<int64_t>(sizeof(IdT)));
  }

  // The local key of one id, or -1 when the row is dropped.
  __aicore__ inline int64_t LocalKey(int64_t id) {
    MOE_ASCEND_CHECK(id >= -1 && id < experts_, "moe_permute: topk_ids must be in [0, num_experts) or -1");
    if (id < 0) return -1;
    int64_t key = id;
    if (has_map_) {
      key = static_cast<int64_t>(map_.GetValue(id));
      MOE_ASCEND_CHECK(key >= -1 && key < experts_, "moe_permute: expert_map values must be in [-1, num_experts)");
    }
    return key >= active_start_ && key < active_end_ ? key - active_start_ : -1;
  }

  // Calls visit(f, local_key) for this block's rows in order, staging ids through UB.
  template <typename Visit>
  __aicore__ inline void ForEachRow(Visit&& visit) {
    for (int64_t first = range_.start; first < range_.end; first += per_tile_) {
      const int64_t n = min64(per_tile_, range_.end - first);
      AscendC::LocalTensor<IdT> tile = id_queue_.template AllocTensor<IdT>();
      AscendC::DataCopyPad(tile, ids_[first], AscendC::DataCopyExtParams{1, static_cast<uint32_t>(n * sizeof(IdT)), 0, 0, 0},
                           AscendC::DataCopyPadExtParams<IdT>{false, 0, 0, IdT(0)});
      id_queue_.EnQue(tile);
      tile = id_queue_.template DeQue<IdT>();
      for (int64_t i = 0; i < n; ++i) visit(first + i, LocalKey(static_cast<int64_t>(tile.GetValue(i))));
      id_queue_.FreeTensor(tile);
    }
  }

 protected:
  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> id_queue_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<IdT> ids_;
  AscendC::GlobalTensor<MapT> map_;
  BlockRange range_{0, 0};
  int64_t per_tile_ = 0, rows_ = 0, active_start_ = 0, active_end_ = 0, experts_ = 1;
  bool has_map_ = false;
};

template <typename IdT, typename MapT>
class PermuteKeyCount : public PermuteKeys<IdT, MapT> {
 public:
  __aicore__ inline void Init(GM_ADDR ids, GM_ADDR expert_map, GM_ADDR workspace, GM_ADDR tiling) {
    this->InitKeys(ids, expert_map, tiling);
    keys_ = this->active_end_ - this->active_start_;
    workspace_.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(workspace),
                               static_cast<uint64_t>(this->tiling_.blocks * keys_));
    if (keys_ > 0) this->pipe_.InitBuffer(counts_buffer_, keys_ * static_cast<int64_t>(sizeof(int64_t)));
  }

  __aicore__ inline void Process() {
    if (keys_ == 0) return;
    AscendC::LocalTensor<int64_t> counts = counts_buffer_.template Get<int64_t>();
    for (int64_t a = 0; a < keys_; ++a) counts.SetValue(a, 0);
    this->ForEachRow([&](int64_t, int64_t key) {
      if (key >= 0) counts.SetValue(key, counts.GetValue(key) + 1);
    });
    AscendC::DataCopyPad(workspace_[AscendC::GetBlockIdx() * keys_], counts,
                         AscendC::DataCopyExtParams{1, static_cast<uint32_t>(keys_ * sizeof(int64_t)), 0, 0, 0});
  }

 private:
  AscendC::TBuf<AscendC::TPosition::VECCALC> counts_buffer_;
  AscendC::GlobalTensor<int64_t> workspace_;
  int64_t keys_ = 0;
};

// One block: workspace [blocks, A] of counts becomes the start positions; writes expert_tokens
// (counts, or their inclusive cumsum when cumulative != 0).
class PermuteScan {
 public:
  __aicore__ inline void Init(GM_ADDR workspace, GM_ADDR expert_tokens, GM_ADDR tiling, int64_t cumulative) {
    tiling_ = load_tiling(tiling);
    blocks_ = tiling_.blocks;
    keys_ = tiling_.source_rows - tiling_.row_stride;
    workspace_.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(workspace), static_cast<uint64_t>(blocks_ * keys_));
    tokens_.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(expert_tokens), static_cast<uint64_t>(keys_));
    cumulative_ = cumulative != 0;
  }

  __aicore__ inline void Process() {
    int64_t position = 0;
    for (int64_t a = 0; a < keys_; ++a) {
      int64_t count = 0;
      for (int64_t b = 0; b < blocks_; ++b) {
        const int64_t partial = workspace_.GetValue(b * keys_ + a);
        workspace_.SetValue(b * keys_ + a, position + count);
        count += partial;
      }
      position += count;
      tokens_.SetValue(a, cumulative_ ? position : count);
    }
    // The scalar writes sit in this core's data cache until written out (R9).
    AscendC::DataCacheCleanAndInvalid<int64_t, AscendC::CacheLine::ENTIRE_DATA_CACHE, AscendC::DcciDst::CACHELINE_OUT>(
        workspace_);
  }

 private:
  KernelTiling tiling_;
  AscendC::GlobalTensor<int64_t> workspace_, tokens_;
  int64_t blocks_ = 1, keys_ = 0;
  bool cumulative_ = false;
};

template <typename IdT, typename MapT>
class PermutePlace : public PermuteKeys<IdT, MapT> {
 public:
  __aicore__ inline void Init(GM_ADDR ids, GM_ADDR expert_map, GM_ADDR workspace, GM_ADDR expanded_row_idx,
                              GM_ADDR tiling) {
    this->InitKeys(ids, expert_map, tiling);
    keys_ = this->active_end_ - this->active_start_;
    workspace_.SetGlobalBuffer(reinterpret_cast<__gm__ int64_t*>(workspace),
                               static_cast<uint64_t>(this->tiling_.blocks * keys_));
    row_idx_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(expanded_row_idx), static_cast<uint64_t>(this->rows_));
    this->pipe_.InitBuffer(out_queue_, 1, this->per_tile_ * static_cast<int64_t>(sizeof(int32_t)));
    if (keys_ > 0) this->pipe_.InitBuffer(next_buffer_, keys_ * static_cast<int64_t>(sizeof(int64_t)));
  }

  __aicore__ inline void Process() {
    const int64_t block = AscendC::GetBlockIdx();
    AscendC::LocalTensor<int64_t> next;
    if (keys_ > 0) {
      next = next_buffer_.template Get<int64_t>();
      AscendC::DataCopyPad(next, workspace_[block * keys_],
                           AscendC::DataCopyExtParams{1, static_cast<uint32_t>(keys_ * sizeof(int64_t)), 0, 0, 0},
                           AscendC::DataCopyPadExtParams<int64_t>{false, 0, 0, 0});
    }
    AscendC::LocalTensor<int32_t> out;
    int64_t tile_first = -1, filled = 0;
    this->ForEachRow([&](int64_t f, int64_t key) {
      if (filled == 0) {
        out = out_queue_.template AllocTensor<int32_t>();
        tile_first = f;
      }
      int32_t position = -1;
      if (key >= 0) {
        const int64_t p = next.GetValue(key);
        next.SetValue(key, p + 1);
        position = static_cast<int32_t>(p);
      }
      out.SetValue(filled++, position);
      if (filled == this->per_tile_ || f + 1 == this->range_.end) {
        out_queue_.EnQue(out);
        out = out_queue_.template DeQue<int32_t>();
        AscendC::DataCopyPad(row_idx_[tile_first], out,
                             AscendC::DataCopyExtParams{1, static_cast<uint32_t>(filled * sizeof(int32_t)), 0, 0, 0});
        out_queue_.FreeTensor(out);
        filled = 0;
      }
    });
  }

 private:
  AscendC::TQue<AscendC::TPosition::VECOUT, 1> out_queue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> next_buffer_;
  AscendC::GlobalTensor<int64_t> workspace_;
  AscendC::GlobalTensor<int32_t> row_idx_;
  int64_t keys_ = 0;
};

}  // namespace moe_ext::ascend
