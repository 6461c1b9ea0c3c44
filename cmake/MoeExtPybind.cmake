# moe_ext/_native: the pybind11 module over the torch-free core (planners). It
# never links torch, so it loads whatever torch is installed. It is the one per-Python-version product (pybind11 module: cpXY
# ABI tag); setup.py can build it for several interpreters into one wheel.
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
