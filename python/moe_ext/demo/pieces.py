"""The seams between the demo and moe_ext: one function per piece, real module when it is built.

Each function uses the real moe_ext module when it can be imported and falls
back to a marked stand-in (moe_ext.demo.standins) otherwise; :func:`describe`
says which was used, and the demo prints it and puts it in its JSON.

- parallel state  -> moe_ext.distributed (ParallelConfig, init_parallel_state)
- MoE layer       -> moe_ext.moe.MoELayer (routing ops, comm methods, experts)
- rearrangement   -> moe_ext.eplb.rearrange_expert_weights_inplace
- dense reference -> moe_ext.testing.dense_moe
- planning, load recording -> moe_ext.eplb (always real)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from moe_ext.demo import standins
from moe_ext.demo.config import DemoConfig
from moe_ext.demo.model import LogicalWeights, routing_options

__all__ = ["describe", "EPGroups", "make_ep_groups", "build_layer", "rearrange_weights", "dense_reference"]


def _module_attr(module: str, name: str) -> Optional[Any]:
    """``module.name`` when the module imports and has it, else None (a piece not built here)."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def describe() -> dict[str, str]:
    """Which implementation each piece uses in this build."""
    def pick(real: bool, module: str) -> str:
        return module if real else "stand-in (moe_ext.demo.standins)"

    return {
        "parallel_state": pick(_module_attr("moe_ext.distributed", "init_parallel_state") is not None,
                               "moe_ext.distributed"),
        "moe_layer": pick(_module_attr("moe_ext.moe", "MoELayer") is not None, "moe_ext.moe.MoELayer"),
        "routing_ops": pick(_module_attr("moe_ext.ops", "moe_permute") is not None,
                            "moe_ext.ops.moe_permute/moe_unpermute"),
        "rearrangement": pick(_module_attr("moe_ext.eplb", "rearrange_expert_weights_inplace") is not None,
                              "moe_ext.eplb.rearrange_expert_weights_inplace"),
        "dense_reference": pick(_module_attr("moe_ext.testing.dense_moe", "dense_moe") is not None,
                                "moe_ext.testing.dense_moe"),
        "planner": "moe_ext.eplb.plan_placement",
        "load_recorder": "moe_ext.eplb.LoadRecorder",
    }


# ------------------------------------------------------------------ parallel state


@dataclass
class EPGroups:
    """The groups the demo uses; all span every rank (expert parallelism over the world)."""

    ep: Any  # ParallelGroup or process group: token dispatch / combine (the MC2 family)
    eplb: Any  # ParallelGroup or process group: load all-reduce and weight movement (dynamic EPLB)
    tp: Any  # tensor-parallel group (one rank)

    @staticmethod
    def process_group(group: Any):
        return getattr(group, "device_group", group)


def make_ep_groups(world_size: int) -> EPGroups:
    init_parallel_state = _module_attr("moe_ext.distributed", "init_parallel_state")
    if init_parallel_state is None:  # STAND-IN: the default group for everything
        import torch.distributed as dist

        return EPGroups(ep=dist.group.WORLD, eplb=dist.group.WORLD, tp=None)
    from moe_ext.distributed import ParallelConfig, get_dynamic_eplb_group, get_mc2_group, get_tp_group

    init_parallel_state(ParallelConfig(world_size=world_size, tensor_parallel_size=1,
                                       data_parallel_size=world_size, dynamic_eplb=True), cpu_groups=False)
    return EPGroups(ep=get_mc2_group(), eplb=get_dynamic_eplb_group(), tp=get_tp_group())


def destroy_ep_groups() -> None:
    destroy = _module_attr("moe_ext.distributed", "destroy_parallel_state")
    if destroy is not None:
        destroy()


# ----------------------------------------------------------------------- MoE layer


class _RealLayer:
    """moe_ext.moe.MoELayer behind the demo's narrow interface."""

    def __init__(self, layer):
        self.layer = layer

    @property
    def last_expert_load(self) -> torch.Tensor:
        return self.layer.last_expert_load

    @property
    def last_comm_method(self) -> str:
        return self.layer.last_comm_method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.layer(x)

    def expert_weight_tensors(self) -> list[torch.Tensor]:
        return [self.layer.w13.data, self.layer.w2.data]

    def set_placement(self, placement: torch.Tensor) -> None:
        from moe_ext.moe import logical_to_physical_table

        table, replicas = logical_to_physical_table(placement, self.layer.config.num_experts)
        device = self.layer.w13.device
        self.layer.placement = placement.to(device=device, dtype=torch.int64)
        self.layer.logical_to_physical = table.to(device)
        self.layer.replica_count = replicas.to(device)

    def corrupt(self) -> None:
        self.layer.w2.data[0].add_(1.0)


