# moe_ext/_native: the pybind11 module over the torch-free core (planners,
# build information). It never links torch, so it loads whatever torch is
# installed, and the import-time torch-version guard can rely on it. It is the
# one per-Python-version product (pybind11 module: cpXY ABI tag).
if(NOT Python_EXECUTABLE)
  find_package(Python COMPONENTS Interpreter REQUIRED)
endif()
find_package(Python COMPONENTS Interpreter Development.Module REQUIRED)
if(NOT pybind11_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import pybind11; print(pybind11.get_cmake_dir())"
    OUTPUT_VARIABLE pybind11_DIR OUTPUT_STRIP_TRAILING_WHITESPACE)
endif()
find_package(pybind11 CONFIG REQUIRED)

file(GLOB MOE_EXT_BINDING_SOURCES CONFIGURE_DEPENDS
  "${CMAKE_CURRENT_SOURCE_DIR}/csrc/bindings.cpp"
  "${CMAKE_CURRENT_SOURCE_DIR}/csrc/bindings/*.cpp")
pybind11_add_module(moe_ext_native MODULE ${MOE_EXT_BINDING_SOURCES})
set_target_properties(moe_ext_native PROPERTIES
  OUTPUT_NAME "_native" LIBRARY_OUTPUT_DIRECTORY "${MOE_EXT_OUTPUT_DIR}")
target_link_libraries(moe_ext_native PRIVATE moe_ext_core)
moe_ext_set_warnings(moe_ext_native)

foreach(_flag MOE_EXT_CUDA_COMPILED MOE_EXT_CUDA_OPS_BUILT MOE_EXT_CANN_FOUND
              MOE_EXT_ASCEND_KERNELS_BUILT MOE_EXT_BUILD_TORCH)
  if(${_flag})
    set(_value 1)
  else()
    set(_value 0)
  endif()
  target_compile_definitions(moe_ext_native PRIVATE ${_flag}_VALUE=${_value})
endforeach()
target_compile_definitions(moe_ext_native PRIVATE
  MOE_EXT_VERSION_STRING="${PROJECT_VERSION}"
  MOE_EXT_TORCH_VERSION_STRING="${MOE_EXT_TORCH_VERSION}"
  MOE_EXT_TORCH_MIN_VERSION_STRING="${MOE_EXT_TORCH_MIN_VERSION}"
  MOE_EXT_CUDA_ARCHS_STRING="${MOE_EXT_CUDA_ARCHS}"
  MOE_EXT_CUDA_COMPILER_VERSION_STRING="${CMAKE_CUDA_COMPILER_VERSION}"
  MOE_EXT_CXX_COMPILER_STRING="${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION}")
