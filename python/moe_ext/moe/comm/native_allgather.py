"""The all-gather method in plain torch ops: the reference the others are checked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moe_ext.moe.comm.allgather import AllGatherCommImpl
from moe_ext.moe.comm.base import GROUP_LIST_COUNT, CombineMetadata, PermuteResult, Prepared

__all__ = ["NativeAllGatherCommImpl", "NativeAllGatherRoute"]


@dataclass(frozen=True)
class NativeAllGatherRoute:
    """One call's permutation (``CombineMetadata.route`` of the native all-gather method).

    Over the P*K (token, k) entries in sorted order: ``sorted_token_indices``
    int64 (the token of each row), ``sorted_weights`` (0 for remote entries),
    ``sorted_is_local`` bool; ``num_prepared_tokens`` = P.
    """

    sorted_token_indices: torch.Tensor
    sorted_weights: torch.Tensor
    sorted_is_local: torch.Tensor
    num_prepared_tokens: int


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

    def permute(self, prepared: Prepared, expert_map: Optional[torch.Tensor] = None):
        hidden_states, topk_ids, topk_weights, prepare_metadata = prepared
        num_local = self.config.num_local_experts
        top_k = topk_ids.shape[1]
        local_flat = self.local_expert_ids(topk_ids, expert_map).reshape(-1)
        is_local = local_flat >= 0
        sort_key = torch.where(is_local, local_flat, torch.full_like(local_flat, num_local))
        order = torch.sort(sort_key, stable=True).indices
        sorted_token_indices = order // top_k
        weights_flat = topk_weights.reshape(-1)
        route = NativeAllGatherRoute(
            sorted_token_indices, torch.where(is_local, weights_flat, torch.zeros_like(weights_flat))[order],
            is_local[order], hidden_states.shape[0])
        expert_tokens = torch.zeros(num_local + 1, dtype=torch.int64, device=hidden_states.device)
        expert_tokens.scatter_add_(0, sort_key, torch.ones_like(sort_key))
        permuted = hidden_states.index_select(0, sorted_token_indices)
        return (PermuteResult(permuted, expert_tokens[:num_local], GROUP_LIST_COUNT),
                self.metadata(prepare_metadata, route))

    def unpermute(self, mlp_output, metadata: CombineMetadata):
        route = self.check_metadata(metadata, "unpermute").route
        weighted = mlp_output.float() * route.sorted_weights.float().unsqueeze(1)
        # Rows of remote entries were never computed: drop them with where (NaN-safe).
        weighted = torch.where(route.sorted_is_local.unsqueeze(1), weighted, torch.zeros_like(weighted))
        out = weighted.new_zeros((route.num_prepared_tokens, mlp_output.shape[1]))
        out = out.index_add(0, route.sorted_token_indices, weighted)
        return out.to(mlp_output.dtype)
