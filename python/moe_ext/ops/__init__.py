"""Typed wrappers over ``torch.ops.moe_ext.*``, each with its written contract.

Every op here has one schema (csrc/torch_ops.cpp), CPU and CUDA kernels, a
fake kernel for ``torch.compile`` registered beside its wrapper, and a
plain-torch reference in :mod:`moe_ext.testing.reference`.
"""

from moe_ext.ops.permute_indices import generate_permute_indices

__all__ = ["generate_permute_indices"]
