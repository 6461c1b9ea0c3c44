"""Loads the native parts of moe_ext, refusing a build made for another torch.

``moe_ext/_native`` (pybind11, torch-free) always loads and reports what was
compiled. ``moe_ext/_C.so`` registers ``torch.ops.moe_ext.*``; it links
against libtorch, so it must come from a build against the very torch that is
imported now. A mismatch would surface as an obscure "undefined symbol" from
the dynamic loader; we compare versions first and say what to do.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_REBUILD_HINT = ("rebuild moe_ext against the installed torch: "
                 "pip install --no-build-isolation --force-reinstall --no-deps .")

_loaded = False


def build_info() -> dict[str, Any]:
    """What this build compiled (backends, CUDA archs, CANN) and for which torch."""
    from moe_ext import _native

    return dict(_native.build_info())


def load_native_ops() -> None:
    """Load ``_C.so`` once; afterwards ``torch.ops.moe_ext.*`` exist."""
    global _loaded
    if _loaded:
        return
    info = build_info()
    if not info["torch_ops_built"]:
        raise ImportError("moe_ext was built without its torch op library (MOE_EXT_BUILD_TORCH=OFF)")
    built_for = info["torch_version"]
    if built_for != torch.__version__:
        raise ImportError(
            f"moe_ext was built against torch {built_for} but torch {torch.__version__} is "
            f"imported; its op library would not load. {_REBUILD_HINT}")
    library = os.path.join(os.path.dirname(__file__), "_C.so")
    if not os.path.exists(library):
        raise ImportError(f"moe_ext op library not found at {library}; {_REBUILD_HINT}")
    try:
        torch.ops.load_library(library)
    except OSError as error:  # e.g. a torch rebuilt in place with the same version string
        raise ImportError(f"moe_ext op library failed to load ({error}); {_REBUILD_HINT}") from error
    _loaded = True
