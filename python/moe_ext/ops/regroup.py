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

from moe_ext._loader import native_error
from moe_ext.ops.permute_indices import generate_permute_indices

__all__ = ["GroupedRows", "gather_rows", "group_by_local_expert", "scatter_rows",
           "ungroup_by_local_expert"]

_INDEX = (torch.int32, torch.int64)


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
    needs the non-negative indices to be distinct.
    """
    try:
        return torch.ops.moe_ext.gather_rows(x, indices)
    except RuntimeError as error:  # a TypeError from C++ arrives as RuntimeError (stable ABI)
        raise native_error(error) from None


def scatter_rows(x: torch.Tensor, indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out[indices[p]] = x[p]`` for ``indices[p] >= 0``; rows no index names are zero.

    ``x`` is ``[M, H]``, ``indices`` int32/int64 ``[M]`` with values in ``[-1,
    num_rows)``, each non-negative value at most once (a row with two writers
    is refused: ``ValueError`` on CPU, device-side assert on CUDA). Returns
    ``[num_rows, H]``, each row written exactly once (no atomics). Its
    gradient is :func:`gather_rows` of the output gradient.
    """
    try:
        return torch.ops.moe_ext.scatter_rows(x, indices, int(num_rows))
    except RuntimeError as error:  # a TypeError from C++ arrives as RuntimeError (stable ABI)
        raise native_error(error) from None


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
    """
    permuted_indices, m_sizes, m_offsets = generate_permute_indices(
        tokens_per_expert_group, experts_per_rank, num_ranks, max_len, alignment)
    return GroupedRows(gather_rows(x, permuted_indices), permuted_indices, m_sizes, m_offsets)


def ungroup_by_local_expert(grouped: torch.Tensor, permuted_indices: torch.Tensor,
                            num_rows: int) -> torch.Tensor:
    """The inverse of :func:`group_by_local_expert`: back to arrival order, padding dropped.

    ``out[permuted_indices[p]] = grouped[p]`` for every non-padding position;
    ``num_rows`` is the ``N`` of the grouped input (arriving rows that no
    expert block holds come back as zeros). Each row is read once and written
    once. Differentiable in ``grouped``.
    """
    return scatter_rows(grouped, permuted_indices, num_rows)


# ---------------------------------------------------------------- fake kernels

@torch.library.register_fake("moe_ext::gather_rows")
def _gather_rows_fake(x, indices):
    torch._check(x.dim() == 2, lambda: "gather_rows: x must be 2-D")
    torch._check(indices.dim() == 1 and indices.dtype in _INDEX,
                 lambda: "gather_rows: indices must be 1-D int32 or int64")
    return x.new_empty((indices.shape[0], x.shape[1]))


@torch.library.register_fake("moe_ext::scatter_rows")
def _scatter_rows_fake(x, indices, num_rows):
    torch._check(x.dim() == 2, lambda: "scatter_rows: x must be 2-D")
    torch._check(indices.dim() == 1 and indices.dtype in _INDEX,
                 lambda: "scatter_rows: indices must be 1-D int32 or int64")
    torch._check(indices.shape[0] == x.shape[0], lambda: "scatter_rows: one index per row of x")
    torch._check(num_rows >= 0, lambda: "scatter_rows: num_rows must be >= 0")
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
