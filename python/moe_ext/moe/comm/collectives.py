"""The collectives the comm methods use, differentiable when autograd needs them.

Under autograd the ``torch.distributed.nn.functional`` forms are used (their
backward is the transposed collective); otherwise the plain in-place
``torch.distributed`` calls, which allocate less.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd

from moe_ext.moe.config import CommGroup

__all__ = ["all_gather_rows", "reduce_scatter_rows", "all_reduce_sum", "all_to_all_rows"]


# torch >= 2.13 renames the tensor forms; older releases only have the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _differentiable(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def all_gather_rows(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along dim 0, in rank order."""
    if group.world_size == 1:
        return x
    if _differentiable(x):
        return torch.cat(dist_autograd.all_gather(x.contiguous(), group=group.process_group), 0)
    out = x.new_empty((x.shape[0] * group.world_size, *x.shape[1:]))
    _all_gather_tensor(out, x.contiguous(), group=group.process_group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's 1/world_size slice of rows."""
    if group.world_size == 1:
        return x
    chunks = [c.contiguous() for c in x.chunk(group.world_size, 0)]
    out = x.new_empty(chunks[0].shape)
    if _differentiable(x):
        return dist_autograd.reduce_scatter(out, chunks, group=group.process_group)
    _reduce_scatter_tensor(out, x.contiguous(), group=group.process_group)
    return out


def all_reduce_sum(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    if group.world_size == 1:
        return x
    if _differentiable(x):
        return dist_autograd.all_reduce(x, group=group.process_group)
    x = x.clone()
    dist.all_reduce(x, group=group.process_group)
    return x


def all_to_all_rows(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                    group: CommGroup) -> torch.Tensor:
    """Rows ``input_splits[r]`` go to rank r; rows ``output_splits[r]`` arrive from rank r."""
    output_splits, input_splits = list(output_splits), list(input_splits)
    if group.world_size == 1:
        return x
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    if _differentiable(x):
        return dist_autograd.all_to_all_single(out, x.contiguous(), output_splits, input_splits,
                                               group=group.process_group)
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group.process_group)
    return out
