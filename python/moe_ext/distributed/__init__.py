"""Parallel state without an engine: group layouts and a group registry.

- :class:`ParallelConfig` — the parallel sizes and switches, validated on
  construction (``ValueError`` naming the fields for impossible combinations);
- :func:`group_layouts` — pure Python: the rank lists of every group of every
  family the config turns on (no torch.distributed needed);
- :func:`init_parallel_state` / :func:`destroy_parallel_state` /
  :func:`is_initialized` and the getters — the groups on an initialised
  ``torch.distributed`` (gloo, nccl, hccl), each a :class:`ParallelGroup`
  with the collectives the layers use.

See docs/parallel_state.md for the families and a worked example.
"""

from moe_ext.distributed.config import ParallelConfig
from moe_ext.distributed.layouts import FAMILIES, group_layouts
from moe_ext.distributed.group import ParallelGroup
from moe_ext.distributed.state import (
    destroy_parallel_state,
    get_dynamic_eplb_group,
    get_embed_tp_group,
    get_fc3_quant_x_group,
    get_flashcomm2_odp_group,
    get_flashcomm2_otp_group,
    get_group,
    get_lmhead_tp_group,
    get_mc2_group,
    get_mlp_tp_group,
    get_otp_group,
    get_p_tp_group,
    get_parallel_config,
    get_shard_weight_group,
    get_tp_group,
    has_group,
    init_parallel_state,
    is_initialized,
)

__all__ = [
    "FAMILIES",
    "ParallelConfig",
    "ParallelGroup",
    "group_layouts",
    "init_parallel_state",
    "destroy_parallel_state",
    "is_initialized",
    "get_parallel_config",
    "get_group",
    "has_group",
    "get_tp_group",
    "get_mc2_group",
    "get_dynamic_eplb_group",
    "get_otp_group",
    "get_lmhead_tp_group",
    "get_embed_tp_group",
    "get_mlp_tp_group",
    "get_flashcomm2_otp_group",
    "get_flashcomm2_odp_group",
    "get_shard_weight_group",
    "get_p_tp_group",
    "get_fc3_quant_x_group",
]
