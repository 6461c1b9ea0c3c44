# CUDA kernels are compiled whenever nvcc is found, whatever torch is installed.
#
# The kernels in csrc/cuda/*.cu are torch-free (raw pointers + a stream), so a
# machine without a GPU and with a CPU-only torch (CI) still compiles every one
# of them: none rots unnoticed. They are linked into the op library only when
# the torch in use has CUDA (MoeExtTorch.cmake decides).
#
# Architectures: CMAKE_CUDA_ARCHITECTURES if given, else $MOE_EXT_CUDA_ARCHS,
# else 90 (Hopper SASS + compute_90 PTX). torch's own CMake config may add the
# arch of the GPU it sees on top of this.
set(MOE_EXT_CUDA_COMPILED OFF)
set(MOE_EXT_CUDA_ARCHS "")
if(MOE_EXT_ENABLE_CUDA)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      if(DEFINED ENV{MOE_EXT_CUDA_ARCHS} AND NOT "$ENV{MOE_EXT_CUDA_ARCHS}" STREQUAL "")
        set(CMAKE_CUDA_ARCHITECTURES "$ENV{MOE_EXT_CUDA_ARCHS}")
      else()
        set(CMAKE_CUDA_ARCHITECTURES 90)
      endif()
    endif()
    enable_language(CUDA)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    file(GLOB MOE_EXT_CUDA_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu")
    add_library(moe_ext_cuda_kernels STATIC ${MOE_EXT_CUDA_SOURCES})
    target_include_directories(moe_ext_cuda_kernels PUBLIC "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
    target_compile_options(moe_ext_cuda_kernels PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo -Xcompiler=-fPIC>)
    set(MOE_EXT_CUDA_COMPILED ON)
    set(MOE_EXT_CUDA_ARCHS "${CMAKE_CUDA_ARCHITECTURES}")
    message(STATUS "moe_ext: nvcc ${CMAKE_CUDA_COMPILER_VERSION} found, CUDA kernels for arch ${CMAKE_CUDA_ARCHITECTURES}")
  else()
    message(STATUS "moe_ext: no nvcc found, CUDA kernels not compiled")
  endif()
endif()
