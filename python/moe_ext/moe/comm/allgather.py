"""All-gather over DP, local routing with the fused routing ops, reduce-scatter back."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moe_ext.moe.comm.base import GROUP_LIST_COUNT, MoECommMethod, PermuteResult
from moe_ext.moe.comm.collectives import all_gather_rows, all_reduce_sum, copy_rows, reduce_scatter_rows
from moe_ext.moe.config import MoEConfig
from moe_ext.moe.context import ForwardContext
from moe_ext.moe.routing import permute_by_local_expert, unpermute_weighted

__all__ = ["AllGatherCommImpl"]


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

    def prepare(self, hidden_states, topk_ids, topk_weights, context: ForwardContext):
        self.start_forward()
        self.num_tokens = hidden_states.shape[0]
        if self.config.tp_size > 1:
            group = self.config.tp_group
            hidden_states, topk_weights = self.keep(copy_rows(hidden_states, group), copy_rows(topk_weights, group))
        if self.config.dp_size == 1:
            return hidden_states, topk_ids, topk_weights
        pad = context.max_tokens_across_dp - self.num_tokens
        if pad > 0:
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad))
            # Padding rows go to a slot that exists nowhere, so no rank computes them.
            topk_ids = F.pad(topk_ids, (0, 0, 0, pad), value=self.config.num_physical_experts)
            topk_weights = F.pad(topk_weights, (0, 0, 0, pad))
        group = self.config.dp_group
        return (self.keep(all_gather_rows(hidden_states, group)), all_gather_rows(topk_ids, group),
                self.keep(all_gather_rows(topk_weights, group)))

    def permute(self, hidden_states, topk_ids, topk_weights, expert_map: Optional[torch.Tensor] = None):
        num_local = self.config.num_local_experts
        local_ids = self.local_expert_ids(topk_ids, expert_map)
        self.topk_weights = topk_weights
        if self.npu is None:
            permuted, self.expanded_row_idx, expert_tokens = permute_by_local_expert(hidden_states, local_ids,
                                                                                     num_local)
            return PermuteResult(permuted, expert_tokens, GROUP_LIST_COUNT)
        from moe_ext.platform import npu as npu_adapter
        # Remote slots become local id L: outside the active range [0, L), so dropped.
        ids = torch.where(local_ids >= 0, local_ids, torch.full_like(local_ids, num_local))
        permuted, expanded_row_idx, expert_tokens = npu_adapter.init_routing(
            self.npu, hidden_states, ids, num_experts=num_local + 1, active_expert_range=(0, num_local))
        # npu_moe_token_unpermute takes no -1 entries and no duplicates, and the grouped
        # matmul leaves rows past the valid count undefined. So: dropped entries get the
        # unused rows [valid, T*K) one each (a permutation), weight 0, and those rows are
        # zeroed before the combine (where, not multiply: 0 * NaN is NaN).
        self.num_valid_rows = expert_tokens.sum()
        dropped = expanded_row_idx < 0
        spare_row = self.num_valid_rows + torch.cumsum(dropped.to(torch.int64), 0) - 1
        self.expanded_row_idx = torch.where(dropped, spare_row, expanded_row_idx.to(torch.int64)).to(torch.int32)
        self.topk_weights = torch.where(dropped.view_as(topk_weights), torch.zeros_like(topk_weights),
                                        topk_weights)
        return PermuteResult(permuted, expert_tokens, GROUP_LIST_COUNT)

    def unpermute(self, mlp_output):
        if self.npu is None:
            return unpermute_weighted(mlp_output, self.expanded_row_idx, self.topk_weights)
        from moe_ext.platform import npu as npu_adapter
        valid = torch.arange(mlp_output.shape[0], device=mlp_output.device) < self.num_valid_rows
        mlp_output = torch.where(valid.unsqueeze(1), mlp_output, torch.zeros((), dtype=mlp_output.dtype,
                                                                             device=mlp_output.device))
        return npu_adapter.token_unpermute(self.npu, mlp_output, self.expanded_row_idx,
                                           self.topk_weights.to(mlp_output.dtype))

    def finalize(self, hidden_states, reduce_results: bool = True):
        if self.config.dp_size > 1:
            hidden_states = reduce_scatter_rows(hidden_states, self.config.dp_group)[: self.num_tokens]
        if reduce_results and self.config.tp_size > 1:
            hidden_states = all_reduce_sum(hidden_states, self.config.tp_group)
        return self.tie_output(hidden_states)
