"""A single-process dense MoE: the oracle the expert-parallel layer is checked against.

Loops over tokens and their chosen experts, in fp32, with its own routing
(written out per token, independent of :func:`moe_ext.moe.select_experts`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["dense_routing", "dense_moe"]


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
