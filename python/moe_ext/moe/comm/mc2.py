"""MC2: torch_npu's fused dispatch/combine collectives (Ascend only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from moe_ext.moe.comm.base import (GROUP_LIST_COUNT, CombineMetadata, MoECommMethod, PermuteResult, Prepared,
                                   PrepareMetadata)
from moe_ext.moe.comm.collectives import all_gather_rows, forward_only
from moe_ext.moe.config import MoEConfig
from moe_ext.moe.context import ForwardContext
from moe_ext.platform import npu as npu_adapter

__all__ = ["MC2CommImpl", "MC2Route"]


@dataclass(frozen=True)
class MC2Route:
    """One call's dispatch (``CombineMetadata.route`` of MC2): the weights combine applies
    [P, K] and the operator's own outputs combine must be given back (:class:`DispatchState`)."""

    topk_weights: torch.Tensor
    state: npu_adapter.DispatchState


class MC2CommImpl(MoECommMethod):
    """Dispatch with ``npu_moe_distribute_dispatch[_v2]``, combine with ``..._combine[_v2]``.

    prepare: pad to ``context.padded_num_tokens`` (MC2 needs the same batch
    size on every EP rank) and, with TP, keep this rank's 1/tp share of the
    tokens and of the active mask. Padding rows get distinct valid experts;
    on A3 with the v2 operators the mask keeps them from being sent at all.
    finalize: all-gather the TP shares, unpad. Forward only (inference): a
    backward through its output raises
    :class:`~moe_ext.moe.comm.collectives.ForwardOnlyError` naming the method.
    """

    name = "mc2"

    def __init__(self, config: MoEConfig, npu: npu_adapter.NpuRuntime):
        super().__init__(config)
        if npu is None:
            raise ValueError("MC2CommImpl: npu must be an NpuRuntime (torch_npu or its emulation), got None")
        if config.ep_size < 2:
            raise ValueError(f"MC2CommImpl: needs an EP group of at least 2 ranks, got ep_size={config.ep_size}")
        self.npu = npu
        group = config.mc2_group
        self.comm_name = npu_adapter.hccl_comm_name(npu, group.process_group)  # this process's global rank

    def prepare(self, hidden_states, topk_ids, topk_weights, context: ForwardContext) -> Prepared:
        num_tokens = hidden_states.shape[0]
        forward_inputs = (hidden_states, topk_weights)
        pad = context.padded_num_tokens - num_tokens
        mask = context.mc2_mask
        if pad > 0:
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad))
            padding_ids = self.padding_expert_ids(pad, topk_ids.device).to(topk_ids.dtype)
            topk_ids = torch.cat([topk_ids, padding_ids])
            topk_weights = F.pad(topk_weights, (0, 0, 0, pad))
        tp = self.config.tp_size
        if tp > 1:
            rank = self.config.tp_rank
            hidden_states = hidden_states.chunk(tp)[rank]
            topk_ids, topk_weights, mask = topk_ids.chunk(tp)[rank], topk_weights.chunk(tp)[rank], mask.chunk(tp)[rank]
        return Prepared(hidden_states, topk_ids, topk_weights,
                        PrepareMetadata(num_tokens, active_mask=mask, forward_inputs=forward_inputs))

    def permute(self, prepared: Prepared, expert_map: Optional[torch.Tensor] = None):
        if expert_map is not None:
            raise ValueError("MC2CommImpl.permute: expert_map must be None: MC2 routes slot s to rank "
                             "s // num_local_experts")
        hidden_states, topk_ids, topk_weights, prepare_metadata = prepared
        rows, expert_tokens, state = npu_adapter.distribute_dispatch(
            self.npu, hidden_states, topk_ids, active_mask=prepare_metadata.active_mask,
            expert_weights=topk_weights, **self._group_kwargs())
        return (PermuteResult(rows, expert_tokens, GROUP_LIST_COUNT),
                self.metadata(prepare_metadata, MC2Route(topk_weights, state)))

    def unpermute(self, mlp_output, metadata: CombineMetadata):
        route = self.check_metadata(metadata, "unpermute").route
        return npu_adapter.distribute_combine(self.npu, mlp_output, route.topk_weights, route.state,
                                              **self._group_kwargs())

    def finalize(self, hidden_states, metadata: CombineMetadata, reduce_results: bool = True):
        prepared = self.check_metadata(metadata, "finalize").prepare
        if self.config.tp_size > 1:
            hidden_states = all_gather_rows(hidden_states, self.config.tp_group)
        return forward_only(hidden_states[: prepared.num_tokens], self.name, prepared.forward_inputs)

    def _group_kwargs(self) -> dict:
        config = self.config
        return dict(comm_name=self.comm_name, ep_world_size=config.ep_size, ep_rank_id=config.ep_rank,
                    moe_expert_num=config.num_physical_experts)
