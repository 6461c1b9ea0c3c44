"""The interface every expert-parallel MoE forward goes through.

One call is two steps, in torchtitan 0.3's token-dispatcher style
(``dispatch`` returns what ``combine`` needs as a value):

- ``routed, metadata = method.dispatch(hidden_states, topk_ids, topk_weights, context)``:
  this rank's tokens [T, H] and their slots/weights [T, K] -> rows grouped by
  local expert (:class:`PermuteResult`), plus a :class:`CombineMetadata`;
- ``output = method.combine(expert_output, metadata, reduce_results)``: the
  experts' rows -> this rank's tokens [T, H].

Each is two finer steps, public too (engines that put work between them):
``dispatch`` = ``permute(prepare(...))`` and ``combine`` = ``finalize(unpermute(...))``:

1. ``prepare``: make this rank's tokens the tokens its experts must see
   (pad; all-gather over DP, or split over TP) -> :class:`Prepared`;
2. ``permute``: route the prepared tokens to the local experts, rows grouped by
   local expert, with the per-expert row counts the grouped matmul needs;
3. ``unpermute``: after the experts, bring each row back to its token and
   combine the top-k rows with their routing weights;
4. ``finalize``: undo ``prepare`` (reduce-scatter over DP or all-gather over
   TP, all-reduce over TP, unpad).

Per-call state lives in values, never on the object: ``prepare`` returns a
:class:`PrepareMetadata` inside :class:`Prepared`, ``permute`` returns the
:class:`CombineMetadata` (the prepare metadata, the method's own frozen
routing record, the tensors the backward guard ties), and ``unpermute`` /
``finalize`` read only that. So one method object (one per layer) can have
several calls in flight: dispatch micro-batch A, dispatch B, compute A's
experts while B's rows travel, combine in any order. The collectives still
run in program order, so every rank of the group must issue the dispatches
and combines of the calls in flight in the same order (as for any
collective). ``tests/test_moe_overlap.py`` checks two micro-batches
dispatched back to back and combined in reverse order against running them
one after the other, forward and backward, for every method.

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

- every tensor a differentiable collective produces in the forward is
  recorded in the call's metadata (``PrepareMetadata.anchors``,
  ``CombineMetadata.anchors``: ``prepare``/``permute`` put them there), and
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
from typing import Any, NamedTuple, Optional

import torch

from moe_ext.errors import ArgumentError
from moe_ext.moe.config import MoEConfig
from moe_ext.moe.context import ForwardContext

__all__ = ["CombineMetadata", "MoECommMethod", "PermuteResult", "PrepareMetadata", "Prepared", "GROUP_LIST_CUMSUM",
           "GROUP_LIST_COUNT"]

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


def grad_tensors(*tensors: Any) -> tuple[torch.Tensor, ...]:
    """The tensors among ``tensors`` that require grad (the anchors worth tying)."""
    return tuple(t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad)


@dataclass(frozen=True)
class PrepareMetadata:
    """What ``prepare`` leaves for ``permute`` and ``finalize`` (one call's, immutable).

    - ``num_tokens``: this rank's tokens before ``prepare`` (rows ``finalize`` returns);
    - ``anchors``: tensors a differentiable collective produced (the backward guard);
    - ``active_mask``: bool [rows prepared], real tokens (MC2's ``x_active_mask``), or None;
    - ``forward_inputs``: the caller's tensors a forward-only method's output
      depends on (so its backward raises by name), or empty.
    """

    num_tokens: int
    anchors: tuple[torch.Tensor, ...] = ()
    active_mask: Optional[torch.Tensor] = None
    forward_inputs: tuple[torch.Tensor, ...] = ()


class Prepared(NamedTuple):
    """``prepare``'s result: the tokens this rank's experts see, their routing, and the call's metadata."""

    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    metadata: PrepareMetadata


@dataclass(frozen=True)
class CombineMetadata:
    """What ``combine`` (``unpermute`` + ``finalize``) needs from its ``dispatch``: one value per call.

    ``method``: the name of the method that made it (combine refuses another's);
    ``prepare``: :class:`PrepareMetadata`; ``route``: the method's own frozen
    record of the permutation (indices, weights, split sizes); ``anchors``:
    every tensor of the call a differentiable collective produced.
    Holding it keeps those tensors alive until ``combine``.
    """

    method: str
    prepare: PrepareMetadata
    route: Any
    anchors: tuple[torch.Tensor, ...] = ()


class MoECommMethod(ABC):
    """Base class of the communication methods (see the module docstring for the protocol).

    The object holds configuration only (set at construction); everything of
    one call travels in :class:`Prepared` / :class:`CombineMetadata`.
    """

    name: str = "base"
    #: whether forward is differentiable end to end (training)
    supports_backward: bool = False

    def __init__(self, config: MoEConfig):
        self.config = config

    # -- the two-step protocol (torchtitan 0.3 style) ----------------------------------------
    def dispatch(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 context: ForwardContext, expert_map: Optional[torch.Tensor] = None
                 ) -> tuple[PermuteResult, CombineMetadata]:
        """This rank's tokens [T, H], slots int [T, K], weights [T, K] -> (rows for the local experts, metadata).

        Collective over the method's groups. ``expert_map``: see :meth:`local_expert_ids`.
        """
        return self.permute(self.prepare(hidden_states, topk_ids, topk_weights, context), expert_map)

    def combine(self, mlp_output: torch.Tensor, metadata: CombineMetadata,
                reduce_results: bool = True) -> torch.Tensor:
        """The experts' rows (as ``dispatch`` returned them) -> this rank's tokens [T, H].

        ``metadata``: the value the matching :meth:`dispatch` returned.
        Collective; with ``reduce_results`` False the output is partial over TP.
        """
        return self.finalize(self.unpermute(mlp_output, metadata), metadata, reduce_results)

    # -- the backward guard (module docstring) -----------------------------------------------
    def metadata(self, prepared: PrepareMetadata, route: Any, *anchors: Any) -> CombineMetadata:
        """The call's :class:`CombineMetadata`: ``prepared``'s anchors plus ``anchors`` (those needing grad)."""
        return CombineMetadata(self.name, prepared, route, prepared.anchors + grad_tensors(*anchors))

    def check_metadata(self, metadata: Any, step: str) -> CombineMetadata:
        """``metadata`` when it is a :class:`CombineMetadata` of this method, else TypeError / ArgumentError."""
        if not isinstance(metadata, CombineMetadata):
            raise TypeError(f"{type(self).__name__}.{step}: metadata must be the CombineMetadata its dispatch "
                            f"returned, got {type(metadata).__name__}")
        if metadata.method != self.name:
            raise ArgumentError(f"{type(self).__name__}.{step}: metadata comes from comm method "
                                f"{metadata.method!r}, expected one from {self.name!r}")
        return metadata

    def tie_output(self, output: torch.Tensor, metadata: CombineMetadata) -> torch.Tensor:
        """``output`` tied to every anchor of the call (``finalize`` returns this)."""
        from moe_ext.moe.comm.collectives import tie
        return tie(output, metadata.anchors)

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

    # -- the four steps ----------------------------------------------------------------------
    @abstractmethod
    def prepare(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                context: ForwardContext) -> Prepared:
        """This rank's tokens [T, H] and routing [T, K] -> the tokens this rank's experts see (+ metadata)."""

    @abstractmethod
    def permute(self, prepared: Prepared, expert_map: Optional[torch.Tensor] = None
                ) -> tuple[PermuteResult, CombineMetadata]:
        """Prepared tokens -> rows grouped by local expert, and the call's :class:`CombineMetadata`."""

    @abstractmethod
    def unpermute(self, mlp_output: torch.Tensor, metadata: CombineMetadata) -> torch.Tensor:
        """Expert outputs (rows as ``permute`` returned them) -> weighted sum per prepared token."""

    @abstractmethod
    def finalize(self, hidden_states: torch.Tensor, metadata: CombineMetadata,
                 reduce_results: bool = True) -> torch.Tensor:
        """Per prepared token -> this rank's tokens [T, H] (partial over TP when not ``reduce_results``)."""
