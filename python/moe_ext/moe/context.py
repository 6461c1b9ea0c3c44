"""Per-forward facts every comm method needs, computed once and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from moe_ext.moe.config import MoEConfig

__all__ = ["ForwardContext", "build_forward_context"]


@dataclass
class ForwardContext:
    """Token counts of one forward pass.

    - ``num_tokens``: tokens this rank holds (identical on the ranks of one TP group);
    - ``max_tokens_across_dp``: the largest ``num_tokens`` of the DP group (the
      all-gather paths pad every rank to it);
    - ``padded_num_tokens``: ``max_tokens_across_dp`` rounded up to a multiple of
      ``tp_size`` and at least ``tp_size``, so that every EP rank hands MC2 the
      same batch size and every TP rank gets an equal, non-empty share;
    - ``mc2_mask``: bool [padded_num_tokens], True for this rank's real tokens
      (all trues first, as MC2's ``x_active_mask`` requires).
    """

    num_tokens: int
    max_tokens_across_dp: int
    padded_num_tokens: int
    mc2_mask: torch.Tensor

    def __post_init__(self) -> None:
        if not 0 <= self.num_tokens <= self.max_tokens_across_dp <= self.padded_num_tokens:
            raise ValueError("ForwardContext: need 0 <= num_tokens <= max_tokens_across_dp <= padded_num_tokens, got "
                             f"{self.num_tokens}, {self.max_tokens_across_dp}, {self.padded_num_tokens}")
        if tuple(self.mc2_mask.shape) != (self.padded_num_tokens,) or self.mc2_mask.dtype != torch.bool:
            raise ValueError(f"ForwardContext: mc2_mask must be bool [{self.padded_num_tokens}], got "
                             f"{self.mc2_mask.dtype} {tuple(self.mc2_mask.shape)}")


def build_forward_context(config: MoEConfig, num_tokens: int, device: torch.device | str = "cpu",
                          max_tokens_across_dp: Optional[int] = None) -> ForwardContext:
    """The context of a forward pass over ``num_tokens`` local tokens.

    Without ``max_tokens_across_dp`` it is found with one all-reduce (max) over
    the DP group; engines that already know it (from their scheduler) pass it
    and skip the collective.
    """
    if num_tokens < 0:
        raise ValueError(f"build_forward_context: num_tokens must be >= 0, got {num_tokens}")
    if max_tokens_across_dp is None:
        max_tokens_across_dp = num_tokens
        if config.dp_size > 1:
            # The count travels on the collective's own device (NCCL needs CUDA tensors).
            count_device = device if torch.device(device).type != "cpu" else "cpu"
            count = torch.tensor([num_tokens], dtype=torch.int64, device=count_device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=config.dp_group.process_group)
            max_tokens_across_dp = int(count.item())
    tp = config.tp_size
    padded = max(tp, (max_tokens_across_dp + tp - 1) // tp * tp)
    mask = torch.arange(padded, device=device) < num_tokens
    return ForwardContext(num_tokens, max_tokens_across_dp, padded, mask)
