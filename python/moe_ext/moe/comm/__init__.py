"""The MoE communication methods (one interface, see :mod:`moe_ext.moe.comm.base`)."""

from moe_ext.moe.comm.allgather import AllGatherCommImpl
from moe_ext.moe.comm.alltoall import AllToAllCommImpl
from moe_ext.moe.comm.base import (GROUP_LIST_COUNT, GROUP_LIST_CUMSUM, CombineMetadata, MoECommMethod, PermuteResult,
                                   Prepared, PrepareMetadata)
from moe_ext.moe.comm.dummy import DummyCommImpl
from moe_ext.moe.comm.mc2 import MC2CommImpl
from moe_ext.moe.comm.native_allgather import NativeAllGatherCommImpl

__all__ = ["AllGatherCommImpl", "AllToAllCommImpl", "CombineMetadata", "DummyCommImpl", "GROUP_LIST_COUNT",
           "GROUP_LIST_CUMSUM", "MC2CommImpl", "MoECommMethod", "NativeAllGatherCommImpl", "PermuteResult", "Prepared",
           "PrepareMetadata"]
