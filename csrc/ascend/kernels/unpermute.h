// moe_unpermute and its backward on AscendC vector cores, for T = float, half
// or bfloat16_t rows and P = float or T probs; sums in float (what the CPU and
// CUDA kernels do: at::opmath_type), conversions with Cast (twin rule R7:
// widen with CAST_NONE, narrow with CAST_RINT = round half to even, which is
// what torch's float -> bf16 / fp16 conversion does on CPU).
//
// Forward: for each token t, out[t] = sum over k = 0..K-1 of
// probs[t, k] * permuted[row_idx[t*K + k]], skipping row_idx == -1, in that
// order (so results agree bit for bit with the CPU kernel), written once, no
// atomics. Each block takes a contiguous range of tokens; a token's K rows are
// staged one at a time through a double-buffered queue, so the next row is
// read while the current one is widened, scaled and added.
//
// Backward (UnpermuteBackwardKernel, token-major, after the inverse index of
// kernels/row_inverse.h has proved every row is named at most once):
// grad_permuted[row] = probs[t,k] * grad_out[t] for each named row (one
// writer per row) and grad_probs[t,k] = dot(grad_out[t], permuted[row]) by
// Mul + ReduceSum (float; the A2 order of twin rule R8, so within rounding of
// the CPU's sequential sum), 0 where row == -1; then ZeroUnnamedRowsKernel
// writes zeros to the rows no index names. Every output element is written
// exactly once.
//
// UB per block (what csrc/core/ascend/launch_plan.cpp budgets; rT = a row of T
// rounded to 32 bytes, rF = a row of float rounded): forward 3 rT + rF (+ rF
// to widen when T is not float, + rF for the sum) + the K probs; backward
// 4 rT + rF (+ 2 rF when T is not float) + ReduceSum's work + the K probs.
#pragma once

#include <type_traits>

#include "kernels/common.h"

namespace moe_ext::ascend {

__aicore__ inline int64_t ub_round32(int64_t bytes) { return (bytes + 31) / 32 * 32; }

// probs[t, 0..K) as float in UB: copied in as P, widened when P is not float.
template <typename P>
class ProbsStage {
 public:
  __aicore__ inline void Init(AscendC::TPipe& pipe, GM_ADDR probs, int64_t count, int64_t topk) {
    topk_ = topk;
    present_ = probs != nullptr;
    if (!present_) return;
    probs_.SetGlobalBuffer(reinterpret_cast<__gm__ P*>(probs), static_cast<uint64_t>(count));
    pipe.InitBuffer(raw_, topk * static_cast<int64_t>(sizeof(P)));
    if constexpr (!std::is_same_v<P, float>) pipe.InitBuffer(wide_, topk * static_cast<int64_t>(sizeof(float)));
  }
  __aicore__ inline bool present() const { return present_; }
  // Loads token t's weights; afterwards Weight(k) reads them.
  __aicore__ inline void Load(int64_t token) {
    if (!present_) return;
    AscendC::LocalTensor<P> raw = raw_.template Get<P>();
    AscendC::DataCopyPad(raw, probs_[token * topk_],
                         AscendC::DataCopyExtParams{1, static_cast<uint32_t>(topk_ * sizeof(P)), 0, 0, 0},
                         AscendC::DataCopyPadExtParams<P>{false, 0, 0, P{}});
    if constexpr (std::is_same_v<P, float>) {
      weights_ = raw;
    } else {
      weights_ = wide_.template Get<float>();
      AscendC::Cast(weights_, raw, AscendC::RoundMode::CAST_NONE, topk_);
    }
  }
  __aicore__ inline float Weight(int64_t k) const { return present_ ? weights_.GetValue(k) : 1.0f; }

