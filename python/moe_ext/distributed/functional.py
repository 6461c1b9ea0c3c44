"""Differentiable collectives on any process group: moe_ext's own, correct on subgroups.

Every function takes ``group`` as

- a ``torch.distributed`` ProcessGroup (a DeviceMesh's ``get_group()`` result
  is one), or ``None`` for the default (world) group;
- a :class:`moe_ext.distributed.ParallelGroup` (its ``device_group`` is used);
- a :class:`moe_ext.moe.CommGroup` (its ``process_group``; a CommGroup of one
  rank with no process group communicates nothing);
- a one-dimensional ``DeviceMesh`` (its ``get_group()``).

and works on gloo, NCCL and (the same code path, not run here) HCCL. Ranks
are always *group* ranks: block ``i`` of a gathered tensor is the
contribution of group rank ``i``; nothing converts between group and global
ranks (``torch.distributed.nn.functional.all_gather`` does, wrongly, on gloo
subgroups: its backward passes a group rank where a global one is expected).

Backward semantics. Each function's backward is the *adjoint* of its forward
under the convention that the quantity being differentiated is the sum of
every rank's objective, with one exception spelled out at :func:`all_reduce`:

=====================  ==========================================  ==========================
function               forward                                      backward
=====================  ==========================================  ==========================
all_gather             concat every rank's ``x`` along ``dim``      reduce-scatter (sum, own block)
                       (``backward="slice"``: the output is          (``"slice"``: own block of
                       consumed identically on every rank)           the gradient, no communication)
reduce_scatter         sum over ranks, own block along ``dim``      all-gather
all_reduce             sum over ranks                               identity (default) or all-reduce
all_to_all_single      rows ``input_split_sizes[r]`` to rank r       the reverse all-to-all
split                  own block along ``dim`` (of a replicated x)  all-gather
copy_to_group          identity (``x`` replicated on every rank)     all-reduce
=====================  ==========================================  ==========================

Every rank enters the same collectives. The forward enters exactly one
collective per call whatever the data (zero-size tensors included: a
collective of zero elements is still entered, never skipped), skipping it
only for a group of one rank, a fact every rank agrees on. The backward is
an autograd node created whenever grad mode is on and the input requires
grad; it enters exactly the reverse collective whenever autograd reaches it,
with zeros when the gradient of the output is undefined. So the backward
collectives of a rank are a function of (grad mode, ``requires_grad`` of the
inputs, which outputs reach the loss), never of tensor values. The callers'
part of the contract: ``requires_grad`` agrees across the group, and every
differentiable output stays connected to the loss on every rank (the MoE
comm methods guarantee the last with :func:`moe_ext.moe.comm.collectives.tie`, see
there).

Shapes: ``all_gather``, ``reduce_scatter``, ``all_reduce``, ``split`` and
``copy_to_group`` need the same shape and dtype on every rank (a mismatch is a
backend error: gloo raises or aborts on size mismatch); ``all_to_all_single``
needs matching split sizes (rank ``r``'s ``output_split_sizes[s]`` equals
rank ``s``'s ``input_split_sizes[r]``). Arguments checked locally raise
:class:`moe_ext.errors.ArgumentError` or ``TypeError`` before any collective.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from moe_ext.errors import ArgumentError, check_choice, check_int

__all__ = ["all_gather", "reduce_scatter", "all_reduce", "all_to_all_single", "split", "copy_to_group",
           "resolve_group", "group_size", "group_rank"]

# torch >= 2.13 renames the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ----------------------------------------------------------------------------------- groups

def resolve_group(group: Any) -> Optional[dist.ProcessGroup]:
    """The ProcessGroup behind ``group`` (see the module docstring), or None for a group of one.

    Raises TypeError for anything else, ArgumentError when this rank is not a
    member, RuntimeError when torch.distributed is not initialised and a
    process group is needed.
    """
    if group is not None and not isinstance(group, dist.ProcessGroup):
        if hasattr(group, "device_group"):  # moe_ext.distributed.ParallelGroup
            group = group.device_group
        elif hasattr(group, "process_group") and hasattr(group, "world_size"):  # moe_ext.moe.CommGroup
            if group.process_group is None:
                return None
            group = group.process_group
        elif hasattr(group, "get_group") and hasattr(group, "mesh"):  # DeviceMesh
            if group.ndim != 1:
                raise ArgumentError(f"group: a DeviceMesh must be one-dimensional here (pass "
                                    f"mesh.get_group(dim)), got a {group.ndim}-d mesh")
            group = group.get_group()
        else:
            raise TypeError(f"group must be a ProcessGroup, ParallelGroup, CommGroup, 1-d DeviceMesh or "
                            f"None, got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("moe_ext.distributed.functional: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ArgumentError(f"group: this process (global rank {dist.get_rank()}) is not a member of "
                            f"the group")
    return group


def group_size(group: Any) -> int:
    """Number of ranks of ``group`` (1 for a CommGroup of one)."""
    pg = resolve_group(group)
    return 1 if pg is None else dist.get_world_size(pg)


def group_rank(group: Any) -> int:
    """This process's rank *in* ``group`` (0 for a CommGroup of one)."""
    pg = resolve_group(group)
    return 0 if pg is None else dist.get_rank(pg)


