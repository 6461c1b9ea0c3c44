"""Local token routing for the comm methods: permute by local expert, weighted unpermute.

The contract is moe_ext's routing contract (dropless, the semantics of
torch_npu's ``npu_moe_init_routing_v2``): flatten token-major, stable sort by
expert id, drop ids outside ``[0, num_local_experts)``; ``expanded_row_idx`` is
the gather form (row of each (t, k) in the permuted output, -1 if dropped).
The work is done by ``moe_ext.ops.moe_permute`` / ``moe_unpermute`` when the
op library provides them; the plain-torch path below is the same contract,
used where they are missing.
"""

from __future__ import annotations

from typing import Optional

import torch

import moe_ext.ops as moe_ops

__all__ = ["permute_by_local_expert", "unpermute_weighted", "using_native_routing_ops"]


def using_native_routing_ops() -> bool:
    return hasattr(moe_ops, "moe_permute") and hasattr(moe_ops, "moe_unpermute")


def permute_by_local_expert(hidden_states: torch.Tensor, local_ids: torch.Tensor, num_local_experts: int):
    """Group the rows of ``hidden_states`` by local expert.

    ``local_ids`` [T, K]: the local expert of each (t, k); anything outside
    ``[0, num_local_experts)`` is dropped. Returns ``(permuted [T*K, H],
    expanded_row_idx int32 [T*K], expert_tokens int64 [num_local_experts])``;
    rows of ``permuted`` past ``expert_tokens.sum()`` carry no meaning.
    """
    if using_native_routing_ops():
        ids = torch.where((local_ids >= 0) & (local_ids < num_local_experts), local_ids,
                          torch.full_like(local_ids, num_local_experts)).to(torch.int32)
        return moe_ops.moe_permute(hidden_states, ids, num_experts=num_local_experts + 1,
                                   active_expert_range=(0, num_local_experts), counts="count")
    top_k = local_ids.shape[1]
    flat = local_ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < num_local_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_local_experts))
    order = torch.sort(key, stable=True).indices
    permuted = hidden_states.index_select(0, order // top_k)
    rows = torch.empty_like(order)
    rows[order] = torch.arange(order.numel(), device=order.device)
    expanded_row_idx = torch.where(valid, rows, torch.full_like(rows, -1)).to(torch.int32)
    expert_tokens = torch.bincount(key, minlength=num_local_experts + 1)[:num_local_experts]
    return permuted, expanded_row_idx, expert_tokens


def unpermute_weighted(permuted: torch.Tensor, expanded_row_idx: torch.Tensor,
                       probs: Optional[torch.Tensor]) -> torch.Tensor:
    """``out[t] = sum_k probs[t, k] * permuted[expanded_row_idx[t*K + k]]`` (dropped rows add 0), fp32 sums."""
    if using_native_routing_ops():
        return moe_ops.moe_unpermute(permuted, expanded_row_idx, probs)
    top_k = probs.shape[1] if probs is not None else 1
    index = expanded_row_idx.to(torch.int64)
    valid = (index >= 0).unsqueeze(1)
    gathered = permuted.index_select(0, index.clamp_min(0)).float()
    # where, not a multiply: rows that were never computed may hold NaN.
    gathered = torch.where(valid, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))
    gathered = gathered.view(-1, top_k, permuted.shape[1])
    if probs is not None:
        gathered = gathered * probs.float().unsqueeze(2)
    return gathered.sum(1).to(permuted.dtype)
