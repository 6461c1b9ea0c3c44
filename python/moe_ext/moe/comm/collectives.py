"""The collectives the comm methods use, and the two autograd pieces that keep backward in step.

The collectives are :mod:`moe_ext.distributed.functional` along dim 0 (rows)
on a :class:`moe_ext.moe.config.CommGroup`: group ranks throughout, correct on
subgroups, differentiable whenever the input requires grad.

:func:`tie` is the structural guard of the comm methods (see
:mod:`moe_ext.moe.comm.base`): it makes the layer output depend, for
autograd, on every tensor a collective produced in this forward, so
autograd reaches every collective's backward on every rank whatever the
routing sent where. :func:`forward_only` makes a forward-only method fail
at the first backward with its name, before any backward collective.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moe_ext.distributed import functional
from moe_ext.moe.config import CommGroup

__all__ = ["all_gather_rows", "reduce_scatter_rows", "all_reduce_sum", "all_to_all_rows", "split_rows",
           "copy_rows", "tie", "forward_only", "ForwardOnlyError"]


def all_gather_rows(x: torch.Tensor, group: CommGroup, *, backward: str = "reduce_scatter") -> torch.Tensor:
    """Every rank's ``x`` (equal shapes) concatenated along dim 0 in group-rank order."""
    return functional.all_gather(x, 0, group, backward=backward)


def reduce_scatter_rows(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's 1/world_size slice of rows."""
    return functional.reduce_scatter(x, 0, group)


def all_reduce_sum(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Sum over ranks; backward identity (the output is consumed replicated, see functional.all_reduce)."""
    return functional.all_reduce(x, group)


def all_to_all_rows(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                    group: CommGroup) -> torch.Tensor:
    """Rows ``input_splits[r]`` go to rank r; rows ``output_splits[r]`` arrive from rank r."""
    return functional.all_to_all_single(x, list(output_splits), list(input_splits), group)


def split_rows(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """This rank's 1/world_size block of rows of a replicated ``x``; backward all-gathers."""
    return functional.split(x, 0, group)


def copy_rows(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """``x`` (replicated on the group) unchanged; backward sums the gradient over the group."""
    return functional.copy_to_group(x, group)


class _Tie(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, *anchors):
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        # None, not zeros: the engine still runs every node behind an anchor (with an
        # undefined gradient, materialised as zeros where a custom Function needs one),
        # and a connected anchor costs nothing extra.
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


def tie(output: torch.Tensor, anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``output`` unchanged; for autograd it also depends on every tensor of ``anchors``.

    The backward passes ``output``'s gradient through and gives each anchor no
    gradient of its own: an anchor connected to the loss some other way gets
    exactly its gradient; one that routing cut off (a rank whose experts got
    no rows) still has its backward run, with zeros, so the collective that
    produced it is entered on this rank as on every other.
    """
    anchors = [a for a in anchors if a.requires_grad]
    if not anchors or not torch.is_grad_enabled():
        return output
    return _Tie.apply(output, *anchors)


class ForwardOnlyError(RuntimeError):
    """Backward through a forward-only MoE comm method (MC2, dummy)."""


class _ForwardOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, name, *inputs):
        ctx.name = name
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        raise ForwardOnlyError(
            f"MoE comm method {ctx.name!r} is forward-only (inference): it has no backward. For training use "
            f"comm_method='allgather', 'native_allgather' or 'alltoall' (or run this forward under "
            f"torch.no_grad()).")


def forward_only(output: torch.Tensor, name: str, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``output`` unchanged; a backward through it raises :class:`ForwardOnlyError` naming ``name``.

    ``inputs``: the tensors the output came from; when any requires grad the
    output does too (so the error, not autograd's generic "does not require
    grad", is what a backward meets). Called last in a method's forward, so
    its backward runs before any other node of the method: no rank enters a
    backward collective that the others skip.
    """
    inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not torch.is_grad_enabled() or not (inputs or output.requires_grad):
        return output
    return _ForwardOnly.apply(output, name, *inputs)
