"""Top-k expert selection from router logits, with the options real MoE models use.

Each option carries the name the model configs use for it:

| option | Mixtral | Qwen2/3-MoE | DeepSeek-V3 | Llama 4 | GPT-OSS |
| --- | --- | --- | --- | --- | --- |
| ``scoring`` | softmax | softmax | sigmoid | sigmoid | softmax |
| ``renormalize`` (``norm_topk_prob``) | True | config | config | False | True |
| ``num_expert_group`` / ``topk_group`` (``n_group``) | - | - | config | - | - |
| ``group_score`` | - | - | "top2_sum" | - | - |
| ``correction_bias`` (``e_score_correction_bias``) | - | - | yes | - | - |
| ``routed_scaling_factor`` | 1 | 1 | config | 1 | 1 |

GPT-OSS takes the top-k of the (biased) logits and a softmax over those k
values; that is softmax over all experts followed by renormalisation (the
softmax is monotone and the common factor cancels), so it is ``softmax`` +
``renormalize``. The router bias itself is added to the logits by the layer.
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_ext.errors import ArgumentError, check_bool, check_choice, check_int

__all__ = ["GROUP_SCORES", "SCORINGS", "select_experts"]

SCORINGS = ("softmax", "sigmoid")
#: how a group of experts is scored in grouped top-k: its best score (DeepSeek-V2), or the sum of its
#: two best scores (DeepSeek-V3, torchtitan), both over the scores used for the choice (bias included)
GROUP_SCORES = ("max", "top2_sum")


def check_routing_options(num_experts: int, top_k: int, *, scoring: str, renormalize: bool,
                          num_expert_group: Optional[int], topk_group: Optional[int], group_score: Optional[str],
                          routed_scaling_factor: float, caller: str) -> None:
    """Raise TypeError / ArgumentError for routing options that cannot describe a router of ``num_experts``."""
    check_int(f"{caller}: top_k", top_k, minimum=1, maximum=num_experts)
    check_choice(f"{caller}: scoring", scoring, SCORINGS)
    check_bool(f"{caller}: renormalize", renormalize)
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f"{caller}: routed_scaling_factor must be a float, got "
                        f"{type(routed_scaling_factor).__name__} ({routed_scaling_factor!r})")
    if num_expert_group is None:
        if topk_group is not None or group_score is not None:
            raise ArgumentError(f"{caller}: topk_group and group_score need num_expert_group; got "
                                f"num_expert_group=None, topk_group={topk_group!r}, group_score={group_score!r}")
        return
    groups = check_int(f"{caller}: num_expert_group", num_expert_group, minimum=1, maximum=num_experts)
    if num_experts % groups:
        raise ArgumentError(f"{caller}: num_expert_group must divide the {num_experts} experts, got {groups}")
    if topk_group is None:
        raise ArgumentError(f"{caller}: topk_group must be given with num_expert_group={groups}, got None")
    check_int(f"{caller}: topk_group", topk_group, minimum=1, maximum=groups)
    if group_score is None:
        # No default on purpose: engines differ (max without a bias, top-2 sum with one), and a wrong
        # guess routes silently differently.
        raise ArgumentError(f"{caller}: group_score must be one of {list(GROUP_SCORES)} with num_expert_group "
                            f"(DeepSeek-V3 and torchtitan: 'top2_sum'; DeepSeek-V2: 'max'), got None")
    check_choice(f"{caller}: group_score", group_score, GROUP_SCORES)
    if group_score == "top2_sum" and num_experts // groups < 2:
        raise ArgumentError(f"{caller}: group_score='top2_sum' needs >= 2 experts per group, got "
                            f"{num_experts} experts in {groups} groups")


def select_experts(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
                   num_expert_group: Optional[int] = None, topk_group: Optional[int] = None,
                   group_score: Optional[str] = None, correction_bias: Optional[torch.Tensor] = None,
                   routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token. Returns ``(weights fp32 [T, K], logical ids int32 [T, K])``.

    - ``router_logits`` [T, E], any float dtype (scores are computed in fp32);
    - ``scoring``: "softmax" or "sigmoid" over the logits;
    - grouped top-k when ``num_expert_group`` is given: the experts split into
      that many equal, contiguous groups; only experts of the ``topk_group``
      best groups compete. ``group_score`` (required then) scores a group by
      its best score ("max") or the sum of its two best ("top2_sum"), computed
      on the choice scores (bias included when there is one);
    - ``correction_bias`` [E] is added to the scores for the *choice* only; the
      weights are the unbiased scores of the chosen experts;
    - ``renormalize``: weights divided by their sum; then all multiplied by
      ``routed_scaling_factor``.

    Raises TypeError / :class:`moe_ext.errors.ArgumentError` naming the bad argument.
    """
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2 \
            or not router_logits.dtype.is_floating_point:
        raise ArgumentError(f"select_experts: router_logits must be a float tensor [T, E], got "
                            f"{getattr(router_logits, 'dtype', type(router_logits).__name__)} "
                            f"{tuple(getattr(router_logits, 'shape', ()))}")
    num_experts = router_logits.shape[1]
    check_routing_options(num_experts, top_k, scoring=scoring, renormalize=renormalize,
                          num_expert_group=num_expert_group, topk_group=topk_group, group_score=group_score,
                          routed_scaling_factor=routed_scaling_factor, caller="select_experts")
    if correction_bias is not None and tuple(correction_bias.shape) != (num_experts,):
        raise ArgumentError(f"select_experts: correction_bias must have shape ({num_experts},), got "
                            f"{tuple(correction_bias.shape)}")
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    # The choice never carries gradient: only the chosen experts' weights do.
    choice = scores.detach()
    if correction_bias is not None:
        choice = choice + correction_bias.detach().float().unsqueeze(0)
    if num_expert_group is not None:
        grouped = choice.view(choice.shape[0], num_expert_group, num_experts // num_expert_group)
        if group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
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
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)
