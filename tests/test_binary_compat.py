"""The op libraries are stable-ABI binaries: what makes one file load on every torch >= 2.11.

Checks the built files themselves (dynamic dependencies and undefined symbols,
read with binutils' readelf / nm), the sources of the op glue (no non-stable
torch header), the import-time version guard and the TypeError conversion.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import moe_ext
from moe_ext import _loader

PACKAGE = Path(moe_ext.__file__).parent
ROOT = Path(__file__).resolve().parents[1]

# Shared objects a stable-ABI op library may need: torch's C shim lives in
# libtorch_cpu; the rest is the C/C++ runtime.
ALLOWED_NEEDED = {"libtorch_cpu.so", "libstdc++.so.6", "libgcc_s.so.1", "libc.so.6", "libm.so.6",
                  "ld-linux-x86-64.so.2", "libpthread.so.0", "libdl.so.2", "librt.so.1"}


def _libraries() -> list[Path]:
    libraries = [PACKAGE / "_C.so"]
    if moe_ext.build_info()["cuda_dispatch_built"]:
        libraries.append(PACKAGE / "_C_cuda.so")
    return libraries


def _needs_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (binutils) is not installed")
    return path


@pytest.mark.parametrize("library", _libraries(), ids=lambda path: path.name)
def test_op_library_needs_only_libtorch_cpu_and_the_c_runtime(library):
    readelf = _needs_tool("readelf")
    dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
    assert "libtorch_cpu.so" in needed
    assert needed <= ALLOWED_NEEDED, f"{library.name} needs {sorted(needed - ALLOWED_NEEDED)}"


@pytest.mark.parametrize("library", _libraries(), ids=lambda path: path.name)
def test_op_library_uses_no_libtorch_cpp_symbol(library):
    nm = _needs_tool("nm")
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(library)], capture_output=True,
                               text=True, check=True).stdout.split()
    # Mangled C++ names in at::, c10::, torch:: (e.g. _ZN3c105Error...) would tie
    # the file to one libtorch build; the stable ABI is C functions only.
    cpp_torch = [name for name in undefined if re.match(r"_ZN?K?(2at|3c10|5torch|6caffe2)", name)]
    assert cpp_torch == []
    torch_c = [name for name in undefined if name.startswith(("aoti_torch_", "torch_"))]
    assert torch_c, "expected the stable C shim functions to be imported"


def test_op_glue_includes_only_stable_torch_headers():
    sources = [ROOT / "csrc" / "torch_ops.cpp", *sorted((ROOT / "csrc" / "cpu").glob("*")),
               *sorted((ROOT / "csrc" / "common").glob("*")), *sorted((ROOT / "csrc" / "cuda").glob("*.cpp")),
               *sorted((ROOT / "csrc" / "cuda").glob("*.h"))]
    offenders = []
    for source in sources:
        for include in re.findall(r"#\s*include\s*[<\"]([^>\"]+)[>\"]", source.read_text()):
            if include.startswith(("ATen/", "c10/", "caffe2/")) or (
                    include.startswith("torch/") and not include.startswith(
                        ("torch/csrc/stable/", "torch/headeronly/", "torch/csrc/inductor/aoti_torch/c/"))):
                offenders.append(f"{source.relative_to(ROOT)}: {include}")
    assert offenders == []


def test_build_records_the_minimum_torch():
    info = moe_ext.build_info()
    assert info["torch_min_version"] == "2.11"
    assert _loader._major_minor(torch.__version__) >= _loader._major_minor(info["torch_min_version"])


@pytest.mark.parametrize("running", ["2.11.0", "2.11.0a0+git1234abc", "2.13.0+cpu", "2.14.1+cu130", "3.0.0"])
def test_version_guard_accepts_the_minimum_and_newer(running):
    _loader.check_torch_version(running, "2.11")


@pytest.mark.parametrize("running", ["2.10.0+cu128", "2.9.1", "1.13.1"])
def test_version_guard_refuses_older_torch_with_the_reason(running):
    with pytest.raises(ImportError, match=r"moe_ext needs torch >= 2\.11 .* but torch "
                                          + re.escape(running) + " is imported"):
        _loader.check_torch_version(running, "2.11")


def test_type_errors_cross_the_stable_abi_as_runtime_error_and_come_back():
    bad = (torch.ones(3, 2), torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match=r"^TypeError: gather_rows: indices must be Int or Long"):
        torch.ops.moe_ext.gather_rows(*bad)
    # The wrapper refuses it before dispatch, in torch's dtype spelling (issue 15).
    with pytest.raises(TypeError, match=r"^gather_rows: indices must be torch.int32 or torch.int64, got "
                                        r"torch.float32$"):
        moe_ext.ops.gather_rows(*bad)
    try:  # and the C++ message still comes back as a TypeError through native_error
        torch.ops.moe_ext.gather_rows(*bad)
    except RuntimeError as error:
        assert isinstance(_loader.native_error(error), TypeError)
    # Value errors need no conversion: std::invalid_argument arrives as ValueError.
    with pytest.raises(ValueError, match="got 5 at index 0"):
        torch.ops.moe_ext.gather_rows(torch.ones(3, 2), torch.tensor([5]))
    other = RuntimeError("CUDA error: out of memory")
    assert _loader.native_error(other) is other


def test_missing_library_message_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(ImportError, match=r"_C_cuda\.so is missing from .*scripts/dev_build\.sh"):
        _loader._load(os.path.join(tmp_path, "_C_cuda.so"), "CUDA op library")


def test_cuda_dispatch_is_registered_exactly_when_torch_has_cuda():
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("moe_ext::moe_permute", "CUDA")
    expected = torch.version.cuda is not None and moe_ext.build_info()["cuda_dispatch_built"]
    assert registered == expected
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moe_ext::moe_permute", "CPU")
