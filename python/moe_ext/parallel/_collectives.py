"""The one place moe_ext.parallel calls collectives.

Every op of the package communicates through these four functions, which take
a :class:`~moe_ext.distributed.ParallelGroup` (a group of one member returns
its input, without communication) and are differentiable: the backward of an
all-gather is a reduce-scatter and so on. They delegate to
``moe_ext.distributed.functional`` when it is installed (the MoE-backward
issue's differentiable collectives on a plain ``ProcessGroup``); until then a
small private fallback with the same conventions is used.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from moe_ext.distributed.group import ParallelGroup

try:  # pragma: no cover - which branch runs depends on the checkout
    from moe_ext.distributed import functional as _functional
except ImportError:  # pragma: no cover
    _functional = None

__all__ = ["copy_to_group", "all_gather", "reduce_scatter", "all_reduce", "all_to_all_single", "max_over_group", "gather_counts"]

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather0(x: torch.Tensor, pg) -> torch.Tensor:
    world = dist.get_world_size(pg)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=pg)
    return out


def _scatter0(x: torch.Tensor, pg) -> torch.Tensor:
    world = dist.get_world_size(pg)
    out = x.new_empty((x.shape[0] // world,) + tuple(x.shape[1:]))
    _reduce_scatter_single(out, x.contiguous(), group=pg)
    return out


class _AllGather0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg = pg
        return _gather0(x, pg)

    @staticmethod
    def backward(ctx, grad):
        return _scatter0(grad, ctx.pg), None


class _ReduceScatter0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg = pg
        return _scatter0(x, pg)

    @staticmethod
    def backward(ctx, grad):
        return _gather0(grad, ctx.pg), None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg = pg
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=pg)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=ctx.pg)
        return out, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_split_sizes, input_split_sizes, pg):
        ctx.pg, ctx.splits = pg, (output_split_sizes, input_split_sizes)
        rows = sum(output_split_sizes) if output_split_sizes is not None else x.shape[0]
        out = x.new_empty((rows,) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes, input_split_sizes, group=pg)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_split_sizes, input_split_sizes = ctx.splits
        return _AllToAll.apply(grad, input_split_sizes, output_split_sizes, ctx.pg), None, None, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg = pg
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=ctx.pg)
        return out, None


def copy_to_group(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    """Identity forward; backward sums the gradient over the members.

    For an input that every member holds whole (replicated) and uses for its
    own shard of the output: its gradient is the sum of the members' parts.
    Costs nothing when autograd does not record the call.
    """
    if group.world_size == 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _CopyToGroup.apply(x, group.device_group)


def all_gather(x: torch.Tensor, dim: int, group: ParallelGroup) -> torch.Tensor:
    """Members' ``x`` concatenated along ``dim`` in group-rank order (backward: reduce-scatter)."""
    if group.world_size == 1:
        return x
    if _functional is not None:
        return _functional.all_gather(x, dim, group.device_group)
    dim = dim % x.dim()
    gathered = _AllGather0.apply(x.movedim(dim, 0), group.device_group)
    return gathered.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, dim: int, group: ParallelGroup) -> torch.Tensor:
    """This rank's slice along ``dim`` of the sum over the members (backward: all-gather)."""
    if group.world_size == 1:
        return x
    if _functional is not None:
        return _functional.reduce_scatter(x, dim, group.device_group)
    dim = dim % x.dim()
    return _ReduceScatter0.apply(x.movedim(dim, 0), group.device_group).movedim(0, dim)


def all_reduce(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    """Sum over the members, out of place (backward: all-reduce)."""
    if group.world_size == 1:
        return x
    if _functional is not None:
        return _functional.all_reduce(x, group.device_group)
    return _AllReduce.apply(x, group.device_group)


def all_to_all_single(x: torch.Tensor, group: ParallelGroup,
                      output_split_sizes: Optional[Sequence[int]] = None,
                      input_split_sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Rows of ``x`` exchanged along dim 0 (even splits without sizes); backward: the reverse exchange."""
    if group.world_size == 1:
        return x
    outs = list(output_split_sizes) if output_split_sizes is not None else None
    ins = list(input_split_sizes) if input_split_sizes is not None else None
    if _functional is not None:
        return _functional.all_to_all_single(x, outs, ins, group.device_group)
    return _AllToAll.apply(x, outs, ins, group.device_group)


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
