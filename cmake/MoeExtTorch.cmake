# The torch op libraries, built on PyTorch's stable ABI:
#   moe_ext/_C.so       schemas (csrc/torch_ops.cpp) + CPU kernels
#   moe_ext/_C_cuda.so  CUDA kernels' registrations, built whenever nvcc is
#                       found, whether or not the build's torch has CUDA
#
# Only torch's headers (torch/csrc/stable, torch/headeronly and the C shim) are
# used, with TORCH_TARGET_VERSION set to the oldest torch the binaries must load
# on (MOE_EXT_TORCH_MIN_VERSION, default 2.11): the headers then hide every API
# that release lacks, and the libraries load on that torch and every newer one.
# They link only libtorch_cpu.so, whose stable C shim functions they call;
# nothing depends on libtorch's C++ ABI, its CUDA build or the Python version.
# See docs/DESIGN.md, "Binary compatibility".
#
# setup.py passes MOE_EXT_TORCH_ROOT / MOE_EXT_TORCH_VERSION (the torch package
# directory and version of the build's torch); a bare CMake run asks
# ${Python_EXECUTABLE}.

if(NOT MOE_EXT_TORCH_ROOT)
  if(NOT Python_EXECUTABLE)
    find_package(Python COMPONENTS Interpreter REQUIRED)
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__)"
    OUTPUT_VARIABLE _moe_ext_torch_info OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _moe_ext_torch_rc)
  if(NOT _moe_ext_torch_rc EQUAL 0)
    message(FATAL_ERROR "moe_ext: ${Python_EXECUTABLE} cannot import torch; install PyTorch first")
  endif()
  string(REPLACE "\n" ";" _moe_ext_torch_info "${_moe_ext_torch_info}")
  list(GET _moe_ext_torch_info 0 MOE_EXT_TORCH_ROOT)
  list(GET _moe_ext_torch_info 1 MOE_EXT_TORCH_VERSION)
endif()
if(NOT MOE_EXT_TORCH_VERSION)
  message(FATAL_ERROR "moe_ext: the torch version is unknown")
endif()

set(_moe_ext_torch_include "${MOE_EXT_TORCH_ROOT}/include")
if(NOT EXISTS "${_moe_ext_torch_include}/torch/csrc/stable/library.h")
  message(FATAL_ERROR "moe_ext: ${_moe_ext_torch_include} has no stable-ABI headers "
                      "(torch/csrc/stable/library.h); build with torch >= ${MOE_EXT_TORCH_MIN_VERSION}")
endif()
find_library(MOE_EXT_LIBTORCH_CPU torch_cpu PATHS "${MOE_EXT_TORCH_ROOT}/lib" NO_DEFAULT_PATH REQUIRED)

# TORCH_TARGET_VERSION is major << 56 | minor << 48 (torch/csrc/stable/version.h).
if(NOT MOE_EXT_TORCH_MIN_VERSION MATCHES "^([0-9]+)\\.([0-9]+)$")
  message(FATAL_ERROR "moe_ext: MOE_EXT_TORCH_MIN_VERSION must be major.minor, got ${MOE_EXT_TORCH_MIN_VERSION}")
endif()
math(EXPR MOE_EXT_TORCH_TARGET_VERSION "(${CMAKE_MATCH_1} << 56) | (${CMAKE_MATCH_2} << 48)"
     OUTPUT_FORMAT HEXADECIMAL)

# Compile flags every op-library source gets: the stable headers only, for the
# minimum torch. -isystem keeps torch's own warnings out of ours.
function(moe_ext_torch_op_library target)
  target_include_directories(${target} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
  target_include_directories(${target} SYSTEM PRIVATE "${_moe_ext_torch_include}")
  target_compile_definitions(${target} PRIVATE TORCH_TARGET_VERSION=${MOE_EXT_TORCH_TARGET_VERSION})
  set_target_properties(${target} PROPERTIES
    PREFIX "" SUFFIX ".so" CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON
    SKIP_BUILD_RPATH ON LIBRARY_OUTPUT_DIRECTORY "${MOE_EXT_OUTPUT_DIR}")
  target_link_libraries(${target} PRIVATE moe_ext_core "${MOE_EXT_LIBTORCH_CPU}")
  moe_ext_set_warnings(${target})
endfunction()

file(GLOB MOE_EXT_CPU_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cpu/*.cpp")
add_library(moe_ext_C SHARED "${CMAKE_CURRENT_SOURCE_DIR}/csrc/torch_ops.cpp" ${MOE_EXT_CPU_SOURCES})
set_target_properties(moe_ext_C PROPERTIES OUTPUT_NAME "_C")
moe_ext_torch_op_library(moe_ext_C)

# The CUDA op library needs no CUDA torch to build: the glue uses the stable
# ABI, the stream comes from the stable C shim at run time
# (csrc/cuda/current_stream.cpp) and cudart is linked statically, so the file
# loads on any CUDA torch >= the minimum. moe_ext/_loader.py loads it only when
# the running torch has CUDA.
set(MOE_EXT_CUDA_OPS_BUILT OFF)
if(MOE_EXT_CUDA_COMPILED)
  find_package(CUDAToolkit REQUIRED)
  file(GLOB MOE_EXT_CUDA_GLUE_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cpp")
  add_library(moe_ext_C_cuda SHARED "${CMAKE_CURRENT_SOURCE_DIR}/csrc/torch_ops.cpp"
              ${MOE_EXT_CUDA_GLUE_SOURCES})
  set_target_properties(moe_ext_C_cuda PROPERTIES OUTPUT_NAME "_C_cuda")
  target_compile_definitions(moe_ext_C_cuda PRIVATE MOE_EXT_CUDA_LIBRARY=1)
  moe_ext_torch_op_library(moe_ext_C_cuda)
  target_link_libraries(moe_ext_C_cuda PRIVATE moe_ext_cuda_kernels CUDA::cudart_static ${CMAKE_DL_LIBS})
  set(MOE_EXT_CUDA_OPS_BUILT ON)
endif()
