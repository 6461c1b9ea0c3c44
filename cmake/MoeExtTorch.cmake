# The torch op library moe_ext/_C, built against the torch of the Python that
# runs the build.
#
# setup.py passes MOE_EXT_TORCH_CMAKE_PREFIX / MOE_EXT_TORCH_VERSION /
# MOE_EXT_TORCH_CUDA, read from that torch (even under pip's build isolation,
# see setup.py). A bare CMake run asks ${Python_EXECUTABLE} instead. The torch
# version is compiled into moe_ext/_native so that import refuses, with a clear
# message, a build made against another torch (otherwise: undefined symbols).
if(NOT MOE_EXT_TORCH_CMAKE_PREFIX)
  if(NOT Python_EXECUTABLE)
    find_package(Python COMPONENTS Interpreter REQUIRED)
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import torch; print(torch.utils.cmake_prefix_path); print(torch.__version__); print(int(torch.version.cuda is not None))"
    OUTPUT_VARIABLE _moe_ext_torch_info OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _moe_ext_torch_rc)
  if(NOT _moe_ext_torch_rc EQUAL 0)
    message(FATAL_ERROR "moe_ext: ${Python_EXECUTABLE} cannot import torch; install PyTorch first")
  endif()
  string(REPLACE "\n" ";" _moe_ext_torch_info "${_moe_ext_torch_info}")
  list(GET _moe_ext_torch_info 0 MOE_EXT_TORCH_CMAKE_PREFIX)
  list(GET _moe_ext_torch_info 1 MOE_EXT_TORCH_VERSION)
  list(GET _moe_ext_torch_info 2 MOE_EXT_TORCH_CUDA)
endif()

list(APPEND CMAKE_PREFIX_PATH "${MOE_EXT_TORCH_CMAKE_PREFIX}")
find_package(Torch REQUIRED)

set(MOE_EXT_TORCH_HAS_CUDA OFF)
if(MOE_EXT_TORCH_CUDA)
  if(MOE_EXT_CUDA_COMPILED)
    set(MOE_EXT_TORCH_HAS_CUDA ON)
  else()
    message(WARNING "moe_ext: torch has CUDA but nvcc was not found; the CUDA dispatch is not built")
  endif()
endif()

file(GLOB MOE_EXT_CPU_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cpu/*.cpp")
set(MOE_EXT_OP_SOURCES "${CMAKE_CURRENT_SOURCE_DIR}/csrc/torch_ops.cpp" ${MOE_EXT_CPU_SOURCES})
if(MOE_EXT_TORCH_HAS_CUDA)
  file(GLOB MOE_EXT_CUDA_GLUE_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cpp")
  list(APPEND MOE_EXT_OP_SOURCES ${MOE_EXT_CUDA_GLUE_SOURCES})
endif()

add_library(moe_ext_C SHARED ${MOE_EXT_OP_SOURCES})
set_target_properties(moe_ext_C PROPERTIES
  OUTPUT_NAME "_C" PREFIX "" SUFFIX ".so"
  LIBRARY_OUTPUT_DIRECTORY "${MOE_EXT_OUTPUT_DIR}")
target_include_directories(moe_ext_C PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
separate_arguments(_moe_ext_torch_cxx_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
target_compile_options(moe_ext_C PRIVATE ${_moe_ext_torch_cxx_flags})
target_link_libraries(moe_ext_C PRIVATE moe_ext_core ${TORCH_LIBRARIES})
moe_ext_set_warnings(moe_ext_C)
if(MOE_EXT_TORCH_HAS_CUDA)
  find_package(CUDAToolkit REQUIRED)
  target_compile_definitions(moe_ext_C PRIVATE MOE_EXT_WITH_CUDA=1)
  target_link_libraries(moe_ext_C PRIVATE moe_ext_cuda_kernels CUDA::cudart)
endif()
if(NOT MOE_EXT_TORCH_VERSION)
  message(FATAL_ERROR "moe_ext: the torch version is unknown; the import-time guard needs it")
endif()
