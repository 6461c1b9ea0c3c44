"""Build of moe_ext: `pip install .` runs CMake (CMakeLists.txt) from here.

Which torch the extension is built against: the one the installing Python
imports. With `pip install --no-build-isolation .` that is simply `import
torch`. Under pip's default build isolation the environment's packages are
hidden from the build, so we ask the same interpreter again without pip's
overlay (PYTHONPATH) - it then sees the environment's torch. Either way the
version is compiled in, and `import moe_ext` refuses a build whose torch
differs from the imported one (see python/moe_ext/_loader.py).

Environment knobs: MAX_JOBS (parallel compile jobs), MOE_EXT_CUDA_ARCHS
(e.g. "90" or "80;90"), MOE_EXT_CMAKE_ARGS (extra -D options).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()

_TORCH_PROBE = ("import json, os, torch; print(json.dumps([os.path.dirname(torch.__file__), "
                "torch.__version__, torch.version.cuda is not None]))")


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
            "moe_ext builds against the installed PyTorch, and none was found for "
            f"{sys.executable}. Install torch first (e.g. pip install torch), then moe_ext.\n"
            + probe.stderr[-2000:])
    prefix, version, has_cuda = json.loads(probe.stdout.strip().splitlines()[-1])
    return prefix, version, has_cuda


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if shutil.which("cmake") is None:
            raise RuntimeError("moe_ext needs CMake >= 3.22 on PATH to build")
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        torch_root, torch_version, _ = installed_torch()
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMOE_EXT_TORCH_ROOT={torch_root}",
            f"-DMOE_EXT_TORCH_VERSION={torch_version}",
            f"-DMOE_EXT_OUTPUT_DIR={output_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        args += shlex.split(os.environ.get("MOE_EXT_CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("moe_ext._native")],
    cmdclass={"build_ext": CMakeBuild},
)
