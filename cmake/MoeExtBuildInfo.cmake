# moe_ext/_build_info.py: what this build compiled, as a plain Python file.
#
# A Python file rather than a function of the pybind11 module: _native is built
# once per Python version (setup.py can add more interpreters, see
# MOE_EXT_EXTRA_PYTHONS), the facts below are not, and the import-time torch
# guard reads them before any native library is opened. Builds that add only
# another interpreter's _native pass -DMOE_EXT_WRITE_BUILD_INFO=OFF.
option(MOE_EXT_WRITE_BUILD_INFO "Write moe_ext/_build_info.py" ON)
if(MOE_EXT_WRITE_BUILD_INFO)
  function(_moe_ext_py_bool out value)
    if(${value})
      set(${out} "True" PARENT_SCOPE)
    else()
      set(${out} "False" PARENT_SCOPE)
    endif()
  endfunction()
  _moe_ext_py_bool(_torch_ops MOE_EXT_BUILD_TORCH)
  _moe_ext_py_bool(_cuda_kernels MOE_EXT_CUDA_COMPILED)
  _moe_ext_py_bool(_cuda_ops MOE_EXT_CUDA_OPS_BUILT)
  _moe_ext_py_bool(_cann MOE_EXT_CANN_FOUND)
  _moe_ext_py_bool(_ascend MOE_EXT_ASCEND_KERNELS_BUILT)
  _moe_ext_py_bool(_npu_ops MOE_EXT_NPU_OPS_BUILT)
  file(WRITE "${MOE_EXT_OUTPUT_DIR}/_build_info.py.tmp"
"\"\"\"What this build of moe_ext compiled (written by CMake: cmake/MoeExtBuildInfo.cmake).\"\"\"

BUILD_INFO = {
    \"version\": \"${PROJECT_VERSION}\",
    \"torch_version\": \"${MOE_EXT_TORCH_VERSION}\",
    \"torch_min_version\": \"${MOE_EXT_TORCH_MIN_VERSION}\",
    \"torch_ops_built\": ${_torch_ops},
    \"cuda_kernels_compiled\": ${_cuda_kernels},
    \"cuda_dispatch_built\": ${_cuda_ops},
    \"cuda_archs\": \"${MOE_EXT_CUDA_ARCHS}\",
    \"cuda_compiler_version\": \"${CMAKE_CUDA_COMPILER_VERSION}\",
    \"cann_found\": ${_cann},
    \"ascend_kernels_built\": ${_ascend},
    \"npu_dispatch_built\": ${_npu_ops},
    \"cxx_compiler\": \"${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION}\",
}
")
  # Rewritten only when it changes, so an unchanged build leaves it alone.
  file(COPY_FILE "${MOE_EXT_OUTPUT_DIR}/_build_info.py.tmp" "${MOE_EXT_OUTPUT_DIR}/_build_info.py"
       ONLY_IF_DIFFERENT)
  file(REMOVE "${MOE_EXT_OUTPUT_DIR}/_build_info.py.tmp")
endif()
