// Tensor-free access to the permutation-index planner, for planning on the host
// from plain Python lists (and for checking the core from Python).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "bindings/bindings.h"
#include "core/permute_indices.h"

namespace py = pybind11;

namespace moe_ext::bindings {

void bind_permute_indices(py::module_& m) {
  m.def(
      "generate_permute_indices",
      [](const std::vector<int64_t>& tokens_per_expert_group, int64_t experts_per_rank,
         int64_t num_ranks, int64_t max_len, int64_t alignment) {
        core::check_permute_indices_shape(static_cast<int64_t>(tokens_per_expert_group.size()),
                                          experts_per_rank, num_ranks, max_len, alignment);
        std::vector<int32_t> permuted(static_cast<size_t>(max_len));
        std::vector<int32_t> sizes(static_cast<size_t>(experts_per_rank));
        std::vector<int32_t> offsets(static_cast<size_t>(experts_per_rank));
        core::generate_permute_indices(tokens_per_expert_group.data(), experts_per_rank, num_ranks,
                                       max_len, alignment, permuted.data(), sizes.data(),
                                       offsets.data());
        return std::make_tuple(permuted, sizes, offsets);
      },
      py::arg("tokens_per_expert_group"), py::arg("experts_per_rank"), py::arg("num_ranks"),
      py::arg("max_len"), py::arg("alignment"),
      "Host-side generate_permute_indices on Python lists: (permuted_indices, m_sizes, m_offsets).");
}

}  // namespace moe_ext::bindings
