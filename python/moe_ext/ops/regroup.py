"""The regroup after an expert-parallel all-to-all, and its inverse.

After the token all-to-all a rank holds rows ordered ``[source rank][local
expert]``; grouped GEMMs want ``[local expert][source rank]`` with each
expert's block padded to ``alignment`` rows. :func:`group_by_local_expert`
does it with one index launch (:func:`~moe_ext.ops.generate_permute_indices`)
and one row pass (:func:`gather_rows`) that reads each row once and writes
each output row once - the usual ``vstack`` of a zero row followed by an
index gather moves about twice the bytes. :func:`ungroup_by_local_expert`
is its inverse (:func:`scatter_rows`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_ext.errors import ArgumentError
from moe_ext.ops import _checks
from moe_ext.ops.permute_indices import generate_permute_indices

__all__ = ["GroupedRows", "gather_rows", "group_by_local_expert", "scatter_rows",
           "ungroup_by_local_expert"]


class GroupedRows(NamedTuple):
    """What :func:`group_by_local_expert` returns."""

    rows: torch.Tensor
    """``[max_len, H]``: expert blocks in order, each ``[source rank]``-ordered then zero padded."""
    permuted_indices: torch.Tensor
    """int32 ``[max_len]``: the arriving row at each position, -1 for padding (what the inverse needs)."""
    m_sizes: torch.Tensor
    """int32 ``[experts_per_rank]``: padded block sizes."""
    m_offsets: torch.Tensor
    """int32 ``[experts_per_rank]``: inclusive cumsum of ``m_sizes`` (grouped-GEMM offsets)."""


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``out[p] = x[indices[p]]``, a zero row where ``indices[p] == -1``.

    ``x`` is ``[N, H]`` of any dtype, ``indices`` int32/int64 ``[M]`` with values in
    ``[-1, N)`` (``ValueError`` on CPU, device-side assert on CUDA otherwise;
    never read out of bounds). Returns ``[M, H]``; each output row is written
    once. Its gradient is :func:`scatter_rows` of the output gradient, which
    needs the non-negative indices to be distinct. Both tensors on one device
    (``ArgumentError`` naming both otherwise); a non-tensor or a wrong index
    dtype raises ``TypeError``.
    """
    _checks.rows_tensors("gather_rows", x, indices)
    return _checks.call_op(torch.ops.moe_ext.gather_rows, x, indices)