class _StandInLayer(standins.StandInMoELayer):
    def corrupt(self) -> None:
        self.w2[0].add_(1.0)


def _npu_runtime(config: DemoConfig, device_type: str):
    """The NPU runtime the comm methods take: real on an NPU, the CPU emulation for a forced MC2."""
    if device_type == "npu":
        return _module_attr("moe_ext.platform.npu", "detect_npu_runtime")()
    if config.comm_method == "mc2":
        return _module_attr("moe_ext.testing.npu", "emulated_runtime")("A3")
    return None


def build_layer(config: DemoConfig, groups: EPGroups, placement: torch.Tensor, weights: LogicalWeights,
                rank: int, device: torch.device):
    """This rank's part of the expert-parallel layer, its slots filled from ``weights`` by ``placement``."""
    moe = importlib.import_module("moe_ext.moe") if _module_attr("moe_ext.moe", "MoELayer") else None
    first = rank * config.slots_per_rank
    local_experts = placement[first:first + config.slots_per_rank].to(weights.w13.device)
    if moe is None:
        if config.comm_method not in ("auto", "allgather"):
            raise ValueError(f"--comm-method {config.comm_method} needs moe_ext.moe, which this build lacks "
                             "(the stand-in layer only does allgather)")
        return _StandInLayer(num_experts=config.experts, top_k=config.top_k, placement=placement,
                             gate=weights.gate, w13_slots=weights.w13.index_select(0, local_experts).clone(),
                             w2_slots=weights.w2.index_select(0, local_experts).clone(), rank=rank,
                             world_size=config.ranks, group=EPGroups.process_group(groups.ep),
                             routing=routing_options(config))
    moe_config = moe.MoEConfig(num_experts=config.experts, top_k=config.top_k, hidden_size=config.hidden_size,
                               intermediate_size=config.intermediate_size,
                               num_physical_experts=config.num_physical_experts, dp_size=config.ranks, dp_rank=rank,
                               tp_size=1, tp_rank=0, ep_group=groups.ep, dp_group=groups.ep, tp_group=groups.tp,
                               mc2_group=groups.ep)
    options = routing_options(config)
    layer = moe.MoELayer(moe_config, scoring=options["scoring"], renormalize=options["renormalize"],
                         num_expert_group=options["num_expert_group"], topk_group=options["topk_group"],
                         routed_scaling_factor=options["routed_scaling_factor"], comm_method=config.comm_method,
                         npu=_npu_runtime(config, device.type), placement=placement, device=device)
    layer.requires_grad_(False)
    layer.load_logical_weights(weights.gate, weights.w13, weights.w2)
    return _RealLayer(layer)


# ------------------------------------------------------------------- rearrangement


def rearrange_weights(old_placement: torch.Tensor, new_placement: torch.Tensor, tensors: list[torch.Tensor],
                      groups: EPGroups, rank: int, world_size: int) -> int:
    """Move this rank's expert rows to ``new_placement`` (collective); returns rows that crossed ranks."""
    rearrange = _module_attr("moe_ext.eplb", "rearrange_expert_weights_inplace")
    group = EPGroups.process_group(groups.eplb)
    if rearrange is None:
        return standins.standin_rearrange(old_placement, new_placement, tensors, group, rank, world_size)
    plan = rearrange(old_placement.reshape(1, -1).cpu(), new_placement.reshape(1, -1).cpu(), [tensors],
                     ep_group=group)
    return int(plan.total_rows_moved)


# ----------------------------------------------------------------- dense reference


def dense_reference(config: DemoConfig, x: torch.Tensor, weights: LogicalWeights) -> torch.Tensor:
    """The layer's output for ``x`` computed densely in this process from the logical weights."""
    dense_moe = _module_attr("moe_ext.testing.dense_moe", "dense_moe") or standins.standin_dense_moe
    return dense_moe(x, weights.gate, weights.w13, weights.w2, config.top_k, **routing_options(config))
