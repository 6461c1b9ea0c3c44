"""Token dispatch and combine by all-to-all: each routed row travels once, to its expert's rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moe_ext.ops as moe_ops
from moe_ext.moe.comm.base import (GROUP_LIST_COUNT, CombineMetadata, MoECommMethod, PermuteResult, Prepared,
                                   PrepareMetadata, grad_tensors)
from moe_ext.moe.comm.collectives import all_gather_rows, all_to_all_rows, split_rows
from moe_ext.moe.config import MoEConfig
from moe_ext.moe.context import ForwardContext
from moe_ext.moe.routing import permute_by_local_expert, unpermute_weighted

__all__ = ["AllToAllCommImpl", "AllToAllRoute"]


@dataclass(frozen=True)
class AllToAllRoute:
    """One call's dispatch (``CombineMetadata.route`` of the all-to-all method).

    ``expanded_row_idx`` int [P*K]: row of each prepared (token, k) in the
    slot-sorted rows (-1: dropped); ``topk_weights`` [P, K];
    ``input_splits`` / ``output_splits``: rows sent to / received from each EP
    rank (host ints); ``grouped_position`` int64 [received]: where each
    received row sits in the grouped layout; ``num_prepared_tokens``, ``top_k``.
    """

    expanded_row_idx: torch.Tensor
    topk_weights: torch.Tensor
    input_splits: tuple[int, ...]
    output_splits: tuple[int, ...]
    grouped_position: torch.Tensor
    num_prepared_tokens: int
    top_k: int


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

    def prepare(self, hidden_states, topk_ids, topk_weights, context: ForwardContext) -> Prepared:
        num_tokens = hidden_states.shape[0]
        tp = self.config.tp_size
        if tp == 1:
            return Prepared(hidden_states, topk_ids, topk_weights, PrepareMetadata(num_tokens))
        pad = -num_tokens % tp
        if pad:
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad))
            topk_ids = F.pad(topk_ids, (0, 0, 0, pad), value=self.config.num_physical_experts)
            topk_weights = F.pad(topk_weights, (0, 0, 0, pad))
        group, share = self.config.tp_group, topk_ids.shape[0] // tp
        hidden_states, topk_weights = split_rows(hidden_states, group), split_rows(topk_weights, group)
        return Prepared(hidden_states, topk_ids.narrow(0, self.config.tp_rank * share, share), topk_weights,
                        PrepareMetadata(num_tokens, grad_tensors(hidden_states, topk_weights)))

    def permute(self, prepared: Prepared, expert_map: Optional[torch.Tensor] = None):
        if expert_map is not None:
            raise ValueError("AllToAllCommImpl.permute: expert_map must be None: slots are routed to the rank "
                             "that holds them (slot // num_local_experts)")
        hidden_states, topk_ids, topk_weights, prepare_metadata = prepared
        config = self.config
        num_slots, num_local, world = config.num_physical_experts, config.num_local_experts, config.ep_size
        device = hidden_states.device
        ids = topk_ids.to(torch.int64)
        ids = torch.where((ids >= 0) & (ids < num_slots), ids, torch.full_like(ids, -1))
        by_slot, expanded_row_idx, tokens_per_slot = permute_by_local_expert(hidden_states, ids, num_slots)

        tokens_per_expert_group = tokens_per_slot
        if world > 1:
            tokens_per_expert_group = torch.empty_like(tokens_per_slot)
            dist.all_to_all_single(tokens_per_expert_group, tokens_per_slot, group=config.ep_group.process_group)
        splits = torch.stack([tokens_per_slot.view(world, num_local).sum(1),
                              tokens_per_expert_group.view(world, num_local).sum(1)]).cpu()
        input_splits, output_splits = tuple(splits[0].tolist()), tuple(splits[1].tolist())
        received = all_to_all_rows(by_slot[: sum(input_splits)], output_splits, input_splits, config.ep_group)

        alignment = self.alignment or (8 if device.type == "cuda" else 1)
        max_len = received.shape[0] + num_local * alignment
        max_len += -max_len % alignment
        gather_index, padded_sizes, _ = moe_ops.generate_permute_indices(
            tokens_per_expert_group.to(torch.int32), num_local, world, max_len, alignment)
        num_grouped = int(padded_sizes.sum())
        gather_index = gather_index[:num_grouped].to(torch.int64)
        is_row = gather_index >= 0
        num_received = received.shape[0]
        # Where each received row sits in the grouped layout (a permutation of the real rows).
        grouped_position = torch.empty(num_received, dtype=torch.int64, device=device)
        grouped_position[gather_index[is_row]] = torch.nonzero(is_row).squeeze(1)
        # Padding rows read one zero row appended to what arrived, so the grouped rows are
        # a function of ``received`` even when nothing arrived (no branch on the count).
        source = torch.cat([received, received.new_zeros((1, received.shape[1]))])
        grouped = source.index_select(0, torch.where(is_row, gather_index, torch.full_like(gather_index,
                                                                                           num_received)))
        route = AllToAllRoute(expanded_row_idx, topk_weights, input_splits, output_splits, grouped_position,
                              topk_ids.shape[0], topk_ids.shape[1])
        return (PermuteResult(grouped, padded_sizes.to(torch.int64), GROUP_LIST_COUNT),
                self.metadata(prepare_metadata, route, received))

    def unpermute(self, mlp_output, metadata: CombineMetadata):
        route = self.check_metadata(metadata, "unpermute").route
        received_order = mlp_output.index_select(0, route.grouped_position)
        returned = all_to_all_rows(received_order, route.input_splits, route.output_splits, self.config.ep_group)
        rows = route.num_prepared_tokens * route.top_k
        # The rows of dropped entries (never read: index -1), possibly none.
        returned = torch.cat([returned, returned.new_zeros((rows - returned.shape[0], returned.shape[1]))])
        return unpermute_weighted(returned, route.expanded_row_idx, route.topk_weights)

    def finalize(self, hidden_states, metadata: CombineMetadata, reduce_results: bool = True):
        metadata = self.check_metadata(metadata, "finalize")
        if self.config.tp_size > 1:
            hidden_states = all_gather_rows(hidden_states, self.config.tp_group, backward="slice")
        return self.tie_output(hidden_states[: metadata.prepare.num_tokens], metadata)
