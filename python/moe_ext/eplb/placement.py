"""Expert placement: which physical slot holds which logical expert.

`rebalance_experts` keeps the contract of DeepSeek's public EPLB planner that
inference engines call, so it drops in — including its hierarchy guarantee:
when num_groups % num_nodes == 0 every replica stays on its group's node.
`plan_placement` adds what that planner lacks: planning from the placement in
force with few moves (never worse than keeping it), a bound on moves, planning
for a load history, and per-layer statistics (bounds, what relaxing the
hierarchy would gain, twins). The algorithms are C++ (csrc/core/eplb/), reached
through moe_ext._native; this module converts tensors and checks arguments.

Errors: a wrong type raises TypeError; a bad value raises
:class:`moe_ext.errors.ArgumentError` (a ValueError and an AssertionError,
as the public implementations assert).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import numpy as np
import torch

from moe_ext.errors import ArgumentError, check_bool, check_int

__all__ = ["PlacementPlan", "rebalance_experts", "plan_placement", "placement_imbalance"]


def _native():
    from moe_ext import _native as native  # the pybind11 module over the core

    return native


def _call_native(function, *args, **kwargs):
    """The core raises ValueError (std::invalid_argument) for bad values: make it the package's class."""
    try:
        return function(*args, **kwargs)
    except ArgumentError:
        raise
    except ValueError as error:
        raise ArgumentError(str(error)) from None


def _as_int(name: str, value, minimum: Optional[int] = None) -> int:
    return check_int(f"eplb: {name}", value, minimum=minimum)


def _as_float(name: str, value, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"eplb: {name} must be a float, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not np.isfinite(value) or value < minimum:
        raise ArgumentError(f"eplb: {name} must be finite and >= {minimum}, got {value}")
    return value


def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"eplb: {name} must be a numeric array, got dtype object")
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"eplb: {name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    return value


def _loads_to_numpy(weight, name: str = "weight", dims: tuple = (2,)) -> np.ndarray:
    """Loads of any real dtype and device -> float64 numpy (host), finite and >= 0."""
    weight = _as_tensor(name, weight)
    if weight.dim() not in dims:
        expected = " or ".join({2: "2-D [layers, logical experts]",
                                3: "3-D [windows, layers, logical experts]"}[d] for d in dims)
        raise ArgumentError(f"eplb: {name} must be {expected}, got shape {tuple(weight.shape)}")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise TypeError(f"eplb: {name} must have a real (integer or floating) dtype, got {weight.dtype}")
    loads = weight.detach().to(device="cpu", dtype=torch.float64).contiguous().numpy()
    if loads.size:
        bad = ~np.isfinite(loads) | (loads < 0)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ArgumentError(f"eplb: {name} must be finite and >= 0 (float64), got {loads[index]} at index "
                                f"{list(index)}")
    return loads


