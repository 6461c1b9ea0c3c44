// CPU kernels of gather_rows and scatter_rows, the row moves behind
// group_by_local_expert / ungroup_by_local_expert: each row read once and
// written once, rows without a source written as zeros.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstring>

#include "common/op_checks.h"
#include "common/routing_checks.h"
#include "core/routing_layout.h"
#include "cpu/cpu_ops.h"

namespace moe_ext::cpu {
namespace {

using ops::ScalarType;

// out[p] = x[source_of[p]], or zeros where source_of[p] == -1 (checked before).
void gather(const Tensor& x, const int64_t* source_of, Tensor& out) {
  const int64_t row_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
  if (row_bytes == 0) return;
  const auto* in = static_cast<const char*>(x.const_data_ptr());
  auto* result = static_cast<char*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / row_bytes);
  torch::stable::parallel_for(0, out.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      char* destination = result + p * row_bytes;
      const int64_t source = source_of[p];
      if (source >= 0) {
        std::memcpy(destination, in + source * row_bytes, static_cast<size_t>(row_bytes));
      } else {
        std::memset(destination, 0, static_cast<size_t>(row_bytes));
      }
    }
  });
}

Tensor as_int64(const Tensor& indices) {
  return ops::make_contiguous_as(indices, ScalarType::Long);
}

}  // namespace

Tensor gather_rows(const Tensor& x, const Tensor& indices) {
  constexpr const char* op = "gather_rows";
  ops::check_rows_args(x, indices, op, "x");
  const Tensor source = ops::make_contiguous(x);
  const Tensor rows = as_int64(indices);
  core::check_row_indices(rows.const_data_ptr<int64_t>(), rows.numel(), source.size(0), op, "indices");
  Tensor out = torch::stable::new_empty(source, {rows.numel(), source.size(1)});
  gather(source, rows.const_data_ptr<int64_t>(), out);
  return out;
}

Tensor scatter_rows(const Tensor& x, const Tensor& indices, int64_t num_rows) {
  constexpr const char* op = "scatter_rows";
  ops::check_scatter_rows_args(x, indices, num_rows, op);
  const Tensor source = ops::make_contiguous(x);
  const Tensor rows = as_int64(indices);
  Tensor inverse = torch::stable::new_empty(rows, {num_rows});
  core::build_inverse_index(rows.const_data_ptr<int64_t>(), rows.numel(), num_rows, op, "indices",
                            inverse.mutable_data_ptr<int64_t>());
  Tensor out = torch::stable::new_empty(source, {num_rows, source.size(1)});
  gather(source, inverse.const_data_ptr<int64_t>(), out);
  return out;
}

}  // namespace moe_ext::cpu
