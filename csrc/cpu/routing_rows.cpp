// CPU kernels of gather_rows and scatter_rows, the row moves behind
// group_by_local_expert / ungroup_by_local_expert: each row read once and
// written once, rows without a source written as zeros.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "common/op_checks.h"
#include "common/routing_checks.h"
#include "core/routing_layout.h"
#include "cpu/cpu_ops.h"

namespace moe_ext::cpu {
namespace {

// out[p] = x[source_of[p]], or zeros where source_of[p] == -1 (checked before).
void gather(const at::Tensor& x, const int64_t* source_of, at::Tensor& out) {
  const int64_t row_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
  if (row_bytes == 0) return;
  const auto* in = static_cast<const char*>(x.data_ptr());
  auto* result = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / row_bytes);
  at::parallel_for(0, out.size(0), grain, [&](int64_t begin, int64_t end) {
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

}  // namespace

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& indices) {
  constexpr const char* op = "gather_rows";
  ops::check_rows_args(x, indices, op, "x");
  const at::Tensor source = x.contiguous();
  const at::Tensor rows = indices.contiguous().to(at::kLong);
  ops::call_core([&] {
    core::check_row_indices(rows.data_ptr<int64_t>(), rows.numel(), source.size(0), op, "indices");
  });
  at::Tensor out = at::empty({rows.numel(), source.size(1)}, source.options());
  gather(source, rows.data_ptr<int64_t>(), out);
  return out;
}

at::Tensor scatter_rows(const at::Tensor& x, const at::Tensor& indices, int64_t num_rows) {
  constexpr const char* op = "scatter_rows";
  ops::check_scatter_rows_args(x, indices, num_rows, op);
  const at::Tensor source = x.contiguous();
  const at::Tensor rows = indices.contiguous().to(at::kLong);
  at::Tensor inverse = at::empty({num_rows}, rows.options());
  ops::call_core([&] {
    core::build_inverse_index(rows.data_ptr<int64_t>(), rows.numel(), num_rows, op, "indices",
                              inverse.data_ptr<int64_t>());
  });
  at::Tensor out = at::empty({num_rows, source.size(1)}, source.options());
  gather(source, inverse.data_ptr<int64_t>(), out);
  return out;
}

}  // namespace moe_ext::cpu