def scatter_rows(x: torch.Tensor, indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out[indices[p]] = x[p]`` for ``indices[p] >= 0``; rows no index names are zero.

    ``x`` is ``[M, H]``, ``indices`` int32/int64 ``[M]`` with values in ``[-1,
    num_rows)``, each non-negative value at most once (a row with two writers
    is refused: ``ArgumentError`` on CPU, device-side assert on CUDA). Returns
    ``[num_rows, H]``, each row written exactly once (no atomics);
    ``num_rows`` is an int in ``[0, 2^31)``. Its gradient is
    :func:`gather_rows` of the output gradient.
    """
    num_rows = _checks.scatter_rows_args(x, indices, num_rows)
    return _checks.call_op(torch.ops.moe_ext.scatter_rows, x, indices, num_rows)


def group_by_local_expert(
    x: torch.Tensor,
    tokens_per_expert_group: torch.Tensor,
    experts_per_rank: int,
    num_ranks: int,
    alignment: int,
    max_len: int,
) -> GroupedRows:
    """Reorders all-to-all output from ``[source rank][local expert]`` to ``[local expert][source rank]``.

    ``x`` is ``[N, H]`` (N = arriving rows, ``sum(tokens_per_expert_group) <= N``);
    ``tokens_per_expert_group[r * experts_per_rank + e]`` is how many rows rank
    ``r`` sent to local expert ``e``. Expert ``e``'s block starts at
    ``m_offsets[e] - m_sizes[e]``, holds its rows in source-rank order and is
    padded with zero rows to ``m_sizes[e] = round_up(max(rows, alignment),
    alignment)``; positions at or past ``m_offsets[-1]`` are zero too. See
    :func:`~moe_ext.ops.generate_permute_indices` for the index contract and
    its errors. Differentiable in ``x``.

    Returns:
        :class:`GroupedRows` ``(rows [max_len, H], permuted_indices, m_sizes, m_offsets)``.

    Errors: those of :func:`generate_permute_indices`; ``x`` not a 2-D tensor on
    the counts' device raises ``TypeError`` / ``ArgumentError``; counts summing
    past the ``N`` rows of ``x`` raise ``ArgumentError`` naming both on CPU (on
    CUDA, where reading the sum would synchronise, the row gather stops with a
    device-side assert and reads nothing out of bounds).
    """
    op = "group_by_local_expert"
    _checks.tensor(op, "x", x)
    _checks.tensor(op, "tokens_per_expert_group", tokens_per_expert_group)
    _checks.same_device(op, [("x", x), ("tokens_per_expert_group", tokens_per_expert_group)])
    _checks.dim(op, "x", x, 2, " [N, H]")
    permuted_indices, m_sizes, m_offsets = generate_permute_indices(
        tokens_per_expert_group, experts_per_rank, num_ranks, max_len, alignment)
    if _checks.host_values_readable(tokens_per_expert_group):
        total = int(tokens_per_expert_group.sum())
        if total > x.shape[0]:
            raise ArgumentError(f"{op}: tokens_per_expert_group sums to {total} rows but x has "
                                f"{x.shape[0]} rows (x must hold every arriving row: N >= the sum)")
    return GroupedRows(gather_rows(x, permuted_indices), permuted_indices, m_sizes, m_offsets)


def ungroup_by_local_expert(grouped: torch.Tensor, permuted_indices: torch.Tensor,
                            num_rows: int) -> torch.Tensor:
    """The inverse of :func:`group_by_local_expert`: back to arrival order, padding dropped.

    ``out[permuted_indices[p]] = grouped[p]`` for every non-padding position;
    ``num_rows`` is the ``N`` of the grouped input (arriving rows that no
    expert block holds come back as zeros). Each row is read once and written
    once. Differentiable in ``grouped``. A ``num_rows`` smaller than a row that
    ``permuted_indices`` names raises ``ArgumentError`` naming ``num_rows`` on
    CPU (a device-side assert on CUDA).
    """
    op = "ungroup_by_local_expert"
    _checks.tensor(op, "grouped", grouped)
    _checks.tensor(op, "permuted_indices", permuted_indices)
    num_rows = _checks.int_arg(op, "num_rows", num_rows, minimum=0, maximum=_checks.INT32_MAX)
    if _checks.host_values_readable(permuted_indices) and permuted_indices.numel():
        largest = int(permuted_indices.max())
        if largest >= num_rows:
            raise ArgumentError(f"{op}: num_rows must exceed every arriving row that permuted_indices "
                                f"names (the N of the grouped input, >= {largest + 1}), got {num_rows}")
    return scatter_rows(grouped, permuted_indices, num_rows)


# ---------------------------------------------------------------- fake kernels

@torch.library.register_fake("moe_ext::gather_rows")
def _gather_rows_fake(x, indices):
    _checks.rows_tensors("gather_rows", x, indices)
    return x.new_empty((indices.shape[0], x.shape[1]))


@torch.library.register_fake("moe_ext::scatter_rows")
def _scatter_rows_fake(x, indices, num_rows):
    num_rows = _checks.scatter_rows_args(x, indices, num_rows)
    return x.new_empty((num_rows, x.shape[1]))


# ---------------------------------------------------------------- autograd

def _gather_setup_context(ctx, inputs, output):
    x, indices = inputs
    ctx.save_for_backward(indices)
    ctx.num_rows = x.shape[0]


def _gather_backward(ctx, grad_output):
    (indices,) = ctx.saved_tensors
    return torch.ops.moe_ext.scatter_rows(grad_output, indices, ctx.num_rows), None


torch.library.register_autograd("moe_ext::gather_rows", _gather_backward,
                                setup_context=_gather_setup_context)


def _scatter_setup_context(ctx, inputs, output):
    _, indices, _ = inputs
    ctx.save_for_backward(indices)


def _scatter_backward(ctx, grad_output):
    (indices,) = ctx.saved_tensors
    return torch.ops.moe_ext.gather_rows(grad_output, indices), None, None


torch.library.register_autograd("moe_ext::scatter_rows", _scatter_backward,
                                setup_context=_scatter_setup_context)
