"""moe_ext: native building blocks for mixture-of-experts expert parallelism.

Importing moe_ext loads its op library, so ``torch.ops.moe_ext.*`` exist
afterwards. The typed, documented wrappers live in :mod:`moe_ext.ops`; the
planners in :mod:`moe_ext.eplb`; the wiring in :mod:`moe_ext.distributed` and
:mod:`moe_ext.moe`; references and emulations for tests in :mod:`moe_ext.testing`.
"""

from moe_ext._loader import build_info, load_native_ops

load_native_ops()

from moe_ext import ops  # noqa: E402  (needs the op library loaded first)

__version__ = build_info()["version"]

__all__ = ["__version__", "build_info", "ops"]
