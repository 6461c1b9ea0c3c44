"""The one place moe_ext.parallel calls collectives.

Thin wrappers over :mod:`moe_ext.distributed.functional` (differentiable,
group ranks, one collective per call) taking a
:class:`~moe_ext.distributed.ParallelGroup`. Gradient convention (that
module's): a tensor every rank holds identically carries *one* replicated
loss, so

- an all-reduce's backward is the identity, and an all-gather whose output
  every rank then consumes identically (``replicated_output=True``: the
  output-feature gather of a column layer, the flashcomm2 token gather)
  keeps each rank's own block of its gradient;
- a replicated input that enters per-rank computation goes through
  :func:`copy_to_group` / :func:`split`, whose backward sums (gathers) the
  members' parts;
- outputs sharded over the members (column shards, reduce-scatter results,
  sequence-parallel shards) carry each member's own part of the loss.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from moe_ext.distributed import functional
from moe_ext.distributed.group import ParallelGroup

__all__ = ["copy_to_group", "split", "all_gather", "reduce_scatter", "all_reduce", "all_to_all_single",
           "max_over_group", "gather_counts"]

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def copy_to_group(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    """Identity; backward sums the gradient over the members (x replicated, used per rank)."""
    return functional.copy_to_group(x, group.device_group) if group.world_size > 1 else x


def split(x: torch.Tensor, dim: int, group: ParallelGroup) -> torch.Tensor:
    """This rank's block along ``dim`` of a replicated ``x``; backward gathers the blocks' gradients."""
    return functional.split(x, dim, group.device_group) if group.world_size > 1 else x


def all_gather(x: torch.Tensor, dim: int, group: ParallelGroup, *, replicated_output: bool = False) -> torch.Tensor:
    """Members' ``x`` concatenated along ``dim`` in group-rank order.

    Backward: reduce-scatter, or with ``replicated_output`` this rank's own block.
    """
    if group.world_size == 1:
        return x
    return functional.all_gather(x, dim, group.device_group,
                                 backward="slice" if replicated_output else "reduce_scatter")


def reduce_scatter(x: torch.Tensor, dim: int, group: ParallelGroup) -> torch.Tensor:
    """This rank's block along ``dim`` of the sum over the members (backward: all-gather)."""
    return functional.reduce_scatter(x, dim, group.device_group) if group.world_size > 1 else x


def all_reduce(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    """Sum over the members, out of place (backward: identity)."""
    return functional.all_reduce(x, group.device_group) if group.world_size > 1 else x


def all_to_all_single(x: torch.Tensor, group: ParallelGroup,
                      output_split_sizes: Optional[Sequence[int]] = None,
                      input_split_sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Rows of ``x`` exchanged along dim 0 (even splits without sizes); backward: the reverse exchange."""
    if group.world_size == 1:
        return x
    return functional.all_to_all_single(x, output_split_sizes, input_split_sizes, group.device_group)


def _count_device(pg) -> torch.device:
    # Counts travel on the CPU twin (gloo); without one, on the device group's own device.
    backend = str(dist.get_backend(pg))
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("npu")


def max_over_group(value: int, group: ParallelGroup) -> int:
    """The largest ``value`` of the members (one small all-reduce on the group's CPU twin)."""
    if group.world_size == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_count_device(group.cpu_group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group.cpu_group)
    return int(t.item())


def gather_counts(value: int, group: ParallelGroup) -> list[int]:
    """Every member's ``value``, in group-rank order (on the CPU twin)."""
    if group.world_size == 1:
        return [int(value)]
    device = _count_device(group.cpu_group)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    out = torch.empty(group.world_size, dtype=torch.int64, device=device)
    _all_gather_single(out, t, group=group.cpu_group)
    return [int(v) for v in out.tolist()]