 private:
  AscendC::GlobalTensor<P> probs_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> raw_, wide_;
  AscendC::LocalTensor<float> weights_;
  int64_t topk_ = 1;
  bool present_ = false;
};

template <typename T, typename P, typename IndexT>
class UnpermuteKernel {
 public:
  __aicore__ inline void Init(GM_ADDR permuted, GM_ADDR row_idx, GM_ADDR probs, GM_ADDR out, GM_ADDR tiling,
                              int64_t num_tokens) {
    tiling_ = load_tiling(tiling);
    hidden_ = tiling_.row_elements;
    source_rows_ = tiling_.source_rows;
    topk_ = tiling_.extra;
    permuted_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(permuted), static_cast<uint64_t>(source_rows_ * hidden_));
    row_idx_.SetGlobalBuffer(reinterpret_cast<__gm__ IndexT*>(row_idx), static_cast<uint64_t>(num_tokens * topk_));
    out_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), static_cast<uint64_t>(num_tokens * hidden_));
    if (hidden_ == 0) return;
    const int64_t row_bytes = ub_round32(hidden_ * static_cast<int64_t>(sizeof(T)));
    const int64_t float_bytes = ub_round32(hidden_ * static_cast<int64_t>(sizeof(float)));
    pipe_.InitBuffer(in_queue_, 2, row_bytes);
    pipe_.InitBuffer(out_queue_, 1, row_bytes);
    pipe_.InitBuffer(scaled_buffer_, float_bytes);
    if constexpr (!std::is_same_v<T, float>) {
      pipe_.InitBuffer(wide_buffer_, float_bytes);
      pipe_.InitBuffer(sum_buffer_, float_bytes);
    }
    probs_.Init(pipe_, probs, num_tokens * topk_, topk_);
  }

  __aicore__ inline void Process() {
    if (hidden_ == 0) return;
    for (int64_t token = tiling_.range.start; token < tiling_.range.end; ++token) Token(token);
  }

 private:
  __aicore__ inline int64_t RowOf(int64_t token, int64_t k) {
    const int64_t row = static_cast<int64_t>(row_idx_.GetValue(token * topk_ + k));
    MOE_ASCEND_CHECK(row >= -1 && row < source_rows_, "moe_unpermute: expanded_row_idx out of [-1, rows)");
    return row;
  }

  __aicore__ inline void CopyIn(int64_t row) {
    AscendC::LocalTensor<T> staged = in_queue_.template AllocTensor<T>();
    AscendC::DataCopyPad(staged, permuted_[row * hidden_],
                         AscendC::DataCopyExtParams{1, static_cast<uint32_t>(hidden_ * sizeof(T)), 0, 0, 0},
                         AscendC::DataCopyPadExtParams<T>{false, 0, 0, T{}});
    in_queue_.EnQue(staged);
  }

  __aicore__ inline void Token(int64_t token) {
    AscendC::LocalTensor<T> result = out_queue_.template AllocTensor<T>();
    AscendC::LocalTensor<float> sum;
    if constexpr (std::is_same_v<T, float>) {
      sum = result;  // fp32 rows: the sum is the output tile
    } else {
      sum = sum_buffer_.template Get<float>();
    }
    AscendC::LocalTensor<float> scaled = scaled_buffer_.template Get<float>();
    AscendC::Duplicate(sum, 0.0f, hidden_);
    probs_.Load(token);
    int64_t k = 0;
    while (k < topk_ && RowOf(token, k) < 0) ++k;
    if (k < topk_) CopyIn(RowOf(token, k));
    while (k < topk_) {
      int64_t next = k + 1;
      while (next < topk_ && RowOf(token, next) < 0) ++next;
      if (next < topk_) CopyIn(RowOf(token, next));  // in flight while row k is added
      AscendC::LocalTensor<T> row = in_queue_.template DeQue<T>();
      const float weight = probs_.Weight(k);
      if constexpr (std::is_same_v<T, float>) {
        AscendC::Muls(scaled, row, weight, hidden_);
      } else {
        AscendC::LocalTensor<float> wide = wide_buffer_.template Get<float>();
        AscendC::Cast(wide, row, AscendC::RoundMode::CAST_NONE, hidden_);
        AscendC::Muls(scaled, wide, weight, hidden_);
      }
      AscendC::Add(sum, sum, scaled, hidden_);
      in_queue_.FreeTensor(row);
      k = next;
    }
    if constexpr (!std::is_same_v<T, float>) AscendC::Cast(result, sum, AscendC::RoundMode::CAST_RINT, hidden_);
    out_queue_.EnQue(result);
    result = out_queue_.template DeQue<T>();
    AscendC::DataCopyPad(out_[token * hidden_], result,
                         AscendC::DataCopyExtParams{1, static_cast<uint32_t>(hidden_ * sizeof(T)), 0, 0, 0});
    out_queue_.FreeTensor(result);
  }

  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> in_queue_;
  AscendC::TQue<AscendC::TPosition::VECOUT, 1> out_queue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> scaled_buffer_, wide_buffer_, sum_buffer_;
  ProbsStage<P> probs_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<T> permuted_, out_;
  AscendC::GlobalTensor<IndexT> row_idx_;
  int64_t hidden_ = 0, source_rows_ = 0, topk_ = 1;
};

