"""The CANN configuration path of the CMake build, against a fake CANN tree.

No CANN exists here, so cmake/MoeExtAscend.cmake and cmake/MoeExtNpuOps.cmake
never meet the real toolkit. This test points ASCEND_CANN_PACKAGE_PATH at a
directory whose compiler/tikcpp/ascendc_kernel_cmake/ascendc.cmake only
records the calls made to it (ascendc_library, ascendc_include_directories),
and checks that a configure finds it at a documented location, asks for the
kernel library from csrc/ascend/routing_kernels.cpp with the include
directories the kernels need (never the host twin), reports CANN in the build
info, and - torch_npu being absent - does not plan _C_npu.so. It says nothing
about whether CANN's real ascendc.cmake accepts these calls.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_ASCENDC = """
set(MOE_FAKE_LOG "${CMAKE_BINARY_DIR}/fake_ascendc_calls.txt")
file(WRITE "${MOE_FAKE_LOG}" "soc=${SOC_VERSION} run_mode=${RUN_MODE}\\n")
function(ascendc_library name kind)
  file(APPEND "${MOE_FAKE_LOG}" "ascendc_library ${name} ${kind} ${ARGN}\\n")
  add_library(${name} INTERFACE)
endfunction()
function(ascendc_include_directories name scope)
  file(APPEND "${MOE_FAKE_LOG}" "ascendc_include_directories ${name} ${scope} ${ARGN}\\n")
endfunction()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")
def test_cann_configure_path_with_a_fake_toolkit(tmp_path):
    cann = tmp_path / "cann"
    module_dir = cann / "compiler" / "tikcpp" / "ascendc_kernel_cmake"
    module_dir.mkdir(parents=True)
    (module_dir / "ascendc.cmake").write_text(FAKE_ASCENDC)
    build = tmp_path / "build"
    command = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DASCEND_CANN_PACKAGE_PATH={cann}",
               f"-DPython_EXECUTABLE={sys.executable}", "-DMOE_EXT_BUILD_PYBIND=OFF", "-DMOE_EXT_ENABLE_CUDA=OFF",
               f"-DMOE_EXT_OUTPUT_DIR={tmp_path / 'out'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"CANN at {cann}: AscendC kernels for Ascend910B1" in result.stdout
    assert "torch_npu does not import: _C_npu.so not built" in result.stdout
    calls = (build / "fake_ascendc_calls.txt").read_text()
    assert "soc=Ascend910B1 run_mode=npu" in calls
    library = [line for line in calls.splitlines() if line.startswith("ascendc_library")]
    assert library == [f"ascendc_library moe_ext_ascend_kernels STATIC {ROOT}/csrc/ascend/routing_kernels.cpp"]
    includes = [line for line in calls.splitlines() if line.startswith("ascendc_include_directories")][0]
    assert f"{ROOT}/csrc/ascend" in includes and "twin" not in includes
    info = (tmp_path / "out" / "_build_info.py").read_text()
    assert '"cann_found": True' in info and '"ascend_kernels_built": True' in info
    assert '"npu_dispatch_built": False' in info