def _current_to_numpy(current, layers: int, num_replicas: int, name: str = "current") -> np.ndarray:
    current = _as_tensor(name, current)
    if current.dtype.is_floating_point or current.is_complex() or current.dtype == torch.bool:
        raise TypeError(f"eplb: {name} must be an integer tensor (phy2log), got {current.dtype}")
    if tuple(current.shape) != (layers, num_replicas):
        raise ArgumentError(f"eplb: {name} must have shape [{layers}, {num_replicas}] (layers, num_replicas), "
                            f"got {tuple(current.shape)}")
    return current.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    """A placement and how good it is, per layer.

    phy2log [layers, num_replicas], log2phy [layers, logical, num_replicas - logical + 1]
    (-1 padded), logcnt [layers, logical]: int64 CPU tensors, the public contract.
    Per layer (float64 or int64 [layers]):

    - imbalance: max GPU load / mean GPU load (for a history: the weighted mean over windows);
    - lower_bound: no placement of the mode kept does better. Strict hierarchy: the node-level
      bound (each node's load over its GPUs, and the largest per-GPU share of one of its experts,
      for the group-to-node assignment used); otherwise = global_lower_bound;
    - global_lower_bound: no placement at all does better (hierarchy ignored);
    - relaxed_imbalance: the best imbalance found with the hierarchy relaxed (= imbalance when
      relaxing does not help or is not evaluated); ``relax_gain`` is the relative reduction
      1 - relaxed / imbalance, in [0, 1) (0.05: the hottest GPU would carry 5% less);
    - moves: slots whose expert differs from ``current`` (0 without current);
    - cross_node_replicas / hierarchy_relaxed: replicas outside their group's node (only with
      allow_cross_node=True, or kept from ``current``);
    - same_gpu_duplicates: replicas sharing a GPU with a twin (0 unless the slot arithmetic
      forces it: a domain's experts x its GPUs < its slots, or kept from ``current``).

    History plans also carry window_imbalance [windows, layers] and worst_window_imbalance [layers].
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
    global_lower_bound: Optional[torch.Tensor] = None
    relaxed_imbalance: Optional[torch.Tensor] = None
    window_imbalance: Optional[torch.Tensor] = None
    worst_window_imbalance: Optional[torch.Tensor] = None

    @property
    def relax_gain(self) -> torch.Tensor:
        """Per layer, the relative reduction of the imbalance with the hierarchy relaxed:
        1 - relaxed_imbalance / imbalance, float64 [layers] in [0, 1) (0.05: 5% lower, i.e. the
        hottest GPU would carry 5% less at the same total load). The same measure as
        ``relax_threshold``."""
        if self.relaxed_imbalance is None:
            return torch.zeros_like(self.imbalance)
        return (1.0 - self.relaxed_imbalance / self.imbalance).clamp_min(0.0)

    def summary(self) -> dict:
        """Scalars for logs: mean/worst imbalance, lower bound, total moves, relaxing gain."""
        empty = self.imbalance.numel() == 0
        out = {
            "imbalance_mean": 1.0 if empty else float(self.imbalance.mean()),
            "imbalance_worst": 1.0 if empty else float(self.imbalance.max()),
            "lower_bound_worst": 1.0 if empty else float(self.lower_bound.max()),
            "moves": int(self.moves.sum()),
            "relaxed_layers": int(self.hierarchy_relaxed.sum()),
            "cross_node_replicas": int(self.cross_node_replicas.sum()),
            "twins": int(self.same_gpu_duplicates.sum()),
            "relax_gain_worst": 0.0 if empty else float(self.relax_gain.max()),
        }
        if self.worst_window_imbalance is not None and not empty:
            out["worst_window_imbalance"] = float(self.worst_window_imbalance.max())
        return out


def _history_planning_loads(history: np.ndarray, window_weights: np.ndarray) -> np.ndarray:
    """[windows, layers, experts] -> [layers, experts]: the weighted mean of each window's load shares.

    Each window-layer is divided by its total first, so a busy window does not drown a quiet
    one: the imbalance of a window does not depend on its volume, and it is the per-window
    imbalances that are averaged.
    """
    totals = history.sum(axis=2, keepdims=True)
    shares = np.divide(history, totals, out=np.zeros_like(history), where=totals > 0)
    return np.tensordot(window_weights, shares, axes=(0, 0))


def _window_weights(window_weights, windows: int) -> np.ndarray:
    if window_weights is None:
        return np.full(windows, 1.0 / windows)
    if isinstance(window_weights, (list, tuple)):
        window_weights = torch.tensor(window_weights, dtype=torch.float64)
    values = _loads_to_numpy(_as_tensor("window_weights", window_weights).reshape(1, -1), "window_weights")[0]
    if values.shape != (windows,):
        raise ArgumentError(f"eplb: window_weights must have {windows} entries (one per window), got {values.shape[0]}")
    if not values.sum() > 0:
        raise ArgumentError("eplb: window_weights must not all be 0")
    return values / values.sum()


def plan_placement(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *,
                   current: Optional[torch.Tensor] = None, max_moves: Optional[int] = None,
                   tolerance: float = 0.02, allow_cross_node: bool = False, relax_threshold: float = 0.02,
                   num_threads: int = 1, refine_counts: bool = True, evaluate_relaxed: bool = True,
                   window_weights=None) -> PlacementPlan:
    """Plan expert placement for every layer.

    Args:
        weight: loads, any real dtype, any device, finite and >= 0 (any magnitude: loads are scaled
            per layer). [layers, logical experts] plans for that snapshot; [windows, layers, logical
            experts] plans for a load history: it minimises (approximately: best of a few
            candidates) the weighted mean over windows of each window's imbalance, and reports it
            as ``imbalance``, with window_imbalance and worst_window_imbalance.
        num_replicas: physical slots per layer; slot p lives on GPU p // (num_replicas // num_gpus).
        num_groups, num_nodes, num_gpus: hierarchical mode when num_groups % num_nodes == 0
            (groups -> nodes, every replica on its group's node unless allow_cross_node), global
            mode otherwise (num_nodes is then ignored, as in the public algorithm).
        current: [layers, num_replicas] phy2log in force now; the plan then keeps what it can, stops
            moving once within (1 + tolerance) of the from-scratch imbalance, and is never worse
            than current under the same loads (current itself, 0 moves, is a candidate).
        max_moves: most slots per layer whose expert may change (needs current); never exceeded.
        allow_cross_node: hierarchical mode: let redundant replicas leave their node in layers where
            that lowers the imbalance by more than relax_threshold. Off (default): the public
            guarantee is kept; ``relaxed_imbalance`` still says what relaxing would give.
        num_threads: threads over layers (0: all cores); the plan does not depend on it.
        refine_counts: also change replica counts and re-pack (better with few slots per GPU).
        evaluate_relaxed: plan the relaxed alternative of strict layers to report it (costs time).
        window_weights: [windows] weights of a history (default equal), e.g. recent windows higher.

    Raises:
        TypeError for wrong types; moe_ext.errors.ArgumentError for bad values, naming the argument.
    """
    if isinstance(weight, (np.ndarray, torch.Tensor)) and weight.ndim == 3:
        return _plan_history(weight, num_replicas, num_groups, num_nodes, num_gpus, current=current,
                             max_moves=max_moves, tolerance=tolerance, allow_cross_node=allow_cross_node,
                             relax_threshold=relax_threshold, num_threads=num_threads,
                             refine_counts=refine_counts, evaluate_relaxed=evaluate_relaxed,
                             window_weights=window_weights)
    if window_weights is not None:
        raise ArgumentError("eplb: window_weights needs a load history weight [windows, layers, experts]")
    loads = _loads_to_numpy(weight)
    return _plan_point(loads, num_replicas, num_groups, num_nodes, num_gpus, current=current,
                       max_moves=max_moves, tolerance=tolerance, allow_cross_node=allow_cross_node,
                       relax_threshold=relax_threshold, num_threads=num_threads, refine_counts=refine_counts,
                       evaluate_relaxed=evaluate_relaxed)


def _plan_point(loads: np.ndarray, num_replicas, num_groups, num_nodes, num_gpus, *, current, max_moves,
                tolerance, allow_cross_node, relax_threshold, num_threads, refine_counts,
                evaluate_relaxed) -> PlacementPlan:
    layers = loads.shape[0]
    num_replicas = _as_int("num_replicas", num_replicas)
    num_groups = _as_int("num_groups", num_groups)
    num_nodes = _as_int("num_nodes", num_nodes)
    num_gpus = _as_int("num_gpus", num_gpus)
    num_threads = _as_int("num_threads", num_threads, minimum=0)
    tolerance = _as_float("tolerance", tolerance)
    relax_threshold = _as_float("relax_threshold", relax_threshold)
    allow_cross_node = check_bool("eplb: allow_cross_node", allow_cross_node)
    refine_counts = check_bool("eplb: refine_counts", refine_counts)
    evaluate_relaxed = check_bool("eplb: evaluate_relaxed", evaluate_relaxed)
    current_np = None if current is None else _current_to_numpy(current, layers, num_replicas)
    if max_moves is not None:
        max_moves = _as_int("max_moves", max_moves, minimum=0)
        if current is None:
            raise ArgumentError("eplb: max_moves needs current (the placement the moves are counted from)")
    out = _call_native(_native().eplb_plan, loads, num_replicas, num_groups, num_nodes, num_gpus,
                       current=current_np, max_moves=-1 if max_moves is None else max_moves,
                       allow_cross_node=allow_cross_node, relax_threshold=relax_threshold,
                       tolerance=tolerance, num_threads=num_threads, refine_counts=refine_counts,
                       evaluate_relaxed=evaluate_relaxed)
    as_tensor = {key: torch.from_numpy(value) for key, value in out.items()}
    return PlacementPlan(
        phy2log=as_tensor["phy2log"], log2phy=as_tensor["log2phy"], logcnt=as_tensor["logcnt"],
        imbalance=as_tensor["imbalance"], lower_bound=as_tensor["lower_bound"], moves=as_tensor["moves"],
        cross_node_replicas=as_tensor["cross_node_replicas"],
        same_gpu_duplicates=as_tensor["same_gpu_duplicates"],
        hierarchy_relaxed=as_tensor["hierarchy_relaxed"].to(torch.bool),
        hierarchical=num_groups % num_nodes == 0 if num_nodes > 0 else False,
        global_lower_bound=as_tensor["global_lower_bound"], relaxed_imbalance=as_tensor["relaxed_imbalance"])


def _plan_history(weight, num_replicas, num_groups, num_nodes, num_gpus, *, current, max_moves, tolerance,
                  allow_cross_node, relax_threshold, num_threads, refine_counts, evaluate_relaxed,
                  window_weights) -> PlacementPlan:
    """Best of a few candidate plans by the weighted mean of per-window imbalance.

    Candidates: the plan for the weighted mean of per-window load shares (each window counts by
    its weight, not its volume), the plan for the summed loads, and the plan for the last window
    alone; with ``current``, each is planned from it (so each is never worse than current on its
    own loads) and current itself is a candidate, so the result is never worse than current on
    the history objective either.
    """
    history = _loads_to_numpy(weight, dims=(3,))
    windows, layers, _ = history.shape
    if windows < 1:
        raise ArgumentError("eplb: a load history needs >= 1 window, got 0")
    weights = _window_weights(window_weights, windows)
    candidates_loads = [_history_planning_loads(history, weights), history.sum(axis=0), history[-1]]
    kwargs = dict(current=current, max_moves=max_moves, tolerance=tolerance, allow_cross_node=allow_cross_node,
                  relax_threshold=relax_threshold, num_threads=num_threads, refine_counts=refine_counts,
                  evaluate_relaxed=evaluate_relaxed)
    plans = [_plan_point(np.ascontiguousarray(loads), num_replicas, num_groups, num_nodes, num_gpus, **kwargs)
             for loads in candidates_loads]

    def per_window(phy2log: torch.Tensor) -> np.ndarray:  # [windows, layers]
        placement = phy2log.numpy()
        return np.stack([_call_native(_native().eplb_imbalance, history[w], placement, num_gpus)
                         for w in range(windows)])

    if current is not None:
        try:  # current itself: the plan from it with no move has its statistics
            plans.append(_plan_point(np.ascontiguousarray(candidates_loads[0]), num_replicas, num_groups, num_nodes,
                                     num_gpus, **{**kwargs, "max_moves": 0}))
        except ArgumentError:
            pass  # current lacks an expert: not a placement one can keep
    scored = [per_window(plan.phy2log) for plan in plans]  # [windows, layers] each
    objective = np.stack([np.tensordot(weights, window, axes=(0, 0)) for window in scored])  # [plans, layers]
    choice = np.argmin(objective, axis=0)  # per layer; ties: the first candidate
    fields = {}
    for name in ("phy2log", "log2phy", "logcnt", "lower_bound", "moves", "cross_node_replicas",
                 "same_gpu_duplicates", "hierarchy_relaxed", "global_lower_bound", "relaxed_imbalance"):
        stacked = torch.stack([getattr(plan, name) for plan in plans])  # [plans, layers, ...]
        fields[name] = stacked[torch.from_numpy(choice), torch.arange(layers)]
    window_imbalance = np.stack(scored)[choice, :, np.arange(layers)].T  # [windows, layers]
    mean_imbalance = objective[choice, np.arange(layers)]
    return PlacementPlan(
        imbalance=torch.from_numpy(np.ascontiguousarray(mean_imbalance)), hierarchical=plans[0].hierarchical,
        window_imbalance=torch.from_numpy(np.ascontiguousarray(window_imbalance)),
        worst_window_imbalance=torch.from_numpy(window_imbalance.max(axis=0) if layers else np.zeros(0)),
        **fields)


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for the public EPLB `rebalance_experts`: (phy2log, log2phy, logcnt), int64 on CPU.

    phy2log [layers, num_replicas]; log2phy [layers, logical, num_replicas - logical + 1], -1 padded,
    each expert's slots in increasing order; logcnt [layers, logical]. Hierarchical mode
    (num_groups % num_nodes == 0) keeps every replica on its group's node, always, as the public
    contract promises; global mode ignores num_nodes.
    """
    plan = plan_placement(weight, num_replicas, num_groups, num_nodes, num_gpus, allow_cross_node=False,
                          evaluate_relaxed=False)
    return plan.phy2log, plan.log2phy, plan.logcnt


def placement_imbalance(weight, phy2log, num_gpus: int) -> torch.Tensor:
    """Per-layer max GPU load / mean GPU load of any placement (float64 [layers]).

    weight [layers, experts] finite and >= 0 (any magnitude), phy2log [layers, slots] integer ids;
    a layer without load has imbalance 1.0. Non-finite or negative loads raise ArgumentError.
    """
    loads = _loads_to_numpy(weight)
    phy2log = _as_tensor("phy2log", phy2log)
    if phy2log.dim() != 2:
        raise ArgumentError(f"eplb: phy2log must be 2-D [layers, slots], got shape {tuple(phy2log.shape)}")
    placement = _current_to_numpy(phy2log, loads.shape[0], int(phy2log.shape[1]), name="phy2log")
    num_gpus = _as_int("num_gpus", num_gpus, minimum=1)
    return torch.from_numpy(_call_native(_native().eplb_imbalance, loads, placement, num_gpus))
