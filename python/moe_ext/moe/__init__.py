"""Expert-parallel MoE: config, forward context, communication methods, the layer.

See docs/moe_layer.md. Everything is passed explicitly (a :class:`MoEConfig`
per layer, a :class:`ForwardContext` per forward); there are no module globals.
"""

from moe_ext.moe.comm import (AllGatherCommImpl, AllToAllCommImpl, CombineMetadata, DummyCommImpl, MC2CommImpl, MoECommMethod,
                              NativeAllGatherCommImpl, PermuteResult)
from moe_ext.moe.config import CommGroup, MoEConfig, make_moe_groups
from moe_ext.moe.context import ForwardContext, build_forward_context
from moe_ext.moe.experts import run_local_experts
from moe_ext.moe.experts import ExpertActivation
from moe_ext.moe.layer import MoELayer, load_recording_disabled, logical_to_physical_table
from moe_ext.moe.select import COMM_METHODS, make_comm_method, select_comm_method
from moe_ext.moe.topk import select_experts

__all__ = ["AllGatherCommImpl", "AllToAllCommImpl", "COMM_METHODS", "CombineMetadata", "CommGroup", "DummyCommImpl", "ExpertActivation", "ForwardContext",
           "MC2CommImpl", "MoECommMethod", "MoEConfig", "MoELayer", "NativeAllGatherCommImpl", "PermuteResult",
           "build_forward_context", "load_recording_disabled", "logical_to_physical_table", "make_comm_method", "make_moe_groups",
           "run_local_experts", "select_comm_method", "select_experts"]
