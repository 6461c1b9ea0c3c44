"""Top-k expert selection from router logits: softmax or sigmoid scores, grouped top-k, renormalisation."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["select_experts"]


def select_experts(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
                   num_expert_group: Optional[int] = None, topk_group: Optional[int] = None,
                   correction_bias: Optional[torch.Tensor] = None,
                   routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token. Returns ``(weights fp32 [T, K], ids int32 [T, K])``.

    - ``scoring``: "softmax" or "sigmoid" over the logits (computed in fp32);
    - grouped top-k (DeepSeek style) when ``num_expert_group`` is given: experts
      split into that many equal groups; only experts of the ``topk_group`` best
      groups compete. A group's score is the sum of its two best scores when a
      ``correction_bias`` is given (DeepSeek-V3), else its best score (V2);
    - ``correction_bias`` [E] is added to the scores for the *choice* only; the
      weights are the unbiased scores of the chosen experts;
    - ``renormalize``: weights divided by their sum; then multiplied by
      ``routed_scaling_factor``.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"select_experts: router_logits must be [T, E], got {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"select_experts: top_k must be in [1, {num_experts}], got {top_k}")
    logits = router_logits.float()
    if scoring == "softmax":
        scores = logits.softmax(dim=-1)
    elif scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"select_experts: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    choice = scores if correction_bias is None else scores + correction_bias.float().unsqueeze(0)
    if num_expert_group is not None:
        if num_experts % num_expert_group or topk_group is None or not 1 <= topk_group <= num_expert_group:
            raise ValueError(f"select_experts: num_expert_group must divide {num_experts} and topk_group be in "
                             f"[1, num_expert_group]; got {num_expert_group}, {topk_group}")
        grouped = choice.view(choice.shape[0], num_expert_group, num_experts // num_expert_group)
        if correction_bias is not None:
            group_scores = grouped.topk(min(2, grouped.shape[2]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        best_groups = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * routed_scaling_factor, ids.to(torch.int32)
