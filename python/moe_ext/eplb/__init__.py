"""Expert-parallel load balancing: placement planning and moving expert weights."""

from moe_ext.eplb.rearrange import (
    RearrangementHandle,
    rearrange_expert_weights_async,
    rearrange_expert_weights_inplace,
)
from moe_ext.eplb.transfer import LayerRankPlan, TransferPlan, plan_expert_transfer

__all__ = [
    "LayerRankPlan",
    "RearrangementHandle",
    "TransferPlan",
    "plan_expert_transfer",
    "rearrange_expert_weights_async",
    "rearrange_expert_weights_inplace",
]
