# moe_ext/_C_npu.so: the ops registered for the NPU dispatch key (PrivateUse1),
# launching the AscendC kernels of cmake/MoeExtAscend.cmake on the current NPU
# stream (csrc/ascend/npu/npu_ops.cpp).
#
# Built only when the AscendC kernels were built (CANN found) AND torch_npu is
# importable by ${Python_EXECUTABLE}; MOE_EXT_BUILD_NPU_OPS=OFF turns it off.
# Unlike _C.so / _C_cuda.so this library is NOT on PyTorch's stable ABI: it
# uses ATen and torch_npu's C++ API (the NPU stream and task queue exist only
# there), so it links libtorch, libc10, libtorch_npu and CANN's libascendcl and
# works only with the torch / torch_npu it was built against. moe_ext's loader
# opens it only when torch_npu imports. Where it is absent the NPU path keeps
# calling torch_npu's operators (moe_ext.platform.npu), as before.
#
# Never exercised: no machine this project is built on has CANN or torch_npu.
option(MOE_EXT_BUILD_NPU_OPS "Build moe_ext/_C_npu.so (the AscendC kernels on PrivateUse1) when CANN and torch_npu are found" ON)
set(MOE_EXT_NPU_OPS_BUILT OFF)
if(MOE_EXT_BUILD_NPU_OPS AND MOE_EXT_ASCEND_KERNELS_BUILT)
  if(NOT Python_EXECUTABLE)
    find_package(Python COMPONENTS Interpreter REQUIRED)
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import os, torch, torch_npu; print(os.path.dirname(torch_npu.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
    OUTPUT_VARIABLE _moe_ext_npu_info OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _moe_ext_npu_rc ERROR_QUIET)
  if(_moe_ext_npu_rc EQUAL 0)
    string(REPLACE "\n" ";" _moe_ext_npu_info "${_moe_ext_npu_info}")
    list(GET _moe_ext_npu_info 0 _moe_ext_torch_npu_root)
    list(GET _moe_ext_npu_info 1 _moe_ext_cxx11_abi)
    add_library(moe_ext_C_npu SHARED "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ascend/npu/npu_ops.cpp")
    set_target_properties(moe_ext_C_npu PROPERTIES
      OUTPUT_NAME "_C_npu" PREFIX "" SUFFIX ".so" LIBRARY_OUTPUT_DIRECTORY "${MOE_EXT_OUTPUT_DIR}")
    target_include_directories(moe_ext_C_npu PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
    target_include_directories(moe_ext_C_npu SYSTEM PRIVATE
      "${MOE_EXT_TORCH_ROOT}/include" "${MOE_EXT_TORCH_ROOT}/include/torch/csrc/api/include"
      "${_moe_ext_torch_npu_root}/include" "${ASCEND_CANN_PACKAGE_PATH}/include")
    target_compile_definitions(moe_ext_C_npu PRIVATE _GLIBCXX_USE_CXX11_ABI=${_moe_ext_cxx11_abi})
    target_link_directories(moe_ext_C_npu PRIVATE "${MOE_EXT_TORCH_ROOT}/lib" "${_moe_ext_torch_npu_root}/lib"
                            "${ASCEND_CANN_PACKAGE_PATH}/lib64")
    # tiling_api + platform: PlatformAscendCManager (core count, UB size), as CANN documents it.
    target_link_libraries(moe_ext_C_npu PRIVATE moe_ext_core moe_ext_ascend_kernels torch torch_cpu c10 torch_npu
                          ascendcl tiling_api platform)
    set(MOE_EXT_NPU_OPS_BUILT ON)
    message(STATUS "moe_ext: torch_npu at ${_moe_ext_torch_npu_root}: building _C_npu.so")
  else()
    message(STATUS "moe_ext: CANN found but torch_npu does not import: _C_npu.so not built")
  endif()
endif()
