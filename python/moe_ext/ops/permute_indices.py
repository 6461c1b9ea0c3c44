"""generate_permute_indices: the regroup indices after an expert-parallel all-to-all."""

from __future__ import annotations

import torch

from moe_ext.ops import _checks

__all__ = ["generate_permute_indices"]

_OP = "moe_ext::generate_permute_indices"


def generate_permute_indices(
    tokens_per_expert_group: torch.Tensor,
    experts_per_rank: int,
    num_ranks: int,
    max_len: int,
    alignment: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices that regroup all-to-all output by local expert, padded for grouped GEMMs.

    After the token all-to-all, a rank holds rows ordered ``[source rank][local
    expert]``; ``tokens_per_expert_group[r * experts_per_rank + e]`` is how many
    rows rank ``r`` sent to local expert ``e``. Grouped GEMMs want the rows
    ordered ``[local expert][source rank]`` with each expert's block padded to a
    multiple of ``alignment`` rows, and an empty expert still given
    ``alignment`` rows (a zero-row GEMM group hangs or misbehaves in several
    kernels).

    Args:
        tokens_per_expert_group: int32 or int64, shape ``[num_ranks * experts_per_rank]``,
            non-negative counts, rank-major.
        experts_per_rank: local experts per rank (>= 1).
        num_ranks: expert-parallel ranks (>= 1).
        max_len: length of ``permuted_indices``; must hold the padded layout
            (``m_offsets[-1] <= max_len``).
        alignment: block size multiple and minimum block size (>= 1).

    Returns:
        ``(permuted_indices, m_sizes, m_offsets)``, all int32 on the input's device:

        - ``permuted_indices[max_len]``: position ``p`` of expert ``e``'s block,
          at offset ``q`` from its start, holds the arriving-row index of the
          ``q``-th row of expert ``e`` (source ranks in order); ``-1`` marks
          padding and every position past ``m_offsets[-1]``.
        - ``m_sizes[e] = round_up(max(rows of e, alignment), alignment)``.
        - ``m_offsets``: inclusive prefix sum of ``m_sizes``.

    Errors:
        A wrong type (a float, str or bool for an int argument, a non-tensor,
        a wrong dtype) raises ``TypeError``; bad sizes (``experts_per_rank``,
        ``num_ranks``, ``alignment`` >= 1, ``alignment`` < 2^31,
        ``0 <= max_len <= 2^31``, ``num_ranks * experts_per_rank`` < 2^31),
        a wrong length, negative counts or a padded layout longer than
        ``max_len`` raise :class:`moe_ext.errors.ArgumentError` (a
        ``ValueError``) on CPU before anything is written. On CUDA the checks that need the counts'
        values run inside the single kernel launch (no host synchronisation,
        so CUDA graphs work): the kernel writes nothing out of bounds and stops
        with a device-side assert naming the problem, surfacing at the next
        synchronisation as torch's own index checks do.

    Works under ``torch.compile(fullgraph=True)`` and in CUDA graphs: the
    output shapes depend only on the integer arguments.
    """
    experts_per_rank, num_ranks, max_len, alignment = _checks.permute_indices_args(
        tokens_per_expert_group, experts_per_rank, num_ranks, max_len, alignment)
    return _checks.call_op(torch.ops.moe_ext.generate_permute_indices,
                           tokens_per_expert_group, experts_per_rank, num_ranks, max_len, alignment)


@torch.library.register_fake(_OP)
def _generate_permute_indices_fake(tokens_per_expert_group, experts_per_rank, num_ranks, max_len,
                                   alignment):
    experts_per_rank, num_ranks, max_len, alignment = _checks.permute_indices_args(
        tokens_per_expert_group, experts_per_rank, num_ranks, max_len, alignment)
    int32 = dict(dtype=torch.int32, device=tokens_per_expert_group.device)
    return (tokens_per_expert_group.new_empty((max_len,), **int32),
            tokens_per_expert_group.new_empty((experts_per_rank,), **int32),
            tokens_per_expert_group.new_empty((experts_per_rank,), **int32))
