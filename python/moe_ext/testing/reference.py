"""Plain-torch reference implementations of the moe_ext op contracts.

Written to be obviously right, not fast: each follows the docstring of the op
in :mod:`moe_ext.ops` step by step. Tests compare every backend against them;
benchmarks use them as the baseline where noted.
"""

from __future__ import annotations

import torch

__all__ = ["generate_permute_indices_reference", "generate_permute_indices_vectorized"]


def _padded_sizes(tokens_per_expert_group: torch.Tensor, experts_per_rank: int, num_ranks: int,
                  alignment: int) -> torch.Tensor:
    rows_per_expert = tokens_per_expert_group.to(torch.int64).view(num_ranks, experts_per_rank).sum(0)
    at_least = rows_per_expert.clamp_min(alignment)
    return (at_least + alignment - 1) // alignment * alignment


def generate_permute_indices_reference(tokens_per_expert_group: torch.Tensor, experts_per_rank: int,
                                       num_ranks: int, max_len: int, alignment: int):
    """Loop form of :func:`moe_ext.ops.generate_permute_indices` (CPU, Python loops)."""
    counts = tokens_per_expert_group.to("cpu", torch.int64).tolist()
    m_sizes = _padded_sizes(torch.tensor(counts, dtype=torch.int64), experts_per_rank, num_ranks,
                            alignment)
    m_offsets = torch.cumsum(m_sizes, 0)
    if max_len < int(m_offsets[-1]):
        raise ValueError(f"padded layout needs {int(m_offsets[-1])} rows, max_len is {max_len}")
    arrival_start = [0] * len(counts)
    for i in range(1, len(counts)):
        arrival_start[i] = arrival_start[i - 1] + counts[i - 1]
    permuted = [-1] * max_len
    for expert in range(experts_per_rank):
        write = int(m_offsets[expert] - m_sizes[expert])
        for rank in range(num_ranks):
            group = rank * experts_per_rank + expert
            for j in range(counts[group]):
                permuted[write] = arrival_start[group] + j
                write += 1
    device = tokens_per_expert_group.device
    return (torch.tensor(permuted, dtype=torch.int32, device=device),
            m_sizes.to(device=device, dtype=torch.int32),
            m_offsets.to(device=device, dtype=torch.int32))


def generate_permute_indices_vectorized(tokens_per_expert_group: torch.Tensor, experts_per_rank: int,
                                        num_ranks: int, max_len: int, alignment: int):
    """The same contract in vectorised torch ops on any device (the benchmark baseline).

    This is what a careful user writes without a custom kernel: a handful of
    launches plus a ``repeat_interleave`` that synchronises with the host.
    """
    device = tokens_per_expert_group.device
    counts = tokens_per_expert_group.to(torch.int64)
    m_sizes = _padded_sizes(counts, experts_per_rank, num_ranks, alignment)
    m_offsets = torch.cumsum(m_sizes, 0)
    arrival_start = torch.cumsum(counts, 0) - counts
    # Groups in expert-major order, each group's rows consecutive.
    by_expert = counts.view(num_ranks, experts_per_rank).t().reshape(-1)
    start_by_expert = arrival_start.view(num_ranks, experts_per_rank).t().reshape(-1)
    group_of_row = torch.repeat_interleave(torch.arange(by_expert.numel(), device=device), by_expert)
    first_row_of_group = torch.cumsum(by_expert, 0) - by_expert
    offset_in_group = torch.arange(group_of_row.numel(), device=device) - first_row_of_group[group_of_row]
    expert_of_row = group_of_row // num_ranks
    rows_before_expert = torch.cumsum(
        by_expert.view(experts_per_rank, num_ranks).sum(1), 0) - by_expert.view(
            experts_per_rank, num_ranks).sum(1)
    destination = (m_offsets - m_sizes)[expert_of_row] + (
        torch.arange(group_of_row.numel(), device=device) - rows_before_expert[expert_of_row])
    permuted = torch.full((max_len,), -1, dtype=torch.int32, device=device)
    permuted[destination] = (start_by_expert[group_of_row] + offset_in_group).to(torch.int32)
    return permuted, m_sizes.to(torch.int32), m_offsets.to(torch.int32)
