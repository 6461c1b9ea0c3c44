// CPU kernels of moe_unpermute and its backward. Both are gathers per token:
// deterministic, no atomics; sums in fp32 (fp64 for fp64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common/op_checks.h"
#include "common/routing_checks.h"
#include "core/routing_layout.h"
#include "cpu/cpu_ops.h"

namespace moe_ext::cpu {
namespace {

// expanded_row_idx as int64, whatever its dtype, after the range check.
at::Tensor checked_rows(const at::Tensor& expanded_row_idx, int64_t num_rows, const char* op) {
  const at::Tensor rows = expanded_row_idx.contiguous().to(at::kLong);
  ops::call_core([&] {
    core::check_row_indices(rows.data_ptr<int64_t>(), rows.numel(), num_rows, op, "expanded_row_idx");
  });
  return rows;
}

int64_t grain_for(int64_t hidden_size, int64_t topk) {
  return std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, hidden_size * topk));
}

}  // namespace

at::Tensor moe_unpermute(const at::Tensor& permuted, const at::Tensor& expanded_row_idx,
                         const std::optional<at::Tensor>& probs, int64_t topk) {
  constexpr const char* op = "moe_unpermute";
  const int64_t num_tokens = ops::check_unpermute_args(permuted, expanded_row_idx, probs, topk, op);
  const at::Tensor source = permuted.contiguous();
  const at::Tensor rows = checked_rows(expanded_row_idx, source.size(0), op);
  const int64_t hidden_size = source.size(1);
  at::Tensor out = at::empty({num_tokens, hidden_size}, source.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor weights;
    if (probs.has_value()) weights = probs->contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
    const acc_t* weight = probs.has_value() ? weights.data_ptr<acc_t>() : nullptr;
    const scalar_t* in = source.data_ptr<scalar_t>();
    scalar_t* result = out.data_ptr<scalar_t>();
    const int64_t* row_of = rows.data_ptr<int64_t>();
    at::parallel_for(0, num_tokens, grain_for(hidden_size, topk), [&](int64_t begin, int64_t end) {
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

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward(const at::Tensor& grad_output,
                                                          const at::Tensor& permuted,
                                                          const at::Tensor& expanded_row_idx,
                                                          const std::optional<at::Tensor>& probs,
                                                          int64_t topk, bool compute_grad_probs) {
  constexpr const char* op = "moe_unpermute_backward";
  const int64_t num_tokens =
      ops::check_unpermute_backward_args(grad_output, permuted, expanded_row_idx, probs, topk, op);
  const at::Tensor source = permuted.contiguous();
  const at::Tensor grad = grad_output.contiguous();
  const int64_t num_rows = source.size(0), hidden_size = source.size(1);
  // Each row of permuted may be named once: the gradient scatter then has one
  // writer per row and needs no atomics.
  const at::Tensor rows = expanded_row_idx.contiguous().to(at::kLong);
  at::Tensor inverse = at::empty({num_rows}, rows.options());
  ops::call_core([&] {
    core::build_inverse_index(rows.data_ptr<int64_t>(), rows.numel(), num_rows, op,
                              "expanded_row_idx", inverse.data_ptr<int64_t>());
  });

  at::Tensor grad_permuted = at::zeros({num_rows, hidden_size}, source.options());
  const bool with_probs = probs.has_value();
  at::Tensor grad_probs = with_probs ? at::zeros({num_tokens, topk}, probs->options())
                                     : at::empty({0}, source.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor weights, grad_weights;
    if (with_probs) {
      weights = probs->contiguous().to(acc_type);
      grad_weights = at::zeros({num_tokens, topk}, weights.options());
    }
    const acc_t* weight = with_probs ? weights.data_ptr<acc_t>() : nullptr;
    acc_t* grad_weight = with_probs && compute_grad_probs ? grad_weights.data_ptr<acc_t>() : nullptr;
    const scalar_t* x = source.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gx = grad_permuted.data_ptr<scalar_t>();
    const int64_t* row_of = rows.data_ptr<int64_t>();
    at::parallel_for(0, num_tokens, grain_for(hidden_size, topk), [&](int64_t begin, int64_t end) {
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
    if (grad_weight) grad_probs.copy_(grad_weights);
  });
  return {grad_permuted, grad_probs};
}

}  // namespace moe_ext::cpu
