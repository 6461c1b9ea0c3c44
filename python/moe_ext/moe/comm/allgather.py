"""All-gather over DP, local routing with the fused routing ops, reduce-scatter back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from moe_ext.moe.comm.base import (GROUP_LIST_COUNT, CombineMetadata, MoECommMethod, PermuteResult, Prepared,
                                   PrepareMetadata, grad_tensors)
from moe_ext.moe.comm.collectives import all_gather_rows, all_reduce_sum, copy_rows, reduce_scatter_rows
from moe_ext.moe.config import MoEConfig
from moe_ext.moe.context import ForwardContext
from moe_ext.moe.routing import permute_by_local_expert, unpermute_weighted

__all__ = ["AllGatherCommImpl", "AllGatherRoute"]


@dataclass(frozen=True)
class AllGatherRoute:
    """One call's permutation (``CombineMetadata.route`` of the all-gather method).

    ``expanded_row_idx`` int [P*K]: row of each prepared (token, k) in the
    permuted rows (-1: not on this rank; on NPU a spare row, see ``permute``);
    ``topk_weights`` [P, K]: the weights the combine applies (0 for dropped
    entries on NPU); ``num_valid_rows``: int64 scalar tensor, NPU path only.
    """

    expanded_row_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_valid_rows: Optional[torch.Tensor] = None


class AllGatherCommImpl(MoECommMethod):
    """Every rank sees every DP rank's tokens and runs them through its own experts.

    prepare: pad to ``max_tokens_across_dp`` (padding rows routed nowhere) and
    all-gather tokens and routing over DP. permute/unpermute: moe_ext's routing
    ops (``npu_moe_init_routing_v2`` / ``npu_moe_token_unpermute`` on NPU).
    finalize: reduce-scatter over DP (sums the experts of the DP ranks), then
    all-reduce over TP (sums the experts of the TP ranks), unpad.

    Backward (any DP x TP layout, EP on the world or a subgroup): the DP
    all-gathers' gradients are reduce-scattered and the reduce-scatter's
    gathered; over TP the tokens and routing weights, which every TP rank
    holds identically and feeds to its own experts, get their gradient summed
    over TP (:func:`~moe_ext.moe.comm.collectives.copy_rows`), and the TP
    all-reduce passes the replicated output gradient through. With
    ``reduce_results=False`` the caller's TP reduction must do the same
    (forward sum, backward identity: ``moe_ext.distributed.functional.all_reduce``).

    Works for any sizes; moves ``2 * (dp - 1) * T * H`` elements per rank.
    """

    name = "allgather"
    supports_backward = True

    def __init__(self, config: MoEConfig, npu=None):
        super().__init__(config)
        self.npu = npu

    def prepare(self, hidden_states, topk_ids, topk_weights, context: ForwardContext) -> Prepared:
        num_tokens = hidden_states.shape[0]
        anchors: tuple[torch.Tensor, ...] = ()
        if self.config.tp_size > 1:
            group = self.config.tp_group
            hidden_states, topk_weights = copy_rows(hidden_states, group), copy_rows(topk_weights, group)
            anchors = grad_tensors(hidden_states, topk_weights)
        if self.config.dp_size == 1:
            return Prepared(hidden_states, topk_ids, topk_weights, PrepareMetadata(num_tokens, anchors))
        pad = context.max_tokens_across_dp - num_tokens
        if pad > 0:
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad))
            # Padding rows go to a slot that exists nowhere, so no rank computes them.
            topk_ids = F.pad(topk_ids, (0, 0, 0, pad), value=self.config.num_physical_experts)
            topk_weights = F.pad(topk_weights, (0, 0, 0, pad))
        group = self.config.dp_group
        hidden_states, topk_ids, topk_weights = (all_gather_rows(hidden_states, group),
                                                 all_gather_rows(topk_ids, group),
                                                 all_gather_rows(topk_weights, group))
        anchors += grad_tensors(hidden_states, topk_weights)
        return Prepared(hidden_states, topk_ids, topk_weights, PrepareMetadata(num_tokens, anchors))

    def permute(self, prepared: Prepared, expert_map: Optional[torch.Tensor] = None):
        hidden_states, topk_ids, topk_weights, prepare_metadata = prepared
        num_local = self.config.num_local_experts
        local_ids = self.local_expert_ids(topk_ids, expert_map)
        if self.npu is None:
            permuted, expanded_row_idx, expert_tokens = permute_by_local_expert(hidden_states, local_ids, num_local)
            route = AllGatherRoute(expanded_row_idx, topk_weights)
            return PermuteResult(permuted, expert_tokens, GROUP_LIST_COUNT), self.metadata(prepare_metadata, route)
        from moe_ext.platform import npu as npu_adapter
        # Remote slots become local id L: outside the active range [0, L), so dropped.
        ids = torch.where(local_ids >= 0, local_ids, torch.full_like(local_ids, num_local))
        permuted, expanded_row_idx, expert_tokens = npu_adapter.init_routing(
            self.npu, hidden_states, ids, num_experts=num_local + 1, active_expert_range=(0, num_local))
        # npu_moe_token_unpermute takes no -1 entries and no duplicates, and the grouped
        # matmul leaves rows past the valid count undefined. So: dropped entries get the
        # unused rows [valid, T*K) one each (a permutation), weight 0, and those rows are
        # zeroed before the combine (where, not multiply: 0 * NaN is NaN).
        num_valid_rows = expert_tokens.sum()
        dropped = expanded_row_idx < 0
        spare_row = num_valid_rows + torch.cumsum(dropped.to(torch.int64), 0) - 1
        route = AllGatherRoute(
            torch.where(dropped, spare_row, expanded_row_idx.to(torch.int64)).to(torch.int32),
            torch.where(dropped.view_as(topk_weights), torch.zeros_like(topk_weights), topk_weights),
            num_valid_rows)
        return PermuteResult(permuted, expert_tokens, GROUP_LIST_COUNT), self.metadata(prepare_metadata, route)

    def unpermute(self, mlp_output, metadata: CombineMetadata):
        route = self.check_metadata(metadata, "unpermute").route
        if self.npu is None:
            return unpermute_weighted(mlp_output, route.expanded_row_idx, route.topk_weights)
        from moe_ext.platform import npu as npu_adapter
        valid = torch.arange(mlp_output.shape[0], device=mlp_output.device) < route.num_valid_rows
        mlp_output = torch.where(valid.unsqueeze(1), mlp_output, torch.zeros((), dtype=mlp_output.dtype,
                                                                             device=mlp_output.device))
        return npu_adapter.token_unpermute(self.npu, mlp_output, route.expanded_row_idx,
                                           route.topk_weights.to(mlp_output.dtype))

    def finalize(self, hidden_states, metadata: CombineMetadata, reduce_results: bool = True):
        metadata = self.check_metadata(metadata, "finalize")
        if self.config.dp_size > 1:
            hidden_states = reduce_scatter_rows(hidden_states, self.config.dp_group)[: metadata.prepare.num_tokens]
        if reduce_results and self.config.tp_size > 1:
            hidden_states = all_reduce_sum(hidden_states, self.config.tp_group)
        return self.tie_output(hidden_states, metadata)
