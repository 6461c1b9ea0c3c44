"""The interface every expert-parallel MoE forward goes through.

A forward is four steps, each a method of one comm-method object:

1. ``prepare``: make this rank's tokens the tokens its experts must see
   (pad; all-gather over DP, or split over TP);
2. ``permute``: route the prepared tokens to the local experts, rows grouped by
   local expert, with the per-expert row counts the grouped matmul needs;
3. ``unpermute``: after the experts, bring each row back to its token and
   combine the top-k rows with their routing weights;
4. ``finalize``: undo ``prepare`` (reduce-scatter over DP or all-gather over
   TP, all-reduce over TP, unpad).

State needed by a later step (indices, counts, splits) lives on the object
between the calls of one forward: one object per layer, one forward at a time.

Training: every rank runs the same collectives in backward
-----------------------------------------------------------
Each collective's backward is a collective too, so backward stays in step only
if every rank's autograd reaches the same collective nodes in the same order.
Forward order is the same on every rank (the methods never skip a collective
on data); autograd runs nodes in reverse creation order, so the order holds
as long as the *set* of reached nodes does. Data can change that set in one
way: a tensor cut from the loss on one rank only (a rank whose experts get no
rows builds an output that does not depend on its inputs). The guard is
structural rather than a rule each line must remember:

- every tensor a differentiable collective produces in the forward goes
  through :meth:`MoECommMethod.keep` (``prepare``/``permute`` do it), and
  ``finalize`` returns :meth:`MoECommMethod.tie_output`: the output tied
  (:func:`moe_ext.moe.comm.collectives.tie`) to all of them, so autograd
  reaches every one of those collectives on every rank, whatever the routing;
- collectives never sit behind a data-dependent branch (no ``if count:``
  around a collective or around the op that feeds one; empty tensors go
  through the same collectives as full ones), and the steps never rebuild a
  tensor from fresh zeros where the result must carry a gradient;
- a method without a backward (MC2, dummy) wraps its output with
  :func:`moe_ext.moe.comm.collectives.forward_only`, which raises naming the
  method at the first backward, before any backward collective.

``tests/test_moe_backward.py`` checks the guard's premise on the cases that
used to break it (experts with no rows, a rank with no tokens, TP > 1, EP on
a subgroup) with forward and all gradients against a dense reference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch

from moe_ext.moe.config import MoEConfig
from moe_ext.moe.context import ForwardContext

__all__ = ["MoECommMethod", "PermuteResult", "GROUP_LIST_CUMSUM", "GROUP_LIST_COUNT"]

GROUP_LIST_CUMSUM = 0
GROUP_LIST_COUNT = 1


@dataclass
class PermuteResult:
    """Rows for the local experts.

    ``hidden_states`` [R, H]: rows grouped by local expert; only the first
    ``expert_tokens.sum()`` rows are meaningful. ``expert_tokens`` int64
    [num_local_experts]: counts (``group_list_type == GROUP_LIST_COUNT``) or
    their cumulative sum (``GROUP_LIST_CUMSUM``).
    """

    hidden_states: torch.Tensor
    expert_tokens: torch.Tensor
    group_list_type: int = GROUP_LIST_COUNT

    def counts(self) -> torch.Tensor:
        if self.group_list_type == GROUP_LIST_COUNT:
            return self.expert_tokens
        return torch.diff(self.expert_tokens, prepend=self.expert_tokens.new_zeros(1))


class MoECommMethod(ABC):
    """Base class of the communication methods (see the module docstring for the protocol)."""

    name: str = "base"
    #: whether forward is differentiable end to end (training)
    supports_backward: bool = False

    def __init__(self, config: MoEConfig):
        self.config = config
        self._anchors: list[torch.Tensor] = []

    # -- the backward guard (module docstring) -----------------------------------------------
    def keep(self, *tensors: torch.Tensor):
        """Record tensors a collective produced in this forward; returns them (one or a tuple)."""
        self._anchors.extend(t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad)
        return tensors[0] if len(tensors) == 1 else tensors

    def start_forward(self) -> None:
        """Forget the previous forward's anchors (``prepare`` calls it first)."""
        self._anchors = []

    def tie_output(self, output: torch.Tensor) -> torch.Tensor:
        """``output`` tied to every kept tensor of this forward (``finalize`` returns this)."""
        from moe_ext.moe.comm.collectives import tie
        anchors, self._anchors = self._anchors, []
        return tie(output, anchors)

    # -- helpers shared by the implementations ---------------------------------------------
    def padding_expert_ids(self, num_rows: int, device: torch.device) -> torch.Tensor:
        """Distinct, valid expert slots for padding rows, spread over the slots (row r: r*K + k)."""
        k = self.config.top_k
        rows = torch.arange(num_rows, device=device).unsqueeze(1) * k + torch.arange(k, device=device)
        return rows % self.config.num_physical_experts

    def local_expert_ids(self, topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor]) -> torch.Tensor:
        """The local expert of each (t, k), or -1 when the slot is not on this rank.

        ``expert_map`` [num_physical_experts]: local index of each slot, -1 for
        remote ones; by default slots are contiguous per EP rank. Ids outside
        ``[0, num_physical_experts)`` (the padding sentinel) map to -1.
        """
        num_slots = self.config.num_physical_experts
        ids = topk_ids.to(torch.int64)
        in_range = (ids >= 0) & (ids < num_slots)
        if expert_map is None:
            first, last = self.config.local_expert_range
            local = ids - first
            keep = in_range & (ids >= first) & (ids < last)
            return torch.where(keep, local, torch.full_like(local, -1))
        if tuple(expert_map.shape) != (num_slots,):
            raise ValueError(f"{type(self).__name__}: expert_map must have shape ({num_slots},), "
                             f"got {tuple(expert_map.shape)}")
        mapped = expert_map.to(ids.device, torch.int64)[ids.clamp(0, num_slots - 1)]
        return torch.where(in_range, mapped, torch.full_like(mapped, -1))

    # -- the protocol ----------------------------------------------------------------------
    @abstractmethod
    def prepare(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                context: ForwardContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's tokens [T, H] and routing [T, K] -> the tokens this rank's experts see."""

    @abstractmethod
    def permute(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                expert_map: Optional[torch.Tensor] = None) -> PermuteResult:
        """Prepared tokens -> rows grouped by local expert."""

    @abstractmethod
    def unpermute(self, mlp_output: torch.Tensor) -> torch.Tensor:
        """Expert outputs (rows as ``permute`` returned them) -> weighted sum per prepared token."""

    @abstractmethod
    def finalize(self, hidden_states: torch.Tensor, reduce_results: bool = True) -> torch.Tensor:
        """Per prepared token -> this rank's tokens [T, H] (partial over TP when not ``reduce_results``)."""
