"""Build of moe_ext: `pip install .` / `pip wheel .` run CMake (CMakeLists.txt) from here.

What is built (docs/DESIGN.md, "Binary compatibility"):
- moe_ext/_C.so, moe_ext/_C_cuda.so: the op libraries, on PyTorch's stable ABI.
  They need torch's headers and libtorch_cpu.so at build time, from the torch
  of the installing environment (any torch >= 2.11; under pip's build isolation
  the same interpreter is asked again without pip's overlay), and load on every
  torch >= 2.11 afterwards. _C_cuda.so is built whenever nvcc is found, also
  against a CPU-only torch.
- moe_ext/_native*.so: the pybind11 planners module, one per Python version.
  MOE_EXT_EXTRA_PYTHONS="python3.12 ..." builds it for those interpreters too,
  into the same wheel, whose tag then lists every one (e.g. cp311.cp312).

Progress: each stage prints a line; pip shows them with `pip install -v .`.
Environment knobs: MAX_JOBS (parallel compile jobs), MOE_EXT_CUDA_ARCHS
(e.g. "90" or "80;90"), MOE_EXT_CMAKE_ARGS (extra -D options),
MOE_EXT_EXTRA_PYTHONS (see above).

`pip install -e .` is refused: the native libraries must sit beside the
package's Python files, which an editable install does not arrange; the
developer build is `bash scripts/dev_build.sh` (in place) with PYTHONPATH=python.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1 keeps it in the wheel package
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # no wheel at all (e.g. a bare --no-build-isolation install)
        bdist_wheel = None

ROOT = Path(__file__).parent.resolve()

_TORCH_PROBE = ("import json, os, torch; print(json.dumps([os.path.dirname(torch.__file__), "
                "torch.__version__, torch.version.cuda is not None]))")

# What an interpreter's extension-module file name and wheel tag are.
_PYTHON_PROBE = ("import json, sys, sysconfig; print(json.dumps([sysconfig.get_config_var('EXT_SUFFIX'), "
                 "f'cp{sys.version_info[0]}{sys.version_info[1]}']))")


def log(message: str) -> None:
    print(f"moe_ext build: {message}", flush=True)


def installed_torch() -> tuple[str, str, bool]:
    """(package directory, version, has CUDA) of the torch of the installing environment."""
    try:
        import torch

        return os.path.dirname(torch.__file__), torch.__version__, torch.version.cuda is not None
    except ImportError:
        pass
    outside_isolation = {key: value for key, value in os.environ.items()
                         if key not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = subprocess.run([sys.executable, "-c", _TORCH_PROBE], env=outside_isolation,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError(
            "moe_ext builds its op libraries with the headers of the installed PyTorch (>= 2.11), "
            f"and none was found for {sys.executable}. Install torch first (e.g. pip install "
            "torch), then moe_ext.\n" + probe.stderr[-2000:])
    root, version, has_cuda = json.loads(probe.stdout.strip().splitlines()[-1])
    return root, version, has_cuda


def extra_pythons() -> list[str]:
    """Interpreters named in MOE_EXT_EXTRA_PYTHONS, each resolved on PATH (error if missing)."""
    found = []
    for name in shlex.split(os.environ.get("MOE_EXT_EXTRA_PYTHONS", "")):
        path = shutil.which(name)
        if path is None:
            raise RuntimeError(f"MOE_EXT_EXTRA_PYTHONS names {name!r}, which is not on PATH")
        found.append(path)
    return found


def python_facts(python: str) -> tuple[str, str]:
    """(extension suffix, cpXY tag) of an interpreter."""
    probe = subprocess.run([python, "-c", _PYTHON_PROBE], capture_output=True, text=True, check=True)
    suffix, tag = json.loads(probe.stdout.strip().splitlines()[-1])
    return suffix, tag


def run(command: list[str], stage: str) -> None:
    begin = time.monotonic()
    log(f"{stage} ...")
    subprocess.run(command, check=True)
    log(f"{stage} done in {time.monotonic() - begin:.0f} s")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if getattr(self, "editable_mode", False):
            raise RuntimeError(
                "moe_ext does not support `pip install -e .`: its native libraries (_C.so, "
                "_C_cuda.so, _native*.so) must sit in python/moe_ext beside the Python files. "
                "For a developer build run `bash scripts/dev_build.sh` (builds them in place) "
                "and use PYTHONPATH=$PWD/python; `pip install .` installs a normal copy.")
        if shutil.which("cmake") is None:
            raise RuntimeError("moe_ext needs CMake >= 3.22 on PATH to build")
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        torch_root, torch_version, _ = installed_torch()
        log(f"torch {torch_version} at {torch_root} (headers only: the op libraries target torch >= 2.11)")
        common = [f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DMOE_EXT_OUTPUT_DIR={output_dir}",
                  "-DCMAKE_BUILD_TYPE=Release"]
        ninja = shutil.which("ninja")
        if ninja:  # named explicitly: a cached path from an earlier build-isolation env is gone
            common += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        common += shlex.split(os.environ.get("MOE_EXT_CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        args = [f"-DPython_EXECUTABLE={sys.executable}", f"-DMOE_EXT_TORCH_ROOT={torch_root}",
                f"-DMOE_EXT_TORCH_VERSION={torch_version}", *common]
        run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], "[1/2] configure (CMake)")
        run(["cmake", "--build", str(build_dir), "-j", jobs],
            f"[2/2] compile with {jobs} jobs (mostly the CUDA kernels: 3-6 min on 2 cores)")
        for index, python in enumerate(extra_pythons()):
            extra_dir = build_dir.parent / f"cmake-native-{index}"
            extra = [f"-DPython_EXECUTABLE={python}", "-DMOE_EXT_BUILD_TORCH=OFF",
                     f"-DMOE_EXT_PREBUILT_CORE={build_dir / 'libmoe_ext_core.a'}",
                     "-DMOE_EXT_ENABLE_CUDA=OFF", "-DMOE_EXT_ENABLE_ASCEND=OFF",
                     "-DMOE_EXT_WRITE_BUILD_INFO=OFF", *common]
            run(["cmake", "-S", str(ROOT), "-B", str(extra_dir), *extra], f"configure _native for {python}")
            run(["cmake", "--build", str(extra_dir), "-j", jobs], f"compile _native for {python}")


class BdistWheel(bdist_wheel or object):
    """Tags the wheel with every Python version whose _native it carries."""

    def get_tag(self) -> tuple[str, str, str]:
        python_tag, abi_tag, platform_tag = super().get_tag()
        tags = [python_facts(sys.executable)[1]] + [python_facts(python)[1] for python in extra_pythons()]
        if len(tags) > 1:
            tags = sorted(set(tags), key=lambda tag: int(tag[3:]))
            python_tag = abi_tag = ".".join(tags)
        return python_tag, abi_tag, platform_tag



setup(
    ext_modules=[CMakeExtension("moe_ext._native")],
    cmdclass={"build_ext": CMakeBuild, **({"bdist_wheel": BdistWheel} if bdist_wheel else {})},
)