def _size_rank(pg: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    return (1, 0) if pg is None else (dist.get_world_size(pg), dist.get_rank(pg))


def _check_tensor(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    return x


def _dim(op: str, x: torch.Tensor, dim: Any) -> int:
    dim = check_int(f"{op}: dim", dim)
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ArgumentError(f"{op}: dim must be in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, got {dim}")
    return dim % x.dim()


# ------------------------------------------------------------------- plain (no autograd) forms

def _gather(x: torch.Tensor, dim: int, pg: dist.ProcessGroup, size: int) -> torch.Tensor:
    stacked = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * stacked.shape[0],) + tuple(stacked.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, stacked, group=pg)
    # [size * d, rest] along the moved dim -> back in place: rank blocks stay contiguous along dim.
    return out.movedim(0, dim).contiguous() if dim else out


def _scatter_sum(x: torch.Tensor, dim: int, pg: dist.ProcessGroup, size: int) -> torch.Tensor:
    stacked = x.movedim(dim, 0).contiguous()
    out = torch.empty((stacked.shape[0] // size,) + tuple(stacked.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, stacked, group=pg)
    return out.movedim(0, dim).contiguous() if dim else out


def _sum(x: torch.Tensor, pg: dist.ProcessGroup) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=pg)
    return out


def _exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
              pg: dist.ProcessGroup) -> torch.Tensor:
    out = torch.empty((sum(output_splits),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=pg)
    return out


def _block(x: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    return x.chunk(size, dim)[rank].contiguous() if x.shape[dim] else x.narrow(dim, 0, 0).contiguous()


# ----------------------------------------------------------------------- autograd functions

class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, pg, size, rank, slice_backward):
        ctx.dim, ctx.pg, ctx.size, ctx.rank, ctx.slice_backward = dim, pg, size, rank, slice_backward
        return _gather(x, dim, pg, size)

    @staticmethod
    def backward(ctx, grad):
        if ctx.slice_backward:
            return _block(grad, ctx.dim, ctx.size, ctx.rank), None, None, None, None, None
        return _scatter_sum(grad, ctx.dim, ctx.pg, ctx.size), None, None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, pg, size):
        ctx.dim, ctx.pg, ctx.size = dim, pg, size
        return _scatter_sum(x, dim, pg, size)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.pg, ctx.size), None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, sum_backward):
        ctx.pg, ctx.sum_backward = pg, sum_backward
        return _sum(x, pg)

    @staticmethod
    def backward(ctx, grad):
        return (_sum(grad, ctx.pg) if ctx.sum_backward else grad), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, pg):
        ctx.output_splits, ctx.input_splits, ctx.pg = output_splits, input_splits, pg
        return _exchange(x, output_splits, input_splits, pg)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.input_splits, ctx.output_splits, ctx.pg), None, None, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, pg, size, rank):
        ctx.dim, ctx.pg, ctx.size = dim, pg, size
        return _block(x, dim, size, rank)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.pg, ctx.size), None, None, None, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg = pg
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _sum(grad, ctx.pg), None


# ------------------------------------------------------------------------------- public API

