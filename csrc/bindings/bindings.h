// One bind_<area> function per area of the core, each in csrc/bindings/<area>.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace moe_ext::bindings {

void bind_permute_indices(pybind11::module_& m);
void bind_transfer(pybind11::module_& m);
void bind_eplb(pybind11::module_& m);

}  // namespace moe_ext::bindings
