"""A single-process dense MoE: the oracle the expert-parallel layer is checked against.

Loops over tokens and their chosen experts, in fp32, with its own routing
(written out per token, independent of :func:`moe_ext.moe.select_experts`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["dense_routing", "dense_moe", "dense_moe_batched"]


def dense_routing(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
                  num_expert_group: Optional[int] = None, topk_group: Optional[int] = None,
                  group_score: Optional[str] = None, correction_bias: Optional[torch.Tensor] = None, routed_scaling_factor: float = 1.0):
    """Per-token routing: ``(experts list, weights tensor [top_k])`` for each token.

    ``group_score`` ("max" or "top2_sum") is required with ``num_expert_group``.
    """
    if num_expert_group is not None and group_score not in ("max", "top2_sum"):
        raise ValueError(f"dense_routing: group_score must be 'max' or 'top2_sum' with num_expert_group, "
                         f"got {group_score!r}")
    routes = []
    for logits in router_logits.float():
        plain = logits.detach()
        scores = logits.softmax(0) if scoring == "softmax" else logits.sigmoid()
        choice = (plain.softmax(0) if scoring == "softmax" else plain.sigmoid()) + (
            correction_bias.float() if correction_bias is not None else 0)
        candidates = list(range(len(scores)))
        if num_expert_group is not None:
            group_size = len(scores) // num_expert_group
            def score_of_group(g):
                members = sorted(choice[g * group_size:(g + 1) * group_size].tolist(), reverse=True)
                return sum(members[:2]) if group_score == "top2_sum" else members[0]
            groups = sorted(range(num_expert_group), key=score_of_group, reverse=True)[:topk_group]
            candidates = [e for e in candidates if e // group_size in groups]
        chosen = sorted(candidates, key=lambda e: float(choice[e]), reverse=True)[:top_k]
        weights = torch.stack([scores[e] for e in chosen])
        if renormalize:
            weights = weights / weights.sum()
        routes.append((chosen, weights * routed_scaling_factor))
    return routes


def dense_moe(hidden_states: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              top_k: int, **routing) -> torch.Tensor:
    """``sum_k weight_k * SwiGLU-MLP_{e_k}(x)`` per token, fp32 inside, output in the input's dtype.

    ``w13`` [E, H, 2I] (gate | up), ``w2`` [E, I, H]; ``routing``: the keyword
    arguments of :func:`dense_routing`.
    """
    logits = hidden_states.to(gate_weight.dtype) @ gate_weight.t()
    rows = []
    for t, (experts, weights) in enumerate(dense_routing(logits, top_k, **routing)):
        x = hidden_states[t].float()
        row = torch.zeros_like(x)
        for expert, weight in zip(experts, weights):
            gate, up = (x @ w13[expert].float()).chunk(2)
            row = row + weight * ((F.silu(gate) * up) @ w2[expert].float())
        rows.append(row)
    if not rows:
        return hidden_states.new_zeros(hidden_states.shape)
    return torch.stack(rows).to(hidden_states.dtype)


def dense_moe_batched(hidden_states: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
                      num_expert_group: Optional[int] = None, topk_group: Optional[int] = None,
                      group_score: Optional[str] = None, correction_bias: Optional[torch.Tensor] = None,
                      routed_scaling_factor: float = 1.0) -> torch.Tensor:
    """:func:`dense_moe` computed with whole-batch tensor ops: one loop over experts, none over tokens.

    Same contract and routing rules as :func:`dense_moe` (tested against it); fast
    enough on a GPU that a check of every token does not dominate a step. Shapes:
    ``hidden_states`` [T, H], ``gate_weight`` [E, H], ``w13`` [E, H, 2I], ``w2``
    [E, I, H]; fp32 inside, output [T, H] in the input's dtype. Ties between equal
    scores may resolve differently from the per-token version (measure zero for
    continuous inputs). One host sync (the per-expert token counts).
    """
    logits = (hidden_states.to(gate_weight.dtype) @ gate_weight.t()).float()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores + (correction_bias.float() if correction_bias is not None else 0)
    tokens, experts = choice.shape
    if num_expert_group is not None:
        if group_score not in ("max", "top2_sum"):
            raise ValueError(f"dense_moe_batched: group_score must be 'max' or 'top2_sum' with num_expert_group, "
                             f"got {group_score!r}")
        group_size = experts // num_expert_group
        grouped = choice.view(tokens, num_expert_group, group_size)
        if group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(-1).values
        keep = torch.zeros(tokens, num_expert_group, dtype=torch.bool, device=choice.device)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(group_size, dim=1), float("-inf"))
    chosen = choice.topk(top_k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, chosen)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * routed_scaling_factor

    x = hidden_states.float()
    out = torch.zeros_like(x)
    flat = chosen.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=experts).tolist()
    token_of = order // top_k
    weight_of = weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start:start + count]
        gate, up = (x[rows] @ w13[expert].float()).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[expert].float()
        out.index_add_(0, rows, y * weight_of[start:start + count, None])
        start += count
    return out.to(hidden_states.dtype)
