"""Typed wrappers over ``torch.ops.moe_ext.*``, each with its written contract.

Every op here has one schema (csrc/torch_ops.cpp), CPU and CUDA kernels, a
fake kernel for ``torch.compile`` registered beside its wrapper, and a
plain-torch reference in :mod:`moe_ext.testing.reference`.
"""

from moe_ext.ops.permute_indices import generate_permute_indices
from moe_ext.ops.regroup import (GroupedRows, gather_rows, group_by_local_expert, scatter_rows,
                                 ungroup_by_local_expert)
from moe_ext.ops.routing import PermuteResult, expert_histogram, moe_permute, moe_unpermute

__all__ = [
    "generate_permute_indices",
    "GroupedRows", "gather_rows", "group_by_local_expert", "scatter_rows", "ungroup_by_local_expert",
    "PermuteResult", "expert_histogram", "moe_permute", "moe_unpermute",
]
