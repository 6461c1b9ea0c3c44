// moe_unpermute on an AscendC vector core (fp32 rows and probs): for each
// token t, out[t] = sum over k = 0..K-1 of probs[t, k] * permuted[row_idx[t*K + k]],
// skipping row_idx == -1, accumulated in fp32 in that order (the CPU and
// CUDA kernels' order, so results agree bit for bit) and written once, no
// atomics. Each block takes a contiguous range of tokens; a token's K rows
// are staged one at a time through a double-buffered queue, so the next row
// is read while the current one is scaled and added.
#pragma once

#include "kernels/common.h"

namespace moe_ext::ascend {

template <typename IndexT>
class UnpermuteKernel {
 public:
  __aicore__ inline void Init(GM_ADDR permuted, GM_ADDR row_idx, GM_ADDR probs, GM_ADDR out, GM_ADDR tiling,
                              int64_t num_tokens) {
    tiling_ = load_tiling(tiling);
    range_ = tiling_.range;
    row_elements_ = tiling_.row_elements;
    row_stride_ = tiling_.row_stride;
    source_rows_ = tiling_.source_rows;
    topk_ = tiling_.extra;
    permuted_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(permuted),
                              static_cast<uint64_t>(source_rows_ * row_elements_));
    row_idx_.SetGlobalBuffer(reinterpret_cast<__gm__ IndexT*>(row_idx), static_cast<uint64_t>(num_tokens * topk_));
    has_probs_ = probs != nullptr;
    if (has_probs_)
      probs_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(probs), static_cast<uint64_t>(num_tokens * topk_));
    out_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(out), static_cast<uint64_t>(num_tokens * row_elements_));
    const int64_t row_bytes = row_stride_ * static_cast<int64_t>(sizeof(float));
    pipe_.InitBuffer(in_queue_, 2, row_bytes);
    pipe_.InitBuffer(out_queue_, 1, row_bytes);
    pipe_.InitBuffer(scaled_buffer_, row_bytes);
  }

  __aicore__ inline void Process() {
    if (row_elements_ == 0) return;
    for (int64_t token = range_.start; token < range_.end; ++token) Token(token);
  }

 private:
  __aicore__ inline int64_t RowOf(int64_t token, int64_t k) {
    const int64_t row = static_cast<int64_t>(row_idx_.GetValue(token * topk_ + k));
    MOE_ASCEND_CHECK(row >= -1 && row < source_rows_, "moe_unpermute: expanded_row_idx out of [-1, rows)");
    return row;
  }

  __aicore__ inline void CopyIn(int64_t row) {
    AscendC::LocalTensor<float> staged = in_queue_.template AllocTensor<float>();
    AscendC::DataCopyPad(staged, permuted_[row * row_elements_],
                         AscendC::DataCopyExtParams{1, static_cast<uint32_t>(row_elements_ * sizeof(float)), 0, 0, 0},
                         AscendC::DataCopyPadExtParams<float>{false, 0, 0, 0.0f});
    in_queue_.EnQue(staged);
  }

  __aicore__ inline void Token(int64_t token) {
    AscendC::LocalTensor<float> sum = out_queue_.template AllocTensor<float>();
    AscendC::LocalTensor<float> scaled = scaled_buffer_.template Get<float>();
    AscendC::Duplicate(sum, 0.0f, row_stride_);
    int64_t k = 0;
    while (k < topk_ && RowOf(token, k) < 0) ++k;
    if (k < topk_) CopyIn(RowOf(token, k));
    while (k < topk_) {
      int64_t next = k + 1;
      while (next < topk_ && RowOf(token, next) < 0) ++next;
      if (next < topk_) CopyIn(RowOf(token, next));  // in flight while row k is added
      AscendC::LocalTensor<float> row = in_queue_.template DeQue<float>();
      const float weight = has_probs_ ? probs_.GetValue(token * topk_ + k) : 1.0f;
      AscendC::Muls(scaled, row, weight, row_stride_);
      AscendC::Add(sum, sum, scaled, row_stride_);
      in_queue_.FreeTensor(row);
      k = next;
    }
    out_queue_.EnQue(sum);
    sum = out_queue_.template DeQue<float>();
    AscendC::DataCopyPad(out_[token * row_elements_], sum,
                         AscendC::DataCopyExtParams{1, static_cast<uint32_t>(row_elements_ * sizeof(float)), 0, 0, 0});
    out_queue_.FreeTensor(sum);
  }

  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> in_queue_;
  AscendC::TQue<AscendC::TPosition::VECOUT, 1> out_queue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> scaled_buffer_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<float> permuted_, probs_, out_;
  AscendC::GlobalTensor<IndexT> row_idx_;
  BlockRange range_{0, 0};
  int64_t row_elements_ = 0, row_stride_ = 0, source_rows_ = 0, topk_ = 1;
  bool has_probs_ = false;
};

}  // namespace moe_ext::ascend