// Tiling words: the split over tokens; kRowElements = hidden; kSourceRows = rows of permuted;
// kExtra = topk. grad_probs may be null (compute_grad_probs false or no probs); probs may be null.
template <typename T, typename P, typename IndexT>
class UnpermuteBackwardKernel {
 public:
  __aicore__ inline void Init(GM_ADDR grad_out, GM_ADDR permuted, GM_ADDR row_idx, GM_ADDR probs,
                              GM_ADDR grad_permuted, GM_ADDR grad_probs, GM_ADDR tiling, int64_t num_tokens) {
    tiling_ = load_tiling(tiling);
    hidden_ = tiling_.row_elements;
    source_rows_ = tiling_.source_rows;
    topk_ = tiling_.extra;
    grad_out_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(grad_out), static_cast<uint64_t>(num_tokens * hidden_));
    permuted_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(permuted), static_cast<uint64_t>(source_rows_ * hidden_));
    grad_permuted_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(grad_permuted),
                                   static_cast<uint64_t>(source_rows_ * hidden_));
    row_idx_.SetGlobalBuffer(reinterpret_cast<__gm__ IndexT*>(row_idx), static_cast<uint64_t>(num_tokens * topk_));
    with_grad_probs_ = grad_probs != nullptr;
    if (with_grad_probs_)
      grad_probs_.SetGlobalBuffer(reinterpret_cast<__gm__ P*>(grad_probs), static_cast<uint64_t>(num_tokens * topk_));
    const int64_t row_bytes = ub_round32(hidden_ * static_cast<int64_t>(sizeof(T)));
    const int64_t float_bytes = ub_round32(hidden_ * static_cast<int64_t>(sizeof(float)));
    const int64_t repeats = (hidden_ + 63) / 64;  // ReduceSum's work: one float per 256-byte repeat
    if (hidden_ > 0) {
      pipe_.InitBuffer(grad_queue_, 1, row_bytes);
      pipe_.InitBuffer(x_queue_, 2, row_bytes);
      pipe_.InitBuffer(out_queue_, 1, row_bytes);
      pipe_.InitBuffer(product_buffer_, float_bytes);
      pipe_.InitBuffer(work_buffer_, ub_round32(repeats * 4) + 32);  // + the one-float result
      if constexpr (!std::is_same_v<T, float>) {
        pipe_.InitBuffer(grad_wide_buffer_, float_bytes);
        pipe_.InitBuffer(x_wide_buffer_, float_bytes);
      }
    }
    probs_.Init(pipe_, probs, num_tokens * topk_, topk_);
    if (with_grad_probs_) {
      pipe_.InitBuffer(dots_buffer_, topk_ * static_cast<int64_t>(sizeof(float)));
      if constexpr (!std::is_same_v<P, float>) pipe_.InitBuffer(dots_out_buffer_, topk_ * static_cast<int64_t>(sizeof(P)));
    }
  }

  __aicore__ inline void Process() {
    for (int64_t token = tiling_.range.start; token < tiling_.range.end; ++token) Token(token);
  }

 private:
  __aicore__ inline int64_t RowOf(int64_t token, int64_t k) {
    const int64_t row = static_cast<int64_t>(row_idx_.GetValue(token * topk_ + k));
    MOE_ASCEND_CHECK(row >= -1 && row < source_rows_,
                     "moe_unpermute_backward: expanded_row_idx out of [-1, rows of permuted)");
    return row;
  }

  template <typename Queue>
  __aicore__ inline void CopyIn(Queue& queue, const AscendC::GlobalTensor<T>& source, int64_t row) {
    AscendC::LocalTensor<T> staged = queue.template AllocTensor<T>();
    AscendC::DataCopyPad(staged, source[row * hidden_],
                         AscendC::DataCopyExtParams{1, static_cast<uint32_t>(hidden_ * sizeof(T)), 0, 0, 0},
                         AscendC::DataCopyPadExtParams<T>{false, 0, 0, T{}});
    queue.EnQue(staged);
  }

  // `staged` as float: itself for fp32 rows, else widened into `wide`.
  __aicore__ inline AscendC::LocalTensor<float> Widen(const AscendC::LocalTensor<T>& staged,
                                                      AscendC::TBuf<AscendC::TPosition::VECCALC>& wide) {
    if constexpr (std::is_same_v<T, float>) {
      (void)wide;
      return staged;
    } else {
      AscendC::LocalTensor<float> out = wide.template Get<float>();
      AscendC::Cast(out, staged, AscendC::RoundMode::CAST_NONE, hidden_);
      return out;
    }
  }

  __aicore__ inline void Token(int64_t token) {
    probs_.Load(token);
    AscendC::LocalTensor<float> dots;
    if (with_grad_probs_) dots = dots_buffer_.template Get<float>();
    AscendC::LocalTensor<T> grad;
    AscendC::LocalTensor<float> grad_wide;
    if (hidden_ > 0) {
      CopyIn(grad_queue_, grad_out_, token);
      grad = grad_queue_.template DeQue<T>();
      grad_wide = Widen(grad, grad_wide_buffer_);
    }
    for (int64_t k = 0; k < topk_; ++k) {
      const int64_t row = RowOf(token, k);
      float dot = 0.0f;
      if (row >= 0 && hidden_ > 0) {
        if (with_grad_probs_) CopyIn(x_queue_, permuted_, row);  // read while the gradient row is written
        AscendC::LocalTensor<T> out = out_queue_.template AllocTensor<T>();
        if constexpr (std::is_same_v<T, float>) {
          AscendC::Muls(out, grad_wide, probs_.Weight(k), hidden_);
        } else {
          AscendC::LocalTensor<float> scaled = product_buffer_.template Get<float>();
          AscendC::Muls(scaled, grad_wide, probs_.Weight(k), hidden_);
          AscendC::Cast(out, scaled, AscendC::RoundMode::CAST_RINT, hidden_);
        }
        out_queue_.EnQue(out);
        out = out_queue_.template DeQue<T>();
        AscendC::DataCopyPad(grad_permuted_[row * hidden_], out,
                             AscendC::DataCopyExtParams{1, static_cast<uint32_t>(hidden_ * sizeof(T)), 0, 0, 0});
        out_queue_.FreeTensor(out);
        if (with_grad_probs_) {
          AscendC::LocalTensor<T> x = x_queue_.template DeQue<T>();
          AscendC::LocalTensor<float> x_wide = Widen(x, x_wide_buffer_);
          AscendC::LocalTensor<float> product = product_buffer_.template Get<float>();
          AscendC::LocalTensor<float> work = work_buffer_.template Get<float>();
          const int64_t result_at = ub_round32(((hidden_ + 63) / 64) * 4) / 4;
          AscendC::Mul(product, grad_wide, x_wide, hidden_);
          AscendC::ReduceSum(work[result_at], product, work, hidden_);
          dot = work.GetValue(result_at);
          x_queue_.FreeTensor(x);
        }
      }
      if (with_grad_probs_) dots.SetValue(k, dot);
    }
    if (hidden_ > 0) grad_queue_.FreeTensor(grad);
    if (!with_grad_probs_) return;
    if constexpr (std::is_same_v<P, float>) {
      AscendC::DataCopyPad(grad_probs_[token * topk_], dots,
                           AscendC::DataCopyExtParams{1, static_cast<uint32_t>(topk_ * sizeof(float)), 0, 0, 0});
    } else {
      AscendC::LocalTensor<P> narrow = dots_out_buffer_.template Get<P>();
      AscendC::Cast(narrow, dots, AscendC::RoundMode::CAST_RINT, topk_);
      AscendC::DataCopyPad(grad_probs_[token * topk_], narrow,
                           AscendC::DataCopyExtParams{1, static_cast<uint32_t>(topk_ * sizeof(P)), 0, 0, 0});
    }
  }

  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, 1> grad_queue_;
  AscendC::TQue<AscendC::TPosition::VECIN, 2> x_queue_;
  AscendC::TQue<AscendC::TPosition::VECOUT, 1> out_queue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> product_buffer_, work_buffer_, grad_wide_buffer_, x_wide_buffer_,
      dots_buffer_, dots_out_buffer_;
  ProbsStage<P> probs_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<T> grad_out_, permuted_, grad_permuted_;
  AscendC::GlobalTensor<P> grad_probs_;
  AscendC::GlobalTensor<IndexT> row_idx_;
  int64_t hidden_ = 0, source_rows_ = 0, topk_ = 1;
  bool with_grad_probs_ = false;
};

