"""Token dispatch and combine by all-to-all: each routed row travels once, to its expert's rank."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moe_ext.ops as moe_ops
from moe_ext.moe.comm.base import GROUP_LIST_COUNT, MoECommMethod, PermuteResult
from moe_ext.moe.comm.collectives import all_gather_rows, all_to_all_rows, split_rows
from moe_ext.moe.config import MoEConfig
from moe_ext.moe.context import ForwardContext
from moe_ext.moe.routing import permute_by_local_expert, unpermute_weighted

__all__ = ["AllToAllCommImpl"]


class AllToAllCommImpl(MoECommMethod):
    """All-to-all dispatch over the EP group.

    prepare: TP ranks hold the same tokens, so each takes a 1/tp share (padded
    to equal shares). permute: sort the local rows by expert slot, exchange the
    per-slot counts (one small all-to-all; the split sizes then go to the
    host), all-to-all the rows, and regroup what arrived from (source rank,
    local expert) order into (local expert, source rank) order, each expert's
    group padded to ``alignment`` rows. unpermute: the reverse, then the
    weighted combine. finalize: all-gather the TP shares, unpad.

    Moves ``T * K * (ep - 1) / ep`` rows each way per rank; synchronises with
    the host once per forward (the split sizes).

    Backward: the all-to-alls run reversed; the TP split of the (replicated)
    tokens and weights all-gathers its gradient, and the TP all-gather of the
    output, consumed identically by every TP rank, keeps its own share of the
    gradient (no communication).
    """

    name = "alltoall"
    supports_backward = True

    def __init__(self, config: MoEConfig, alignment: Optional[int] = None):
        super().__init__(config)
        self.alignment = alignment

    def prepare(self, hidden_states, topk_ids, topk_weights, context: ForwardContext):
        self.start_forward()
        self.num_tokens = hidden_states.shape[0]
        tp = self.config.tp_size
        if tp == 1:
            return hidden_states, topk_ids, topk_weights
        pad = -self.num_tokens % tp
        if pad:
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad))
            topk_ids = F.pad(topk_ids, (0, 0, 0, pad), value=self.config.num_physical_experts)
            topk_weights = F.pad(topk_weights, (0, 0, 0, pad))
        group, share = self.config.tp_group, topk_ids.shape[0] // tp
        return (self.keep(split_rows(hidden_states, group)), topk_ids.narrow(0, self.config.tp_rank * share, share),
                self.keep(split_rows(topk_weights, group)))

    def permute(self, hidden_states, topk_ids, topk_weights, expert_map: Optional[torch.Tensor] = None):
        if expert_map is not None:
            raise ValueError("AllToAllCommImpl.permute: expert_map must be None: slots are routed to the rank "
                             "that holds them (slot // num_local_experts)")
        config = self.config
        num_slots, num_local, world = config.num_physical_experts, config.num_local_experts, config.ep_size
        device = hidden_states.device
        self.num_prepared_tokens, self.top_k = topk_ids.shape
        self.topk_weights = topk_weights
        ids = topk_ids.to(torch.int64)
        ids = torch.where((ids >= 0) & (ids < num_slots), ids, torch.full_like(ids, -1))
        by_slot, self.expanded_row_idx, tokens_per_slot = permute_by_local_expert(hidden_states, ids, num_slots)

        tokens_per_expert_group = tokens_per_slot
        if world > 1:
            tokens_per_expert_group = torch.empty_like(tokens_per_slot)
            dist.all_to_all_single(tokens_per_expert_group, tokens_per_slot, group=config.ep_group.process_group)
        splits = torch.stack([tokens_per_slot.view(world, num_local).sum(1),
                              tokens_per_expert_group.view(world, num_local).sum(1)]).cpu()
        self.input_splits, self.output_splits = splits[0].tolist(), splits[1].tolist()
        self.num_sent = sum(self.input_splits)
        received = self.keep(all_to_all_rows(by_slot[: self.num_sent], self.output_splits, self.input_splits,
                                             config.ep_group))

        alignment = self.alignment or (8 if device.type == "cuda" else 1)
        max_len = received.shape[0] + num_local * alignment
        max_len += -max_len % alignment
        gather_index, padded_sizes, _ = moe_ops.generate_permute_indices(
            tokens_per_expert_group.to(torch.int32), num_local, world, max_len, alignment)
        num_grouped = int(padded_sizes.sum())
        gather_index = gather_index[:num_grouped].to(torch.int64)
        is_row = gather_index >= 0
        self.num_received = received.shape[0]
        # Where each received row sits in the grouped layout (a permutation of the real rows).
        self.grouped_position = torch.empty(self.num_received, dtype=torch.int64, device=device)
        self.grouped_position[gather_index[is_row]] = torch.nonzero(is_row).squeeze(1)
        # Padding rows read one zero row appended to what arrived, so the grouped rows are
        # a function of ``received`` even when nothing arrived (no branch on the count).
        source = torch.cat([received, received.new_zeros((1, received.shape[1]))])
        grouped = source.index_select(0, torch.where(is_row, gather_index, torch.full_like(gather_index,
                                                                                           self.num_received)))
        return PermuteResult(grouped, padded_sizes.to(torch.int64), GROUP_LIST_COUNT)

    def unpermute(self, mlp_output):
        received_order = mlp_output.index_select(0, self.grouped_position)
        returned = all_to_all_rows(received_order, self.input_splits, self.output_splits, self.config.ep_group)
        rows = self.num_prepared_tokens * self.top_k
        # The rows of dropped entries (never read: index -1), possibly none.
        returned = torch.cat([returned, returned.new_zeros((rows - returned.shape[0], returned.shape[1]))])
        return unpermute_weighted(returned, self.expanded_row_idx, self.topk_weights)

    def finalize(self, hidden_states, reduce_results: bool = True):
        if self.config.tp_size > 1:
            hidden_states = all_gather_rows(hidden_states, self.config.tp_group, backward="slice")
        return self.tie_output(hidden_states[: self.num_tokens])
