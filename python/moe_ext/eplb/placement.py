"""Expert placement: which physical slot holds which logical expert.

`rebalance_experts` keeps the contract of DeepSeek's public EPLB planner that
inference engines call, so it drops in; `plan_placement` adds what that planner
lacks: planning from the placement in force with few moves, a bound on moves,
and per-layer statistics. The algorithms are C++ (csrc/core/eplb/), reached
through moe_ext._native; this module only converts tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

__all__ = ["PlacementPlan", "rebalance_experts", "plan_placement", "placement_imbalance"]


def _native():
    from moe_ext import _native as native  # the pybind11 module over the core

    return native


def _as_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"eplb: {name} must be an int, got {value!r}")
    return int(value)


def _loads_to_numpy(weight) -> np.ndarray:
    """[layers, experts] loads of any real dtype and device -> float64 numpy (host)."""
    if isinstance(weight, np.ndarray):
        weight = torch.from_numpy(weight)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"eplb: weight must be a torch.Tensor or numpy array, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"eplb: weight must be 2-D [layers, logical experts], got shape {tuple(weight.shape)}")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise ValueError(f"eplb: weight must have a real dtype, got {weight.dtype}")
    return weight.detach().to(device="cpu", dtype=torch.float64).contiguous().numpy()


def _current_to_numpy(current, layers: int, num_replicas: int) -> np.ndarray:
    if isinstance(current, np.ndarray):
        current = torch.from_numpy(current)
    if not isinstance(current, torch.Tensor):
        raise ValueError(f"eplb: current must be a torch.Tensor, got {type(current).__name__}")
    if current.dtype.is_floating_point or current.is_complex() or current.dtype == torch.bool:
        raise ValueError(f"eplb: current must be an integer tensor (phy2log), got {current.dtype}")
    if tuple(current.shape) != (layers, num_replicas):
        raise ValueError(f"eplb: current must have shape [{layers}, {num_replicas}] (layers, num_replicas), "
                         f"got {tuple(current.shape)}")
    return current.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    """A placement and how good it is, per layer.

    phy2log [layers, num_replicas], log2phy [layers, logical, num_replicas - logical + 1]
    (-1 padded), logcnt [layers, logical]: int64 CPU tensors, the public contract.
    imbalance: max GPU load / mean GPU load; lower_bound: max(1, best achievable largest
    per-replica load / mean GPU load); moves: slots whose expert differs from `current`;
    cross_node_replicas / hierarchy_relaxed: replicas placed outside their group's node
    because the node could not be balanced on its own; same_gpu_duplicates: replicas
    sharing a GPU with a twin (0 unless unavoidable).
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    imbalance: torch.Tensor
    lower_bound: torch.Tensor
    moves: torch.Tensor
    cross_node_replicas: torch.Tensor
    same_gpu_duplicates: torch.Tensor
    hierarchy_relaxed: torch.Tensor
    hierarchical: bool

    def summary(self) -> dict:
        """Scalars for logs: mean/worst imbalance, lower bound, total moves."""
        return {
            "imbalance_mean": float(self.imbalance.mean()) if self.imbalance.numel() else 1.0,
            "imbalance_worst": float(self.imbalance.max()) if self.imbalance.numel() else 1.0,
            "lower_bound_worst": float(self.lower_bound.max()) if self.lower_bound.numel() else 1.0,
            "moves": int(self.moves.sum()),
            "relaxed_layers": int(self.hierarchy_relaxed.sum()),
            "cross_node_replicas": int(self.cross_node_replicas.sum()),
        }


def plan_placement(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *,
                   current: Optional[torch.Tensor] = None, max_moves: Optional[int] = None,
                   tolerance: float = 0.02, allow_cross_node: bool = True, relax_threshold: float = 0.02,
                   num_threads: int = 1, refine_counts: bool = True) -> PlacementPlan:
    """Plan expert placement for every layer.

    Args:
        weight: [layers, logical experts] loads (any real dtype, any device).
        num_replicas: physical slots per layer; slot p lives on GPU p // (num_replicas // num_gpus).
        num_groups, num_nodes, num_gpus: hierarchical mode when num_groups % num_nodes == 0
            (groups -> nodes, replicas stay in their node unless the node cannot be balanced
            and allow_cross_node), global mode otherwise.
        current: [layers, num_replicas] phy2log in force now; the plan then keeps what it can and
            stops moving once within (1 + tolerance) of the from-scratch imbalance.
        max_moves: most slots per layer whose expert may change (needs current); never exceeded.
        relax_threshold: relax a hierarchical layer when node-confined imbalance exceeds
            lower_bound * (1 + relax_threshold) and relaxing helps.
        num_threads: threads over layers (0: all cores); the plan does not depend on it.
        refine_counts: also change replica counts (move a replica from an expert that can spare
            it to one on the hottest GPU) and re-pack; better balance with few slots per GPU,
            about 3x the planning time. False: greedy counts only (the faster planner).
    """
    loads = _loads_to_numpy(weight)
    layers = loads.shape[0]
    num_replicas = _as_int("num_replicas", num_replicas)
    num_groups = _as_int("num_groups", num_groups)
    num_nodes = _as_int("num_nodes", num_nodes)
    num_gpus = _as_int("num_gpus", num_gpus)
    num_threads = _as_int("num_threads", num_threads)
    current_np = None if current is None else _current_to_numpy(current, layers, num_replicas)
    if max_moves is not None:
        max_moves = _as_int("max_moves", max_moves)
        if max_moves < 0:
            raise ValueError(f"eplb: max_moves must be >= 0, got {max_moves}")
        if current is None:
            raise ValueError("eplb: max_moves needs current (the placement the moves are counted from)")
    out = _native().eplb_plan(loads, num_replicas, num_groups, num_nodes, num_gpus, current=current_np,
                              max_moves=-1 if max_moves is None else max_moves,
                              allow_cross_node=bool(allow_cross_node), relax_threshold=float(relax_threshold),
                              tolerance=float(tolerance), num_threads=num_threads,
                              refine_counts=bool(refine_counts))
    as_tensor = {key: torch.from_numpy(value) for key, value in out.items()}
    return PlacementPlan(
        phy2log=as_tensor["phy2log"], log2phy=as_tensor["log2phy"], logcnt=as_tensor["logcnt"],
        imbalance=as_tensor["imbalance"], lower_bound=as_tensor["lower_bound"], moves=as_tensor["moves"],
        cross_node_replicas=as_tensor["cross_node_replicas"],
        same_gpu_duplicates=as_tensor["same_gpu_duplicates"],
        hierarchy_relaxed=as_tensor["hierarchy_relaxed"].to(torch.bool),
        hierarchical=num_groups % num_nodes == 0 if num_nodes > 0 else False)


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for the public EPLB `rebalance_experts`: (phy2log, log2phy, logcnt), int64 on CPU.

    phy2log [layers, num_replicas]; log2phy [layers, logical, num_replicas - logical + 1], -1 padded,
    each expert's slots in increasing order; logcnt [layers, logical].
    """
    plan = plan_placement(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return plan.phy2log, plan.log2phy, plan.logcnt


def placement_imbalance(weight, phy2log, num_gpus: int) -> torch.Tensor:
    """Per-layer max GPU load / mean GPU load of any placement (float64 [layers])."""
    loads = _loads_to_numpy(weight)
    placement = _current_to_numpy(phy2log, loads.shape[0], int(getattr(phy2log, "shape")[1]))
    return torch.from_numpy(_native().eplb_imbalance(loads, placement, _as_int("num_gpus", num_gpus)))
