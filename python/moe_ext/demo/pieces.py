"""The demo's seams to the rest of moe_ext: one function per piece.

- parallel state  -> moe_ext.distributed (ParallelConfig, init_parallel_state)
- MoE layer       -> moe_ext.moe.MoELayer (top-k, comm method, routing ops, experts)
- rearrangement   -> moe_ext.eplb.rearrange_expert_weights_inplace
- dense reference -> moe_ext.testing.dense_moe
- planning, load recording -> moe_ext.eplb.plan_placement, LoadRecorder (used in rank.py)

The demo was built while these pieces were landing, with stand-ins behind the
same functions; every piece is now the real module and :func:`describe` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_ext.demo.config import DemoConfig
from moe_ext.demo.model import LogicalWeights, routing_options

__all__ = ["describe", "DemoLayer", "EPGroups", "make_ep_groups", "destroy_ep_groups", "build_layer", "rearrange_weights",
           "dense_reference"]


def describe() -> dict[str, str]:
    """Which moe_ext module does each part of the demo's work."""
    from moe_ext.moe.routing import using_native_routing_ops

    return {
        "parallel_state": "moe_ext.distributed",
        "moe_layer": "moe_ext.moe.MoELayer",
        "routing_ops": ("moe_ext.ops.moe_permute/moe_unpermute" if using_native_routing_ops()
                        else "moe_ext.moe.routing plain-torch path (op library without the routing ops)"),
        "rearrangement": "moe_ext.eplb.rearrange_expert_weights_inplace",
        "dense_reference": "moe_ext.testing.dense_moe.dense_moe_batched (every token, vectorised)",
        "planner": "moe_ext.eplb.plan_placement",
        "load_recorder": "moe_ext.eplb.LoadRecorder",
    }


# ------------------------------------------------------------------ parallel state


@dataclass
class EPGroups:
    """The groups the demo uses; all span every rank (expert parallelism over the world)."""

    ep: Any  # ParallelGroup: token dispatch / combine (the MC2 family)
    eplb: Any  # ParallelGroup: load all-reduce and weight movement (the dynamic-EPLB family)
    tp: Any  # ParallelGroup: tensor parallel (one rank)

    @staticmethod
    def process_group(group: Any):
        return getattr(group, "device_group", group)


def make_ep_groups(world_size: int) -> EPGroups:
    from moe_ext.distributed import (ParallelConfig, get_dynamic_eplb_group, get_mc2_group, get_tp_group,
                                     init_parallel_state)

    init_parallel_state(ParallelConfig(world_size=world_size, tensor_parallel_size=1,
                                       data_parallel_size=world_size, dynamic_eplb=True), cpu_groups=False)
    return EPGroups(ep=get_mc2_group(), eplb=get_dynamic_eplb_group(), tp=get_tp_group())


def destroy_ep_groups() -> None:
    from moe_ext.distributed import destroy_parallel_state

    destroy_parallel_state()


# ----------------------------------------------------------------------- MoE layer


class DemoLayer:
    """moe_ext.moe.MoELayer behind the demo's narrow interface (forward, loads, weights, placement)."""

    def __init__(self, layer):
        self.layer = layer

    @property
    def last_expert_load(self) -> torch.Tensor:
        return self.layer.last_slot_load  # per physical slot: rank.py folds it and measures the rank imbalance

    @property
    def last_comm_method(self) -> str:
        return self.layer.last_comm_method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # in the layer's dtype (bf16 for MC2), the output back in x's
            return self.layer(x.to(self.layer.config.dtype)).to(x.dtype)

    def expert_weight_tensors(self) -> list[torch.Tensor]:
        return self.layer.expert_weights()

    def set_placement(self, placement: torch.Tensor) -> None:
        """Route by ``placement`` from now on (the weights must already be where it says)."""
        self.layer.set_placement(placement, move_weights=False)

    def corrupt(self) -> None:
        self.layer.w2.data.add_(1.0)  # every local slot: whichever is used, the output is wrong


def _npu_runtime(config: DemoConfig, device_type: str):
    """The NPU runtime the comm methods take: real on an NPU, the CPU emulation for a forced MC2."""
    if device_type == "npu":
        from moe_ext.platform.npu import detect_npu_runtime

        return detect_npu_runtime()
    if config.comm_method == "mc2":  # MC2 off Ascend: the CPU emulation of the torch_npu ops (A2 limits)
        from moe_ext.testing.npu import emulated_runtime

        return emulated_runtime("A2")
    return None


def build_layer(config: DemoConfig, groups: EPGroups, placement: torch.Tensor, weights: LogicalWeights,
                rank: int, device: torch.device):
    """This rank's part of the expert-parallel layer, its slots filled from ``weights`` by ``placement``."""
    from moe_ext import moe

    moe_config = moe.MoEConfig(num_experts=config.experts, top_k=config.top_k, hidden_size=config.hidden_size,
                               intermediate_size=config.intermediate_size,
                               num_physical_experts=config.num_physical_experts, dp_size=config.ranks, dp_rank=rank,
                               tp_size=1, tp_rank=0, ep_group=groups.ep, dp_group=groups.ep, tp_group=groups.tp,
                               mc2_group=groups.ep,
                               # the MC2 operators move bf16/fp16 only (torch_npu docs): an MC2 layer is bf16
                               dtype=torch.bfloat16 if config.comm_method == "mc2" else torch.float32)
    options = routing_options(config)
    layer = moe.MoELayer(moe_config, scoring=options["scoring"], renormalize=options["renormalize"],
                         num_expert_group=options["num_expert_group"], topk_group=options["topk_group"],
                         group_score=options["group_score"],
                         routed_scaling_factor=options["routed_scaling_factor"], comm_method=config.comm_method,
                         npu=_npu_runtime(config, device.type), placement=placement, device=device)
    layer.requires_grad_(False)
    layer.load_logical_weights(weights.gate, weights.w13, weights.w2)
    return DemoLayer(layer)


# ------------------------------------------------------------------- rearrangement


def rearrange_weights(old_placement: torch.Tensor, new_placement: torch.Tensor, tensors: list[torch.Tensor],
                      groups: EPGroups) -> int:
    """Move this rank's expert rows to ``new_placement`` (collective); returns rows that crossed ranks."""
    from moe_ext.eplb import rearrange_expert_weights_inplace

    plan = rearrange_expert_weights_inplace(old_placement.reshape(1, -1).cpu(), new_placement.reshape(1, -1).cpu(),
                                            [tensors], ep_group=EPGroups.process_group(groups.eplb))
    return int(plan.total_rows_moved)


# ----------------------------------------------------------------- dense reference


def dense_reference(config: DemoConfig, x: torch.Tensor, weights: LogicalWeights) -> torch.Tensor:
    """The layer's output for ``x`` computed densely in this process from the logical weights."""
    from moe_ext.testing.dense_moe import dense_moe_batched

    w13, w2 = weights.w13, weights.w2
    if config.comm_method == "mc2":  # the layer's inputs and expert weights are bf16 (see build_layer)
        x, w13, w2 = (t.to(torch.bfloat16).float() for t in (x, w13, w2))
    return dense_moe_batched(x, weights.gate, w13, w2, config.top_k, **routing_options(config))
