"""moe_ext's planner behind vLLM's EPLB interfaces (no vLLM import unless asked).

vLLM (checked against 0.33.0, ``vllm/distributed/eplb/policy/abstract.py``) selects an EPLB
policy class from ``vllm.distributed.eplb.policy.EPLB_POLICIES[eplb_config.policy]`` and calls

    new_phy2log = policy.rebalance_experts(weight, num_replicas, num_groups, num_nodes,
                                           num_ranks, old_global_expert_indices)

a classmethod: ``weight`` [layers, logical experts] (the load window summed, on CPU),
``old_global_expert_indices`` [layers, num_replicas] the map in force (or None), returning the
new [layers, num_replicas] physical-to-logical map. :class:`MoeExtEplbPolicy` implements it with
:func:`moe_ext.eplb.plan_placement`: planned from the old map (few moves, never worse than it),
with ``max_moves`` / ``tolerance`` / ``allow_cross_node`` as class attributes
(:meth:`MoeExtEplbPolicy.configured` makes a configured subclass).

Selecting it in vLLM (vLLM validates ``eplb_config.policy`` against a fixed list, so the
adapter takes the "default" entry unless told otherwise)::

    from moe_ext.eplb import vllm_policy
    vllm_policy.install(max_moves=32)        # before the engine builds its EplbState
    # then run vLLM with EPLB enabled as usual (--enable-eplb)

or, on an existing ``EplbState``: ``state.policy = vllm_policy.vllm_policy_class()``.

vLLM's weight-rearrangement call shape (0.33.0, ``rebalance_execute.py``) is
``rearrange_expert_weights_inplace(old, new, expert_weights, expert_buffer, ep_group,
communicator, is_profile=False, rank_mapping=None)``;
:func:`rearrange_expert_weights_vllm` takes exactly that and runs moe_ext's executor
(:func:`moe_ext.eplb.rearrange_expert_weights_inplace`). moe_ext's executor stages through its
own buffer and posts P2P operations on ``ep_group`` through torch.distributed, so vLLM's
``expert_buffer`` and ``communicator`` are checked and then not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from moe_ext.errors import ArgumentError, check_bool, check_int

__all__ = ["MoeExtEplbPolicy", "vllm_policy_class", "install", "rearrange_expert_weights_vllm"]


class MoeExtEplbPolicy:
    """vLLM's EPLB policy interface (``rebalance_experts`` classmethod) on moe_ext's planner.

    Class attributes (set through :meth:`configured`):
        max_moves: most slots per layer whose expert may change when an old map is given
            (None: no bound; the planner still moves little and is never worse than the old map).
        tolerance: stop moving within this fraction of the from-scratch imbalance.
        allow_cross_node: let replicas leave their group's node (off: the hierarchy is kept,
            as vLLM's default policy keeps it).
        num_threads: planner threads over layers.
    """

    max_moves: Optional[int] = None
    tolerance: float = 0.02
    allow_cross_node: bool = False
    num_threads: int = 1

    @classmethod
    def configured(cls, *, max_moves: Optional[int] = None, tolerance: float = 0.02,
                   allow_cross_node: bool = False, num_threads: int = 1) -> type:
        """A subclass with these settings (vLLM keeps a class, not an instance)."""
        if max_moves is not None:
            max_moves = check_int("max_moves", max_moves, minimum=0)
        check_bool("allow_cross_node", allow_cross_node)
        check_int("num_threads", num_threads, minimum=0)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
            raise TypeError(f"tolerance must be a float, got {type(tolerance).__name__}")
        if not 0 <= float(tolerance) < float("inf"):
            raise ArgumentError(f"tolerance must be finite and >= 0, got {tolerance}")
        return type(cls.__name__, (cls,), {"max_moves": max_moves, "tolerance": float(tolerance),
                                           "allow_cross_node": allow_cross_node, "num_threads": num_threads})

    @classmethod
    def rebalance_experts(cls, weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                          num_ranks: int, old_global_expert_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """New physical-to-logical map [layers, num_replicas], int64 on CPU.

        ``old_global_expert_indices`` [layers, num_replicas] is used as the current placement when
        it is one (same shape, every id in range, every expert present); an old map from another
        shape (e.g. elastic scaling, -1 entries) is ignored and the plan is made from scratch.
        Bad values raise moe_ext.errors.ArgumentError (an AssertionError, as vLLM's policy asserts).
        """
        current = None
        if old_global_expert_indices is not None:
            old = torch.as_tensor(old_global_expert_indices).detach().to("cpu")
            if old.dtype.is_floating_point or old.is_complex() or old.dtype == torch.bool:
                raise TypeError(f"old_global_expert_indices must be an integer tensor, got {old.dtype}")
            experts = int(weight.shape[-1])
            if (old.dim() == 2 and tuple(old.shape) == (int(weight.shape[0]), num_replicas)
                    and bool(((old >= 0) & (old < experts)).all())
                    and all(torch.unique(row).numel() == experts for row in old)):
                current = old.to(torch.int64)
        max_moves = cls.max_moves if current is not None else None
        plan = _plan(weight, num_replicas, num_groups, num_nodes, num_ranks, current=current, max_moves=max_moves,
                     tolerance=cls.tolerance, allow_cross_node=cls.allow_cross_node, num_threads=cls.num_threads)
        return plan.phy2log


def _plan(*args, **kwargs):
    from moe_ext.eplb.placement import plan_placement

    return plan_placement(*args, **kwargs)


def _vllm_abstract_policy() -> type:
    """vLLM's AbstractEplbPolicy (imports vLLM)."""
    from vllm.distributed.eplb.policy import AbstractEplbPolicy  # noqa: PLC0415 - optional dependency

    return AbstractEplbPolicy


def vllm_policy_class(base: Optional[type] = None, **settings: Any) -> type:
    """MoeExtEplbPolicy as a subclass of vLLM's ``AbstractEplbPolicy`` (``base``: that class, else
    imported from vLLM), configured with ``settings`` (see :meth:`MoeExtEplbPolicy.configured`)."""
    base = _vllm_abstract_policy() if base is None else base
    configured = MoeExtEplbPolicy.configured(**settings) if settings else MoeExtEplbPolicy
    return type("MoeExtEplbPolicy", (configured, base), {})


def install(name: str = "default", **settings: Any) -> type:
    """Register the adapter in vLLM's ``EPLB_POLICIES`` under ``name`` ("default": what vLLM selects
    unless configured otherwise; vLLM's config accepts only its own policy names) and return it."""
    from vllm.distributed.eplb import policy as vllm_policies  # noqa: PLC0415 - optional dependency

    policy = vllm_policy_class(vllm_policies.AbstractEplbPolicy, **settings)
    vllm_policies.EPLB_POLICIES[name] = policy
    try:  # eplb_state imported the dict itself: the same object, so this is already seen there
        from vllm.distributed.eplb import eplb_state  # noqa: PLC0415

        eplb_state.EPLB_POLICIES[name] = policy
    except Exception:  # noqa: BLE001 - older layouts: the registry above is what counts
        pass
    return policy


def rearrange_expert_weights_vllm(old_global_expert_indices: Any, new_global_expert_indices: Any,
                                  expert_weights: Sequence[Sequence[torch.Tensor]],
                                  expert_buffer: Sequence[torch.Tensor], ep_group: Any, communicator: Any,
                                  is_profile: bool = False, rank_mapping: Optional[dict] = None):
    """vLLM 0.33's ``rearrange_expert_weights_inplace`` call shape on moe_ext's executor.

    Arguments as vLLM's: old / new maps [layers, num_physical], expert_weights [layers][weights]
    of [local slots, ...] tensors, expert_buffer (one tensor per weight of a layer; checked, not
    used: moe_ext stages through its own buffer), ep_group, communicator (vLLM's EplbCommunicator;
    not used: moe_ext posts P2P operations on ep_group), is_profile, rank_mapping. Returns moe_ext's
    TransferPlan. The executor's own checks and all-or-nothing behaviour apply.
    """
    from moe_ext.eplb.rearrange import rearrange_expert_weights_inplace  # noqa: PLC0415

    if isinstance(expert_buffer, torch.Tensor) or not isinstance(expert_buffer, Sequence) or \
            not all(isinstance(t, torch.Tensor) for t in expert_buffer):
        raise TypeError("expert_buffer must be a sequence of tensors (one per weight of a layer), got "
                        f"{type(expert_buffer).__name__}")
    if isinstance(communicator, (bool, torch.Tensor)) or communicator is None:
        raise TypeError(f"communicator must be vLLM's EplbCommunicator object, got {type(communicator).__name__}; "
                        f"this is vLLM's call shape (old, new, weights, buffer, group, communicator, ...)")
    is_profile = check_bool("is_profile", is_profile)
    return rearrange_expert_weights_inplace(old_global_expert_indices, new_global_expert_indices, expert_weights,
                                            ep_group, is_profile=is_profile, rank_mapping=rank_mapping)