def all_gather(x: torch.Tensor, dim: int = 0, group: Any = None, *, backward: str = "reduce_scatter") -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in group-rank order.

    ``x``: any shape and dtype, the same on every rank; returns ``x``'s shape
    with ``size(dim)`` multiplied by the group size, on ``x``'s device.
    Backward (``backward``):

    - ``"reduce_scatter"`` (default): the gradient is summed over the ranks and
      each rank keeps its own block: the exact adjoint when each rank consumes
      the gathered tensor differently (sequence parallelism, expert
      parallelism: each rank's experts see every token);
    - ``"slice"``: each rank keeps its own block of its own gradient, no
      communication: for a gathered tensor that every rank then consumes
      identically (the loss computed once per replica, tensor parallelism's
      output gather).

    A group of one returns ``x`` itself.
    """
    x = _check_tensor("all_gather", x)
    dim = _dim("all_gather", x, dim)
    check_choice("all_gather: backward", backward, ("reduce_scatter", "slice"))
    pg = resolve_group(group)
    size, rank = _size_rank(pg)
    if size == 1:
        return x
    return _AllGather.apply(x, dim, pg, size, rank, backward == "slice")


def reduce_scatter(x: torch.Tensor, dim: int = 0, group: Any = None) -> torch.Tensor:
    """Block ``group_rank`` along ``dim`` of the sum of ``x`` over the group.

    ``x.size(dim)`` must be a multiple of the group size (ArgumentError
    otherwise); shapes equal on every rank. Backward: all-gather of the
    gradient (each rank's block goes to every rank). A group of one returns
    ``x`` itself.
    """
    x = _check_tensor("reduce_scatter", x)
    dim = _dim("reduce_scatter", x, dim)
    pg = resolve_group(group)
    size, _ = _size_rank(pg)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ArgumentError(f"reduce_scatter: x.size({dim}) must be a multiple of the group size {size}, "
                            f"got {x.shape[dim]}")
    return _ReduceScatter.apply(x, dim, pg, size)


def all_reduce(x: torch.Tensor, group: Any = None, *, backward: str = "identity") -> torch.Tensor:
    """The sum of ``x`` over the group, as a new tensor (``x`` is not modified).

    Backward (``backward``):

    - ``"identity"`` (default): each rank passes its output gradient straight
      to its input. Why the default: the output of an all-reduce is the same
      tensor on every rank, and what follows it runs replicated (a TP
      row-parallel output, an MoE layer's TP combine): the gradient arriving
      on each rank is then already the full gradient with respect to every
      summand. Summing it again would count the one replicated loss once per
      rank. Pair it with :func:`copy_to_group` where the replicated value
      enters per-rank computation, so that gradient is summed there, once.
    - ``"all_reduce"``: the exact adjoint when every rank's loss is its own and
      the objective is their sum (``torch.distributed.nn``'s semantics).

    A group of one returns ``x`` itself.
    """
    x = _check_tensor("all_reduce", x)
    check_choice("all_reduce: backward", backward, ("identity", "all_reduce"))
    pg = resolve_group(group)
    size, _ = _size_rank(pg)
    if size == 1:
        return x
    return _AllReduce.apply(x, pg, backward == "all_reduce")


def all_to_all_single(x: torch.Tensor, output_split_sizes: Optional[Sequence[int]] = None,
                      input_split_sizes: Optional[Sequence[int]] = None, group: Any = None) -> torch.Tensor:
    """Exchange rows (dim 0): ``input_split_sizes[r]`` rows of ``x`` go to group rank ``r``, in order;
    ``output_split_sizes[r]`` rows arrive from rank ``r``.

    Without split sizes, ``x.size(0)`` is split evenly (must divide). Splits
    are lists of non-negative ints of the group's length; zero rows anywhere
    are fine (the collective is still entered). Returns ``[sum(output_split_sizes),
    *x.shape[1:]]``. Backward: the reverse all-to-all (the gradient rows go
    back where their rows came from). A group of one returns ``x`` itself.
    """
    x = _check_tensor("all_to_all_single", x)
    if x.dim() == 0:
        raise ArgumentError("all_to_all_single: x must have at least one dimension, got a 0-d tensor")
    pg = resolve_group(group)
    size, _ = _size_rank(pg)
    splits = []
    for name, given in (("output_split_sizes", output_split_sizes), ("input_split_sizes", input_split_sizes)):
        if given is None:
            if x.shape[0] % size:
                raise ArgumentError(f"all_to_all_single: x.size(0) must be a multiple of the group size {size} "
                                    f"without {name}, got {x.shape[0]}")
            splits.append([x.shape[0] // size] * size)
            continue
        if isinstance(given, torch.Tensor):
            given = given.tolist()
        given = [check_int(f"all_to_all_single: {name}[{i}]", v, minimum=0) for i, v in enumerate(given)]
        if len(given) != size:
            raise ArgumentError(f"all_to_all_single: {name} must have {size} entries (the group size), "
                                f"got {len(given)}")
        splits.append(given)
    output_splits, input_splits = splits
    if sum(input_splits) != x.shape[0]:
        raise ArgumentError(f"all_to_all_single: input_split_sizes must sum to x.size(0)={x.shape[0]}, "
                            f"got {input_splits}")
    if size == 1:
        if output_splits[0] != x.shape[0]:
            raise ArgumentError(f"all_to_all_single: output_split_sizes must be [{x.shape[0]}] in a group of "
                                f"one, got {output_splits}")
        return x
    return _AllToAll.apply(x, output_splits, input_splits, pg)


def split(x: torch.Tensor, dim: int = 0, group: Any = None) -> torch.Tensor:
    """This rank's block along ``dim`` of ``x``, which every rank holds identically.

    ``x.size(dim)`` must be a multiple of the group size. No communication in
    forward; backward all-gathers the blocks' gradients, so every rank gets the
    full gradient of the replicated ``x``. A group of one returns ``x``.
    """
    x = _check_tensor("split", x)
    dim = _dim("split", x, dim)
    pg = resolve_group(group)
    size, rank = _size_rank(pg)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ArgumentError(f"split: x.size({dim}) must be a multiple of the group size {size}, got {x.shape[dim]}")
    return _Split.apply(x, dim, pg, size, rank)


def copy_to_group(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``x`` unchanged (a view); backward sums the gradient over the group.

    For a tensor every rank holds identically that then feeds per-rank
    computation (each rank's own experts or weight shard): its full gradient
    is the sum of the ranks' partial gradients. A group of one returns ``x``.
    """
    x = _check_tensor("copy_to_group", x)
    pg = resolve_group(group)
    size, _ = _size_rank(pg)
    if size == 1:
        return x
    return _CopyToGroup.apply(x, pg)
