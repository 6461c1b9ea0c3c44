"""Expert-parallel load balancing: load recording, placement planning, weight rearrangement."""

from moe_ext.eplb.load_recorder import LoadRecorder
from moe_ext.eplb.placement import PlacementPlan, placement_imbalance, plan_placement, rebalance_experts
from moe_ext.eplb.rearrange import (
    RearrangementError,
    RearrangementHandle,
    rearrange_expert_weights_async,
    rearrange_expert_weights_inplace,
)
from moe_ext.eplb.transfer import LayerRankPlan, TransferPlan, plan_expert_transfer

__all__ = ["LoadRecorder", "PlacementPlan", "placement_imbalance", "plan_placement", "rebalance_experts",
           "LayerRankPlan", "RearrangementError", "RearrangementHandle", "TransferPlan", "plan_expert_transfer",
           "rearrange_expert_weights_async", "rearrange_expert_weights_inplace"]
