"""The NPU launcher translation unit (csrc/ascend/npu/npu_ops.cpp) compiles.

That file is built into moe_ext/_C_npu.so only where CANN and torch_npu exist,
which is never on the machines this project is tested on. So that it does not
rot, this test compiles it with ``-fsyntax-only`` against the real ATen / torch
headers of the installed torch and the stand-ins in tests/cpp/npu_standins/ for
torch_npu's and CANN's headers (their README says what they declare). The
``aclrtlaunch_<kernel>.h`` headers ascendc_library would generate are written
here from the kernels' own entry points (routing_kernels.cpp preprocessed
against the host twin): each declares ``aclrtlaunch_<kernel>(blockDim, stream,
args...)`` with the entry's parameters, GM addresses as ``void*``, so every
ACLRT_LAUNCH_KERNEL call is checked for the kernel's existence and its argument
count and types. Nothing is linked or run.
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


def _kernel_entries() -> dict[str, list[str]]:
    """Each AscendC entry point's parameter types, from routing_kernels.cpp compiled against the twin."""
    ascend = ROOT / "csrc" / "ascend"
    result = subprocess.run([_compiler(), "-std=c++17", "-E", "-P", "-I", str(ascend / "twin"), "-I", str(ascend),
                             "-I", str(ROOT / "csrc"), str(ascend / "routing_kernels.cpp")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    entries = {}
    for name, params in re.findall(r'extern "C"\s+void\s+(moe_ext_\w+)\s*\(([^)]*)\)', result.stdout):
        types = []
        for param in params.split(","):
            words = param.replace("*", " * ").split()
            types.append("void*" if "*" in words else " ".join(words[:-1]))
        entries[name] = types
    return entries


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler on PATH")
def test_npu_launcher_compiles_against_aten(tmp_path):
    source = TU.read_text()
    launch_headers = re.findall(r'#include "(aclrtlaunch_(\w+)\.h)"', source)
    entries = _kernel_entries()
    assert len(entries) >= 40, entries
    assert sorted(kernel for _, kernel in launch_headers) == sorted(entries), \
        "the launcher must include exactly one launch header per kernel entry point"
    for header, kernel in launch_headers:
        params = ", ".join(["uint32_t", "aclrtStream", *entries[kernel]])
        (tmp_path / header).write_text(
            f'#pragma once\n#include "acl_standin.h"\nuint32_t aclrtlaunch_{kernel}({params});\n')
    torch_include = Path(torch.__file__).parent / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [_compiler(), "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               "-I", str(ROOT / "csrc"), "-I", str(STANDINS), "-I", str(tmp_path),
               "-isystem", str(torch_include), "-isystem", str(torch_include / "torch" / "csrc" / "api" / "include"),
               str(TU)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-6000:]}"
