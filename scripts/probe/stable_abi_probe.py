"""Probe: what a stable-ABI op library can do on the running torch.

Compiles (with the system C++ compiler, against the running torch's headers,
TORCH_TARGET_VERSION 2.11 like moe_ext/_C) a tiny STABLE_TORCH_LIBRARY with one
op per question, loads it, and runs each op in its own subprocess so a segfault
is reported instead of killing the probe:

- oss_only / oss_check: does an std::ostringstream inside the extension (and
  STD_TORCH_CHECK's formatted message, which builds one) still crash? On the GPU
  machine's torch 2.11 image it did for extensions built with the full libtorch
  C++ API (scripts/probe/value_error_probe.py); moe_ext keeps building messages
  with core::str_cat either way.
- invalid_argument / runtime_error: which Python exception each C++ exception
  becomes (moe_ext relies on ValueError and RuntimeError; see
  csrc/common/op_checks.h).

Usage: python3 scripts/probe/stable_abi_probe.py   (prints one line per op; exit 0)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>
#include <sstream>
#include <stdexcept>
using torch::stable::Tensor;
Tensor oss_only(Tensor x) { std::ostringstream s; s << "abc" << 1; if (s.str().size() != 4) throw std::runtime_error("bad"); return torch::stable::contiguous(x); }
Tensor oss_check(Tensor x) { STD_TORCH_CHECK(x.dim() == 99, "dim must be 99, got ", x.dim()); return x; }
Tensor invalid_argument(Tensor x) { throw std::invalid_argument("value message"); }
Tensor runtime_error(Tensor x) { throw std::runtime_error("runtime message"); }
STABLE_TORCH_LIBRARY(moe_ext_probe, m) {
  m.def("oss_only(Tensor x) -> Tensor"); m.def("oss_check(Tensor x) -> Tensor");
  m.def("invalid_argument(Tensor x) -> Tensor"); m.def("runtime_error(Tensor x) -> Tensor");
}
STABLE_TORCH_LIBRARY_IMPL(moe_ext_probe, CPU, m) {
  m.impl("oss_only", TORCH_BOX(&oss_only)); m.impl("oss_check", TORCH_BOX(&oss_check));
  m.impl("invalid_argument", TORCH_BOX(&invalid_argument)); m.impl("runtime_error", TORCH_BOX(&runtime_error));
}
"""

RUN_ONE = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    out = getattr(torch.ops.moe_ext_probe, sys.argv[2])(torch.ones(2))
    print("returned", tuple(out.shape))
except Exception as error:
    print("raised", type(error).__name__ + ":", str(error).splitlines()[0][:100])
"""


def main() -> int:
    import torch

    root = os.path.dirname(torch.__file__)
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        print("stable_abi_probe: no C++ compiler found")
        return 0
    workdir = tempfile.mkdtemp(prefix="moe_ext_probe_")
    source, library = os.path.join(workdir, "probe.cpp"), os.path.join(workdir, "probe.so")
    with open(source, "w") as handle:
        handle.write(SOURCE)
    build = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-DTORCH_TARGET_VERSION=0x020b000000000000",
         "-isystem", os.path.join(root, "include"), source, "-o", library,
         "-L", os.path.join(root, "lib"), "-ltorch_cpu"], capture_output=True, text=True)
    if build.returncode != 0:
        print("stable_abi_probe: build failed:\n" + build.stderr[-3000:])
        return 0
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), probe built with {compiler}")
    for op in ("oss_only", "oss_check", "invalid_argument", "runtime_error"):
        run = subprocess.run([sys.executable, "-c", RUN_ONE, library, op], capture_output=True, text=True)
        verdict = run.stdout.strip()
        if run.returncode != 0:  # negative: killed by that signal (-11: segfault)
            verdict = f"died, exit code {run.returncode} {verdict}".strip()
        print(f"  {op:17} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