// Rows of `out` that no index names (inverse[row] < 0) become zeros; the named rows are left as
// the backward kernel wrote them. Tiling: split over rows, kRowElements = elements per row
// (written as Word, the row's bytes in 2-, 4- or 8-byte words), kItemsPerTile = rows per tile.
template <typename Word>
class ZeroUnnamedRowsKernel {
 public:
  __aicore__ inline void Init(GM_ADDR out, GM_ADDR inverse, GM_ADDR tiling, int64_t num_rows) {
    tiling_ = load_tiling(tiling);
    row_elements_ = tiling_.row_elements;
    out_.SetGlobalBuffer(reinterpret_cast<__gm__ Word*>(out), static_cast<uint64_t>(num_rows * row_elements_));
    inverse_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(inverse), static_cast<uint64_t>(num_rows));
    if (row_elements_ > 0) pipe_.InitBuffer(zeros_, ub_round32(row_elements_ * static_cast<int64_t>(sizeof(Word))));
  }
  __aicore__ inline void Process() {
    if (row_elements_ == 0 || tiling_.range.start >= tiling_.range.end) return;
    AscendC::LocalTensor<Word> zeros = zeros_.template Get<Word>();
    AscendC::Duplicate(zeros, Word(0), row_elements_);
    for (int64_t row = tiling_.range.start; row < tiling_.range.end; ++row) {
      if (inverse_.GetValue(row) >= 0) continue;
      AscendC::DataCopyPad(out_[row * row_elements_], zeros,
                           AscendC::DataCopyExtParams{1, static_cast<uint32_t>(row_elements_ * sizeof(Word)), 0, 0, 0});
    }
  }

 private:
  AscendC::TPipe pipe_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> zeros_;
  KernelTiling tiling_;
  AscendC::GlobalTensor<Word> out_;
  AscendC::GlobalTensor<int32_t> inverse_;
  int64_t row_elements_ = 0;
};

}  // namespace moe_ext::ascend
