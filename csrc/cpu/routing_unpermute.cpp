// CPU kernels of moe_unpermute and its backward. Both are gathers per token:
// deterministic, no atomics; sums in fp32 (fp64 for fp64 inputs).
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <vector>

#include "common/op_checks.h"
#include "common/routing_checks.h"
#include "core/routing_layout.h"
#include "cpu/cpu_ops.h"

namespace moe_ext::cpu {
namespace {

using ops::ScalarType;

// The element type and the type sums are kept in (what at::opmath_type gives).
template <typename Scalar, typename Acc, ScalarType AccType>
struct Types {
  using scalar_t = Scalar;
  using acc_t = Acc;
  static constexpr ScalarType acc_type = AccType;
};

// Calls body(Types<...>{}) for the floating dtypes the routing ops take
// (checked before: check_floating).
template <typename Body>
void dispatch_floating(ScalarType dtype, const char* op, Body&& body) {
  switch (dtype) {
    case ScalarType::Float: return body(Types<float, float, ScalarType::Float>{});
    case ScalarType::Double: return body(Types<double, double, ScalarType::Double>{});
    case ScalarType::Half: return body(Types<torch::headeronly::Half, float, ScalarType::Float>{});
    case ScalarType::BFloat16:
      return body(Types<torch::headeronly::BFloat16, float, ScalarType::Float>{});
    default: break;
  }
  MOE_THROW_TYPE(op, ": unsupported floating type ", ops::dtype_str(dtype));
}

// expanded_row_idx as int64, whatever its dtype, after the range check.
Tensor checked_rows(const Tensor& expanded_row_idx, int64_t num_rows, const char* op) {
  const Tensor rows = ops::make_contiguous_as(expanded_row_idx, ScalarType::Long);
  core::check_row_indices(rows.const_data_ptr<int64_t>(), rows.numel(), num_rows, op, "expanded_row_idx");
  return rows;
}

int64_t grain_for(int64_t hidden_size, int64_t topk) {
  return std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, hidden_size * topk));
}

}  // namespace

Tensor moe_unpermute(const Tensor& permuted, const Tensor& expanded_row_idx,
                     const std::optional<Tensor>& probs, int64_t topk) {
  constexpr const char* op = "moe_unpermute";
  const int64_t num_tokens = ops::check_unpermute_args(permuted, expanded_row_idx, probs, topk, op);
  const Tensor source = ops::make_contiguous(permuted);
  const Tensor rows = checked_rows(expanded_row_idx, source.size(0), op);
  const int64_t hidden_size = source.size(1);
  Tensor out = torch::stable::new_empty(source, {num_tokens, hidden_size});
  dispatch_floating(source.scalar_type(), op, [&](auto types) {
    using T = decltype(types);
    using scalar_t = typename T::scalar_t;
    using acc_t = typename T::acc_t;
    std::optional<Tensor> weights;
    if (probs.has_value()) weights = ops::make_contiguous_as(*probs, T::acc_type);
    const acc_t* weight = weights.has_value() ? static_cast<const acc_t*>(weights->const_data_ptr()) : nullptr;
    const auto* in = static_cast<const scalar_t*>(source.const_data_ptr());
    auto* result = static_cast<scalar_t*>(out.mutable_data_ptr());
    const int64_t* row_of = rows.const_data_ptr<int64_t>();
    torch::stable::parallel_for(0, num_tokens, grain_for(hidden_size, topk), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(static_cast<size_t>(hidden_size));
      for (int64_t t = begin; t < end; ++t) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t k = 0; k < topk; ++k) {
          const int64_t row = row_of[t * topk + k];
          if (row < 0) continue;
          const acc_t w = weight ? weight[t * topk + k] : acc_t(1);
          const scalar_t* x = in + row * hidden_size;
          for (int64_t h = 0; h < hidden_size; ++h) sum[static_cast<size_t>(h)] += w * static_cast<acc_t>(x[h]);
        }
        scalar_t* y = result + t * hidden_size;
        for (int64_t h = 0; h < hidden_size; ++h) y[h] = static_cast<scalar_t>(sum[static_cast<size_t>(h)]);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> moe_unpermute_backward(const Tensor& grad_output, const Tensor& permuted,
                                                  const Tensor& expanded_row_idx,
                                                  const std::optional<Tensor>& probs, int64_t topk,
                                                  bool compute_grad_probs) {
  constexpr const char* op = "moe_unpermute_backward";
  const int64_t num_tokens =
      ops::check_unpermute_backward_args(grad_output, permuted, expanded_row_idx, probs, topk, op);
  const Tensor source = ops::make_contiguous(permuted);
  const Tensor grad = ops::make_contiguous(grad_output);
  const int64_t num_rows = source.size(0), hidden_size = source.size(1);
  // Each row of permuted may be named once: the gradient scatter then has one
  // writer per row and needs no atomics.
  const Tensor rows = ops::make_contiguous_as(expanded_row_idx, ScalarType::Long);
  Tensor inverse = torch::stable::new_empty(rows, {num_rows});
  core::build_inverse_index(rows.const_data_ptr<int64_t>(), rows.numel(), num_rows, op,
                            "expanded_row_idx", inverse.mutable_data_ptr<int64_t>());

  Tensor grad_permuted = torch::stable::new_zeros(source, {num_rows, hidden_size});
  const bool with_probs = probs.has_value();
  Tensor grad_probs = with_probs ? torch::stable::new_zeros(*probs, {num_tokens, topk})
                                 : torch::stable::new_empty(source, {0});
  dispatch_floating(source.scalar_type(), op, [&](auto types) {
    using T = decltype(types);
    using scalar_t = typename T::scalar_t;
    using acc_t = typename T::acc_t;
    std::optional<Tensor> weights, grad_weights;
    if (with_probs) {
      weights = ops::make_contiguous_as(*probs, T::acc_type);
      grad_weights = torch::stable::new_zeros(*weights, {num_tokens, topk});
    }
    const acc_t* weight = with_probs ? static_cast<const acc_t*>(weights->const_data_ptr()) : nullptr;
    acc_t* grad_weight =
        with_probs && compute_grad_probs ? static_cast<acc_t*>(grad_weights->mutable_data_ptr()) : nullptr;
    const auto* x = static_cast<const scalar_t*>(source.const_data_ptr());
    const auto* g = static_cast<const scalar_t*>(grad.const_data_ptr());
    auto* gx = static_cast<scalar_t*>(grad_permuted.mutable_data_ptr());
    const int64_t* row_of = rows.const_data_ptr<int64_t>();
    torch::stable::parallel_for(0, num_tokens, grain_for(hidden_size, topk), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g_t = g + t * hidden_size;
        for (int64_t k = 0; k < topk; ++k) {
          const int64_t row = row_of[t * topk + k];
          if (row < 0) continue;
          const acc_t w = weight ? weight[t * topk + k] : acc_t(1);
          scalar_t* out = gx + row * hidden_size;
          for (int64_t h = 0; h < hidden_size; ++h) out[h] = static_cast<scalar_t>(w * static_cast<acc_t>(g_t[h]));
          if (grad_weight) {
            const scalar_t* x_row = x + row * hidden_size;
            acc_t dot = 0;
            for (int64_t h = 0; h < hidden_size; ++h) dot += static_cast<acc_t>(g_t[h]) * static_cast<acc_t>(x_row[h]);
            grad_weight[t * topk + k] = dot;
          }
        }
      }
    });
    if (grad_weight) torch::stable::copy_(grad_probs, *grad_weights);
  });
  return {grad_permuted, grad_probs};
}

}  // namespace moe_ext::cpu
