"""Expert-parallel load balancing: load recording, placement planning, weight rearrangement."""

from moe_ext.eplb.load_recorder import LoadRecorder
from moe_ext.eplb.placement import PlacementPlan, placement_imbalance, plan_placement, rebalance_experts

__all__ = ["LoadRecorder", "PlacementPlan", "placement_imbalance", "plan_placement", "rebalance_experts"]
