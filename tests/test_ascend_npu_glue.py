"""The NPU launcher translation unit (csrc/ascend/npu/npu_ops.cpp) compiles.

That file is built into moe_ext/_C_npu.so only where CANN and torch_npu exist,
which is never on the machines this project is tested on. So that it does not
rot, this test compiles it with ``-fsyntax-only`` against the real ATen / torch
headers of the installed torch and the stand-ins in tests/cpp/npu_standins/ for
torch_npu's and CANN's headers (their README says what they declare). It checks
the ATen/c10 API use, the plan calls and the registration; it does NOT check the
argument lists of the ACLRT_LAUNCH_KERNEL calls, nor link, nor run anything.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TU = ROOT / "csrc" / "ascend" / "npu" / "npu_ops.cpp"
STANDINS = ROOT / "tests" / "cpp" / "npu_standins"


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler on PATH")
def test_npu_launcher_compiles_against_aten(tmp_path):
    source = TU.read_text()
    launch_headers = re.findall(r'#include "(aclrtlaunch_(\w+)\.h)"', source)
    assert len(launch_headers) >= 40, "the launcher should include one launch header per kernel entry"
    for header, kernel in launch_headers:
        # ascendc_library generates one such header per kernel; variadic here (not checked).
        (tmp_path / header).write_text(
            '#pragma once\n#include "acl_standin.h"\n'
            f"template <typename... Args> uint32_t aclrtlaunch_{kernel}(uint32_t, aclrtStream, Args...);\n")
    torch_include = Path(torch.__file__).parent / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [_compiler(), "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               "-I", str(ROOT / "csrc"), "-I", str(STANDINS), "-I", str(tmp_path),
               "-isystem", str(torch_include), "-isystem", str(torch_include / "torch" / "csrc" / "api" / "include"),
               str(TU)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-6000:]}"
