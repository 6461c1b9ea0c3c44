"""Plain-torch reference implementations of the moe_ext op contracts.

Written to be obviously right, not fast: each follows the docstring of the op
in :mod:`moe_ext.ops` step by step. Tests compare every backend against them;
benchmarks use them as the baseline where noted.
"""

from __future__ import annotations

import torch

__all__ = ["generate_permute_indices_reference", "generate_permute_indices_vectorized",
           "moe_permute_reference", "moe_permute_padded_reference", "moe_unpermute_reference", "expert_histogram_reference",
           "group_by_local_expert_reference", "ungroup_by_local_expert_reference"]


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


# ---------------------------------------------------------------- token routing

def moe_permute_reference(hidden_states: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                          active_expert_range=None, expert_map=None, counts: str = "count"):
    """:func:`moe_ext.ops.moe_permute` step by step in torch ops (any device).

    Returns ``(permuted, expanded_row_idx, expert_tokens)``; rows of
    ``permuted`` past the valid count are zero here (the op leaves them unwritten).
    """
    num_tokens, topk = topk_ids.shape
    start, end = (0, num_experts) if active_expert_range is None else active_expert_range
    ids = topk_ids.reshape(-1).to(torch.int64)                     # row f = t * K + k
    if ids.numel() and not bool(((ids >= -1) & (ids < num_experts)).all()):
        raise ValueError(f"topk_ids must be in [0, {num_experts}) or -1")
    present = ids >= 0                                              # -1: no expert, dropped
    keys = expert_map.to(torch.int64)[ids.clamp_min(0)] if expert_map is not None else ids
    if expert_map is not None and keys[present].numel() and not bool(
            ((keys[present] >= -1) & (keys[present] < num_experts)).all()):
        raise ValueError(f"expert_map values must be in [0, {num_experts}) or -1")
    valid = present & (keys >= start) & (keys < end)
    sort_key = torch.where(valid, keys, torch.full_like(keys, end))  # dropped rows sort last
    order = torch.sort(sort_key, stable=True).indices
    num_valid = int(valid.sum())
    kept = order[:num_valid]
    permuted = hidden_states.new_zeros((num_tokens * topk, hidden_states.shape[1]))
    permuted[:num_valid] = hidden_states[kept // topk]
    expanded_row_idx = torch.full((num_tokens * topk,), -1, dtype=torch.int32, device=ids.device)
    expanded_row_idx[kept] = torch.arange(num_valid, dtype=torch.int32, device=ids.device)
    expert_tokens = torch.bincount(keys[valid] - start, minlength=end - start).to(torch.int64)
    if counts == "cumsum":
        expert_tokens = torch.cumsum(expert_tokens, 0)
    return permuted, expanded_row_idx, expert_tokens


def moe_permute_padded_reference(hidden_states: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                                 active_expert_range=None, expert_map=None, counts: str = "count",
                                 alignment: int = 1, scales=None):
    """:func:`moe_ext.ops.moe_permute` with ``alignment`` / ``scales`` in torch ops (any device).

    Returns ``(permuted, permuted_scales, expanded_row_idx, expert_tokens,
    expert_tokens_unpadded)``: the unpadded layout of
    :func:`moe_permute_reference`, then each expert's block moved to start at
    the padded running sum (blocks rounded up to a multiple of ``alignment``,
    an empty expert keeps an empty block). ``permuted`` has ``T*K +
    (end - start) * (alignment - 1)`` rows; pad rows and rows past the padded
    total are zero here (the op zeroes the pad rows and leaves the tail
    unwritten). ``permuted_scales`` is ``None`` without scales. float8 rows
    are moved as their bytes (``view(torch.uint8)``).
    """
    num_tokens, topk = topk_ids.shape
    start, end = (0, num_experts) if active_expert_range is None else active_expert_range
    as_bytes = hidden_states.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    rows_in = hidden_states.view(torch.uint8) if as_bytes else hidden_states
    _, row_idx, unpadded = moe_permute_reference(rows_in, topk_ids, num_experts, (start, end), expert_map)
    padded = (unpadded + alignment - 1) // alignment * alignment
    block_start = torch.cumsum(padded, 0) - padded            # padded first row of each expert
    first_row = torch.cumsum(unpadded, 0) - unpadded          # unpadded first row of each expert
    row = row_idx.to(torch.int64)
    kept = row >= 0
    # The expert of each kept row: the number of experts whose unpadded block starts at or before it, less one
    # among the non-empty ones (searchsorted on the starts of non-empty experts).
    nonempty = torch.nonzero(unpadded > 0).flatten()
    expert = nonempty[torch.searchsorted(first_row[nonempty], row[kept], right=True) - 1]
    new_row = row.clone()
    new_row[kept] = row[kept] - first_row[expert] + block_start[expert]
    bound = num_tokens * topk + (end - start) * (alignment - 1)
    source = (torch.arange(num_tokens * topk, device=row.device) // topk)[kept]
    permuted = rows_in.new_zeros((bound, rows_in.shape[1]))
    permuted[new_row[kept]] = rows_in[source]
    if as_bytes:
        permuted = permuted.view(hidden_states.dtype)
    permuted_scales = None
    if scales is not None:
        scale_rows = scales.reshape(num_tokens, scales.shape[1] if scales.dim() == 2 else 1)
        permuted_scales = scale_rows.new_zeros((bound, scale_rows.shape[1]))
        permuted_scales[new_row[kept]] = scale_rows[source]
        permuted_scales = permuted_scales.reshape((bound,) + tuple(scales.shape[1:]))
    if counts == "cumsum":
        padded, unpadded = torch.cumsum(padded, 0), torch.cumsum(unpadded, 0)
    return permuted, permuted_scales, new_row.to(torch.int32), padded, unpadded


def moe_unpermute_reference(permuted: torch.Tensor, expanded_row_idx: torch.Tensor, probs=None,
                            topk: int | None = None):
    """:func:`moe_ext.ops.moe_unpermute` in torch ops: fp32 (fp64 for fp64) sums over k in order."""
    if topk is None:
        topk = probs.shape[1]
    rows = expanded_row_idx.reshape(-1, topk).to(torch.int64)
    acc_dtype = torch.float64 if permuted.dtype == torch.float64 else torch.float32
    out = torch.zeros((rows.shape[0], permuted.shape[1]), dtype=acc_dtype, device=permuted.device)
    for k in range(topk):
        row = rows[:, k]
        taken = row >= 0
        if permuted.shape[0]:
            gathered = permuted[row.clamp_min(0)].to(acc_dtype)
        else:  # nothing to gather: every entry is -1
            gathered = torch.zeros((row.shape[0], permuted.shape[1]), dtype=acc_dtype, device=permuted.device)
        weight = probs[:, k].to(acc_dtype) if probs is not None else torch.ones_like(row, dtype=acc_dtype)
        out += torch.where(taken[:, None], gathered * weight[:, None], torch.zeros_like(gathered))
    return out.to(permuted.dtype)


def expert_histogram_reference(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """:func:`moe_ext.ops.expert_histogram` with ``bincount``."""
    return torch.bincount(topk_ids.reshape(-1).to(torch.int64), minlength=num_experts)


def group_by_local_expert_reference(x: torch.Tensor, tokens_per_expert_group: torch.Tensor,
                                    experts_per_rank: int, num_ranks: int, alignment: int,
                                    max_len: int):
    """The regroup as it is usually written: append a zero row, then gather (``-1`` hits it)."""
    permuted_indices, m_sizes, m_offsets = generate_permute_indices_reference(
        tokens_per_expert_group.cpu(), experts_per_rank, num_ranks, max_len, alignment)
    permuted_indices = permuted_indices.to(x.device)
    with_zero_row = torch.vstack((x, x.new_zeros((1, x.shape[1]))))
    return (with_zero_row[permuted_indices.to(torch.int64)], permuted_indices, m_sizes.to(x.device),
            m_offsets.to(x.device))


def ungroup_by_local_expert_reference(grouped: torch.Tensor, permuted_indices: torch.Tensor,
                                      num_rows: int) -> torch.Tensor:
    """Inverse of the regroup: rows back to arrival order, zeros where nothing lands."""
    out = grouped.new_zeros((num_rows, grouped.shape[1]))
    taken = permuted_indices >= 0
    out[permuted_indices[taken].to(torch.int64)] = grouped[taken]
    return out
