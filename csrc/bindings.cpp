// moe_ext._native: the pybind11 module over the torch-free core.
//
// It never links torch, so it loads under any torch; the import-time guard in
// moe_ext/_loader.py reads build_info() from here before it loads the torch op
// library. Each area of the core binds itself in csrc/bindings/<area>.cpp
// through a bind_<area>(module) function declared below.
#include <pybind11/pybind11.h>

#include "bindings/bindings.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = MOE_EXT_VERSION_STRING;
  info["torch_version"] = MOE_EXT_TORCH_VERSION_STRING;
  info["torch_ops_built"] = static_cast<bool>(MOE_EXT_BUILD_TORCH_VALUE);
  info["cuda_kernels_compiled"] = static_cast<bool>(MOE_EXT_CUDA_COMPILED_VALUE);
  info["torch_min_version"] = MOE_EXT_TORCH_MIN_VERSION_STRING;
  info["cuda_dispatch_built"] = static_cast<bool>(MOE_EXT_CUDA_OPS_BUILT_VALUE);
  info["cuda_archs"] = MOE_EXT_CUDA_ARCHS_STRING;
  info["cuda_compiler_version"] = MOE_EXT_CUDA_COMPILER_VERSION_STRING;
  info["cann_found"] = static_cast<bool>(MOE_EXT_CANN_FOUND_VALUE);
  info["ascend_kernels_built"] = static_cast<bool>(MOE_EXT_ASCEND_KERNELS_BUILT_VALUE);
  info["cxx_compiler"] = MOE_EXT_CXX_COMPILER_STRING;
  return info;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "moe_ext native planners (torch-free C++ core)";
  m.def("build_info", &build_info, "What this build of moe_ext compiled: backends, CUDA archs, CANN.");
  moe_ext::bindings::bind_permute_indices(m);
  moe_ext::bindings::bind_transfer(m);
  moe_ext::bindings::bind_eplb(m);
}
