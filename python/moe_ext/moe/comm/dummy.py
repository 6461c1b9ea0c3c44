"""A comm method that moves nothing: shapes only, for dummy and profiling runs."""

from __future__ import annotations

from typing import Optional

import torch

from moe_ext.moe.comm.base import GROUP_LIST_COUNT, MoECommMethod, PermuteResult
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

    def prepare(self, hidden_states, topk_ids, topk_weights, context: ForwardContext):
        self.num_tokens = hidden_states.shape[0]
        self.forward_inputs = (hidden_states, topk_weights)
        return hidden_states, topk_ids, topk_weights

    def permute(self, hidden_states, topk_ids, topk_weights, expert_map: Optional[torch.Tensor] = None):
        self.hidden_shape = hidden_states.shape
        rows = hidden_states.repeat_interleave(topk_ids.shape[1], dim=0)
        counts = torch.zeros(self.config.num_local_experts, dtype=torch.int64, device=hidden_states.device)
        return PermuteResult(rows, counts, GROUP_LIST_COUNT)

    def unpermute(self, mlp_output):
        return mlp_output.new_zeros(self.hidden_shape)

    def finalize(self, hidden_states, reduce_results: bool = True):
        inputs, self.forward_inputs = self.forward_inputs, ()
        return forward_only(hidden_states[: self.num_tokens], self.name, inputs)
