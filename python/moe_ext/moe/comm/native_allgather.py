"""The all-gather method in plain torch ops: the reference the others are checked against."""

from __future__ import annotations

from typing import Optional

import torch

from moe_ext.moe.comm.allgather import AllGatherCommImpl
from moe_ext.moe.comm.base import GROUP_LIST_COUNT, PermuteResult

__all__ = ["NativeAllGatherCommImpl"]


class NativeAllGatherCommImpl(AllGatherCommImpl):
    """Same communication as :class:`AllGatherCommImpl`; routing in plain torch.

    permute: stable sort of the flattened (t, k) entries by local expert
    (remote entries last), gather the rows. unpermute: weight each row and
    ``index_add`` it into its token in fp32. No custom op anywhere, so it runs
    wherever torch does.
    """

    name = "native_allgather"

    def __init__(self, config, npu=None):
        super().__init__(config, npu=None)

    def permute(self, hidden_states, topk_ids, topk_weights, expert_map: Optional[torch.Tensor] = None):
        num_local = self.config.num_local_experts
        top_k = topk_ids.shape[1]
        self.num_prepared_tokens = hidden_states.shape[0]
        local_flat = self.local_expert_ids(topk_ids, expert_map).reshape(-1)
        is_local = local_flat >= 0
        sort_key = torch.where(is_local, local_flat, torch.full_like(local_flat, num_local))
        order = torch.sort(sort_key, stable=True).indices
        self.sorted_token_indices = order // top_k
        weights_flat = topk_weights.reshape(-1)
        self.sorted_weights = torch.where(is_local, weights_flat, torch.zeros_like(weights_flat))[order]
        self.sorted_is_local = is_local[order]
        expert_tokens = torch.zeros(num_local + 1, dtype=torch.int64, device=hidden_states.device)
        expert_tokens.scatter_add_(0, sort_key, torch.ones_like(sort_key))
        permuted = hidden_states.index_select(0, self.sorted_token_indices)
        return PermuteResult(permuted, expert_tokens[:num_local], GROUP_LIST_COUNT)

    def unpermute(self, mlp_output):
        weighted = mlp_output.float() * self.sorted_weights.float().unsqueeze(1)
        # Rows of remote entries were never computed: drop them with where (NaN-safe).
        weighted = torch.where(self.sorted_is_local.unsqueeze(1), weighted, torch.zeros_like(weighted))
        out = weighted.new_zeros((self.num_prepared_tokens, mlp_output.shape[1]))
        out = out.index_add(0, self.sorted_token_indices, weighted)
        return out.to(mlp_output.dtype)
