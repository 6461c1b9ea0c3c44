"""A comm method that moves nothing: shapes only, for dummy and profiling runs."""

from __future__ import annotations

from typing import Optional

import torch

from moe_ext.moe.comm.base import (GROUP_LIST_COUNT, CombineMetadata, MoECommMethod, PermuteResult, Prepared,
                                   PrepareMetadata)
from moe_ext.moe.comm.collectives import forward_only
from moe_ext.moe.context import ForwardContext

__all__ = ["DummyCommImpl"]


class DummyCommImpl(MoECommMethod):
    """Returns tensors of the right shapes without communicating or routing.

    ``permute`` gives every local expert zero rows, so the experts compute
    nothing; ``unpermute`` returns zeros: the layer output is all zeros. Used
    for warm-up and memory-profiling runs where the other ranks may not be in
    step. Forward only: a backward through its output raises
    :class:`~moe_ext.moe.comm.collectives.ForwardOnlyError` naming the method.
    """

    name = "dummy"

    def prepare(self, hidden_states, topk_ids, topk_weights, context: ForwardContext) -> Prepared:
        metadata = PrepareMetadata(hidden_states.shape[0], forward_inputs=(hidden_states, topk_weights))
        return Prepared(hidden_states, topk_ids, topk_weights, metadata)

    def permute(self, prepared: Prepared, expert_map: Optional[torch.Tensor] = None):
        hidden_states, topk_ids, _, prepare_metadata = prepared
        rows = hidden_states.repeat_interleave(topk_ids.shape[1], dim=0)
        counts = torch.zeros(self.config.num_local_experts, dtype=torch.int64, device=hidden_states.device)
        # route: the shape unpermute returns
        return PermuteResult(rows, counts, GROUP_LIST_COUNT), self.metadata(prepare_metadata,
                                                                           tuple(hidden_states.shape))

    def unpermute(self, mlp_output, metadata: CombineMetadata):
        return mlp_output.new_zeros(self.check_metadata(metadata, "unpermute").route)

    def finalize(self, hidden_states, metadata: CombineMetadata, reduce_results: bool = True):
        prepared = self.check_metadata(metadata, "finalize").prepare
        return forward_only(hidden_states[: prepared.num_tokens], self.name, prepared.forward_inputs)
