"""Loads the native parts of moe_ext.

``moe_ext/_build_info.py`` says what was compiled; ``moe_ext/_native``
(pybind11, torch-free, one file per Python version) holds the planners. The op libraries are built on PyTorch's stable
ABI (docs/DESIGN.md, "Binary compatibility"), so they are not tied to the torch
they were compiled against, only to a minimum release:

- ``_C.so`` declares the schemas and registers the CPU kernels;
- ``_C_cuda.so`` registers the CUDA kernels. It is loaded only when the running
  torch is a CUDA build, so a CPU-only torch never touches it;
- ``_C_npu.so`` (built only with CANN and torch_npu; not on the stable ABI, tied
  to the torch / torch_npu it was built with) registers the AscendC kernels for
  the NPU key. It is loaded only when the build made it and torch_npu imports;
  ``_npu_composites`` then registers torch composites for the ops without one.

Both load on any torch from ``build_info()["torch_min_version"]`` on; an older
torch is refused here with a clear message rather than by the dynamic loader.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

_DEV_BUILD_HINT = ("build it with `pip install .` (or, in a source checkout, "
                   "`bash scripts/dev_build.sh` and PYTHONPATH=python)")

# C++ checks that mean a Python TypeError prefix their message with this
# (MOE_TYPE_ERROR_PREFIX in csrc/common/op_checks.h): the stable ABI can only
# raise ValueError (std::invalid_argument) or RuntimeError from C++.
TYPE_ERROR_PREFIX = "TypeError: "

_loaded = False


def build_info() -> dict[str, Any]:
    """What this build compiled (backends, CUDA archs, CANN) and for which torch."""
    try:
        from moe_ext._build_info import BUILD_INFO
    except ImportError as error:
        package = os.path.dirname(__file__)
        raise ImportError(
            f"moe_ext is not built: {package} has no _build_info.py (written by the native "
            f"build with _C.so and _native); {_DEV_BUILD_HINT}") from error
    return dict(BUILD_INFO)


def _check_native_module() -> None:
    try:
        from moe_ext import _native  # noqa: F401
    except ImportError as error:
        package = os.path.dirname(__file__)
        raise ImportError(
            f"moe_ext's planner module _native (pybind11, one file per Python version) does not "
            f"load from {package} for this Python ({error}); it was built for another Python or "
            f"not at all: {_DEV_BUILD_HINT}") from error


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ImportError(f"moe_ext cannot read the torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(running: str, minimum: str) -> None:
    """Refuse a torch older than the op libraries' stable-ABI target.

    Only major.minor count: the stable ABI is versioned per release, and a
    pre-release such as ``2.11.0a0+git`` (vendor images) carries that release's ABI.
    """
    if _major_minor(running) < _major_minor(minimum):
        raise ImportError(
            f"moe_ext needs torch >= {minimum} (its op libraries use PyTorch's stable ABI as "
            f"of {minimum}), but torch {running} is imported; upgrade torch "
            f"(pip install 'torch>={minimum}')")


def _load(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise ImportError(f"moe_ext's {what} {os.path.basename(path)} is missing from "
                          f"{os.path.dirname(path)}; {_DEV_BUILD_HINT}")
    try:
        torch.ops.load_library(path)
    except OSError as error:
        cause = error.__cause__ or error  # torch wraps the dynamic loader's own message
        raise ImportError(f"moe_ext's {what} {path} failed to load: {cause}") from error


def load_native_ops() -> None:
    """Load the op libraries once; afterwards ``torch.ops.moe_ext.*`` exist."""
    global _loaded
    if _loaded:
        return
    info = build_info()
    _check_native_module()
    if not info["torch_ops_built"]:
        raise ImportError("moe_ext was built without its torch op library (MOE_EXT_BUILD_TORCH=OFF)")
    check_torch_version(torch.__version__, info["torch_min_version"])
    package = os.path.dirname(__file__)
    _load(os.path.join(package, "_C.so"), "op library (schemas and CPU kernels)")
    if torch.version.cuda is not None and info["cuda_dispatch_built"]:
        _load(os.path.join(package, "_C_cuda.so"), "CUDA op library")
    if info.get("npu_dispatch_built") and _torch_npu_imports():
        _load(os.path.join(package, "_C_npu.so"), "NPU op library (AscendC kernels)")
        from moe_ext import _npu_composites  # the ops without an AscendC kernel, for the same key
        _npu_composites.register()
    _loaded = True


def _torch_npu_imports() -> bool:
    """Whether torch_npu is importable (it registers the NPU device _C_npu.so needs)."""
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return True


def native_error(error: RuntimeError) -> Exception:
    """The Python exception a native op's RuntimeError stands for.

    The stable ABI lets C++ raise ValueError (std::invalid_argument) and
    RuntimeError only, so the op layer prefixes type errors with ``TypeError: ``
    (csrc/common/op_checks.h). Each wrapper in ``moe_ext.ops`` calls its op as::

        try:
            return torch.ops.moe_ext.op(...)
        except RuntimeError as error:
            raise native_error(error) from None

    which gives back the TypeError, and any other error unchanged.
    """
    message = str(error)
    if message.startswith(TYPE_ERROR_PREFIX):
        return TypeError(message[len(TYPE_ERROR_PREFIX):])
    return error
