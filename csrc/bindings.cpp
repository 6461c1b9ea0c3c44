// moe_ext._native: the pybind11 module over the torch-free core.
//
// It never links torch, so it loads under any torch. What the build compiled is
// in moe_ext/_build_info.py (cmake/MoeExtBuildInfo.cmake), not here: this module
// is built once per Python version. Each area of the core binds itself in
// csrc/bindings/<area>.cpp through a bind_<area>(module) function declared below.
#include <pybind11/pybind11.h>

#include "bindings/bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "moe_ext native planners (torch-free C++ core)";
  moe_ext::bindings::bind_permute_indices(m);
  moe_ext::bindings::bind_transfer(m);
  moe_ext::bindings::bind_eplb(m);
}
