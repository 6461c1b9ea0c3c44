# AscendC kernels build only where the CANN toolkit is installed.
#
# No machine this project is developed or tested on has CANN, so nothing in
# this file has been exercised (the kernels are compiled and run in CI against
# the host twin instead: CMakeLists.txt's test target; see csrc/ascend/README.md).
# It follows CANN's documented CMake usage for Ascend C kernels: include
# ascendc.cmake from the toolkit's ascendc_kernel_cmake directory and build the
# kernel sources with ascendc_library(), which also generates one
# aclrtlaunch_<kernel>.h launch header per kernel (ACLRT_LAUNCH_KERNEL).
#
# Inputs (cache variables or environment):
#   MOE_EXT_ENABLE_ASCEND      ON by default; OFF skips all of this
#   ASCEND_CANN_PACKAGE_PATH   the CANN install (default: $ASCEND_TOOLKIT_HOME,
#                              $ASCEND_HOME_PATH, /usr/local/Ascend/ascend-toolkit/latest)
#   SOC_VERSION                the NPU to compile for (default Ascend910B1, an Atlas A2;
#                              `npu-smi info` names yours)
# Outputs: MOE_EXT_CANN_FOUND, MOE_EXT_ASCEND_KERNELS_BUILT, target moe_ext_ascend_kernels.
# The NPU op library that launches these kernels is cmake/MoeExtNpuOps.cmake.
set(MOE_EXT_CANN_FOUND OFF)
set(MOE_EXT_ASCEND_KERNELS_BUILT OFF)
if(MOE_EXT_ENABLE_ASCEND)
  if(NOT ASCEND_CANN_PACKAGE_PATH)
    foreach(_root IN ITEMS "$ENV{ASCEND_TOOLKIT_HOME}" "$ENV{ASCEND_HOME_PATH}"
                           "/usr/local/Ascend/ascend-toolkit/latest")
      if(_root AND EXISTS "${_root}")
        set(ASCEND_CANN_PACKAGE_PATH "${_root}")
        break()
      endif()
    endforeach()
  endif()
  # Where CANN releases keep the Ascend C CMake modules (the documented locations, newest first).
  set(MOE_EXT_ASCENDC_CMAKE_DIR "")
  if(ASCEND_CANN_PACKAGE_PATH)
    foreach(_dir IN ITEMS "compiler/tikcpp/ascendc_kernel_cmake" "tools/tikcpp/ascendc_kernel_cmake"
                          "ascendc_devkit/tikcpp/samples/cmake")
      if(EXISTS "${ASCEND_CANN_PACKAGE_PATH}/${_dir}/ascendc.cmake")
        set(MOE_EXT_ASCENDC_CMAKE_DIR "${ASCEND_CANN_PACKAGE_PATH}/${_dir}")
        break()
      endif()
    endforeach()
  endif()
  if(MOE_EXT_ASCENDC_CMAKE_DIR)
    set(MOE_EXT_CANN_FOUND ON)
    set(SOC_VERSION "Ascend910B1" CACHE STRING "The Ascend NPU the AscendC kernels are compiled for")
    set(RUN_MODE "npu" CACHE STRING "ascendc.cmake run mode: npu (cpu / sim are CANN's debug modes)")
    include("${MOE_EXT_ASCENDC_CMAKE_DIR}/ascendc.cmake")
    # One kernel source: the entry points; kernels/*.h are included as "kernels/..." and the real
    # kernel_operator.h comes from CANN (never the host twin in csrc/ascend/twin/, which only the
    # GoogleTest target sees).
    ascendc_library(moe_ext_ascend_kernels STATIC "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ascend/routing_kernels.cpp")
    ascendc_include_directories(moe_ext_ascend_kernels PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ascend"
                                "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
    set(MOE_EXT_ASCEND_KERNELS_BUILT ON)
    message(STATUS "moe_ext: CANN at ${ASCEND_CANN_PACKAGE_PATH}: AscendC kernels for ${SOC_VERSION}")
  else()
    message(STATUS "moe_ext: CANN not found, AscendC kernels not built")
  endif()
endif()
