# AscendC kernels build only where the CANN toolkit is installed.
#
# Detection looks at $ASCEND_TOOLKIT_HOME, $ASCEND_HOME_PATH and the default
# install prefix. No machine this project is developed or tested on has CANN,
# so this branch is not exercised here (the kernels are compiled and run in CI
# against the host twin instead: CMakeLists.txt's test target); see csrc/ascend/README.md. On NPU the
# Python layer calls the torch_npu operators that implement the same contracts.
set(MOE_EXT_CANN_FOUND OFF)
set(MOE_EXT_ASCEND_KERNELS_BUILT OFF)
if(MOE_EXT_ENABLE_ASCEND)
  set(_moe_ext_cann_roots "$ENV{ASCEND_TOOLKIT_HOME}" "$ENV{ASCEND_HOME_PATH}"
      "/usr/local/Ascend/ascend-toolkit/latest")
  foreach(_root IN LISTS _moe_ext_cann_roots)
    if(_root AND EXISTS "${_root}/compiler/tikcpp/ascendc_kernel_cmake")
      set(MOE_EXT_CANN_FOUND ON)
      set(MOE_EXT_CANN_ROOT "${_root}")
      break()
    endif()
  endforeach()
  file(GLOB MOE_EXT_ASCEND_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ascend/*.cpp")
  if(MOE_EXT_CANN_FOUND AND MOE_EXT_ASCEND_SOURCES)
    set(ASCEND_CANN_PACKAGE_PATH "${MOE_EXT_CANN_ROOT}")
    include("${MOE_EXT_CANN_ROOT}/compiler/tikcpp/ascendc_kernel_cmake/ascendc.cmake")
    ascendc_library(moe_ext_ascend_kernels STATIC ${MOE_EXT_ASCEND_SOURCES})
    # kernels/*.h are included as "kernels/..."; the real kernel_operator.h comes from CANN
    # (never the host twin in csrc/ascend/twin/, which only the GoogleTest target sees).
    target_include_directories(moe_ext_ascend_kernels PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ascend"
                               "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
    set(MOE_EXT_ASCEND_KERNELS_BUILT ON)
  elseif(MOE_EXT_CANN_FOUND)
    message(STATUS "moe_ext: CANN found at ${MOE_EXT_CANN_ROOT}; no AscendC kernel sources yet")
  else()
    message(STATUS "moe_ext: CANN not found, AscendC kernels not built")
  endif()
endif()
