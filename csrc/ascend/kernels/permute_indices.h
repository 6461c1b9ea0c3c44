// generate_permute_indices on AscendC vector cores (the index of
// group_by_local_expert; contract in csrc/core/permute_indices.h): blocks
// split the local experts; each block derives the padded sizes and offsets of
// the experts before its own from the counts (a scalar pass over at most
// experts x ranks counts - small), writes m_sizes / m_offsets of its experts
// through UB tiles (DMA, never scalar SetValue on GM: twin rule R9) and fills
// their blocks of permuted_indices through a UB tile: in source-rank order the
// arriving row of each token, then -1 padding. The block that owns the last
// expert also fills the tail [m_offsets[last], max_len) with -1. Every output
// element has exactly one writer.
#pragma once

#include "kernels/common.h"

namespace moe_ext::ascend {

template <typename CountT>
class PermuteIndicesKernel {
 public:
  // tiling: split over experts_per_rank; kItemsPerTile = int32 per UB tile; kRowElements = max_len;
  // kRowStride = alignment; kSourceRows = num_ranks; kExtra = experts_per_rank.
  __aicore__ inline void Init(GM_ADDR counts, GM_ADDR permuted_indices, GM_ADDR m_sizes, GM_ADDR m_offsets,
                              GM_ADDR tiling) {
    tiling_ = load_tiling(tiling);
    range_ = tiling_.range;
    per_tile_ = tiling_.items_per_tile;
    max_len_ = tiling_.row_elements;
    alignment_ = tiling_.row_stride;
    ranks_ = tiling_.source_rows;
    experts_ = tiling_.extra;
    counts_.SetGlobalBuffer(reinterpret_cast<__gm__ CountT*>(counts), static_cast<uint64_t>(ranks_ * experts_));
    indices_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(permuted_indices), static_cast<uint64_t>(max_len_));
    sizes_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(m_sizes), static_cast<uint64_t>(experts_));
    offsets_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(m_offsets), static_cast<uint64_t>(experts_));
    pipe_.InitBuffer(queue_, 2, per_tile_ * static_cast<int64_t>(sizeof(int32_t)));
    pipe_.InitBuffer(sizes_buffer_, per_tile_ * static_cast<int64_t>(sizeof(int32_t)));
    pipe_.InitBuffer(offsets_buffer_, per_tile_ * static_cast<int64_t>(sizeof(int32_t)));
  }

  __aicore__ inline void Process() {
    int64_t write = 0;  // start of expert e's block
    for (int64_t e = 0; e < range_.start; ++e) write += PaddedSize(e);
    AscendC::LocalTensor<int32_t> sizes = sizes_buffer_.template Get<int32_t>();
    AscendC::LocalTensor<int32_t> offsets = offsets_buffer_.template Get<int32_t>();
    for (int64_t chunk = range_.start; chunk < range_.end; chunk += per_tile_) {
      const int64_t n = min64(per_tile_, range_.end - chunk);
      int64_t end = write;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t size = PaddedSize(chunk + i);
        MOE_ASCEND_CHECK(end + size <= max_len_, "generate_permute_indices: padded rows exceed max_len");
        end += size;
        sizes.SetValue(i, static_cast<int32_t>(size));
        offsets.SetValue(i, static_cast<int32_t>(end));
      }
      const AscendC::DataCopyExtParams words{1, static_cast<uint32_t>(n * sizeof(int32_t)), 0, 0, 0};
      AscendC::DataCopyPad(sizes_[chunk], sizes, words);
      AscendC::DataCopyPad(offsets_[chunk], offsets, words);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t size = static_cast<int64_t>(sizes.GetValue(i));
        FillExpert(chunk + i, write, size);
        write += size;
      }
    }
    if (range_.end == experts_ && range_.start < range_.end) Fill(write, max_len_ - write, -1, 0);
  }

 private:
  __aicore__ inline int64_t Count(int64_t rank, int64_t expert) {
    const int64_t count = static_cast<int64_t>(counts_.GetValue(rank * experts_ + expert));
    MOE_ASCEND_CHECK(count >= 0, "generate_permute_indices: counts must be >= 0");
    return count;
  }

  __aicore__ inline int64_t PaddedSize(int64_t expert) {
    int64_t total = 0;
    for (int64_t r = 0; r < ranks_; ++r) total += Count(r, expert);
    if (total < alignment_) total = alignment_;
    return (total + alignment_ - 1) / alignment_ * alignment_;
  }

  // Expert e's block: for each source rank its arriving rows (consecutive), then padding.
  __aicore__ inline void FillExpert(int64_t expert, int64_t write, int64_t size) {
    int64_t arriving = 0;  // prefix of the rank-major counts before (rank, expert)
    int64_t filled = 0;
    for (int64_t flat = 0; flat < ranks_ * experts_; ++flat) {
      const int64_t rank = flat / experts_, e = flat % experts_;
      const int64_t count = Count(rank, e);
      if (e == expert && count > 0) {
        Fill(write + filled, count, arriving, 1);
        filled += count;
      }
      arriving += count;
    }
    Fill(write + filled, size - filled, -1, 0);
  }

  // positions [first, first + n) <- value, value + step, ... through UB tiles
  __aicore__ inline void Fill(int64_t first, int64_t n, int64_t value, int64_t step) {
    for (int64_t done = 0; done < n; done += per_tile_) {
      const int64_t chunk = min64(per_tile_, n - done);
      AscendC::LocalTensor<int32_t> tile = queue_.template AllocTensor<int32_t>();
      for (int64_t i = 0; i < chunk; ++i) tile.SetValue(i, static_cast<int32_t>(value + step * (done + i)));
      queue_.EnQue(tile);
      tile = queue_.template DeQue<int32_t>();
      AscendC::DataCopyPad(indices_[first + done], tile,
                           AscendC::DataCopyExtParams{1, static_cast<uint32_t>(chunk * sizeof(int32_t)), 0, 0, 0});
      queue_.FreeTensor(tile);
    }
  }

  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECOUT, 2> queue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> sizes_buffer_, offsets_buffer_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<CountT> counts_;
  AscendC::GlobalTensor<int32_t> indices_, sizes_, offsets_;
  BlockRange range_{0, 0};
  int64_t per_tile_ = 0, max_len_ = 0, alignment_ = 1, ranks_ = 1, experts_ = 1;
};

}  // namespace moe_ext::ascend
