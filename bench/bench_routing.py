"""Benchmark of the routing ops against the memory floor and the seeds' plain-torch paths.

    python bench/bench_routing.py            # CUDA if available (the issue's sizes), else a CPU smoke run
    python bench/bench_routing.py --small    # small sizes (any device)

For each case it prints: bytes moved (each needed byte read once plus each
output byte written once), the floor (a device-to-device copy of the same
number of bytes, measured in the same run), our op, the plain-torch path of
the seeds (argsort + index + index_add_ for routing, vstack + gather for the
regroup), and the ratios. On CUDA every timing is the device time of one call,
taken from a CUDA graph replaying 20 calls (launch gaps included, Python
overhead excluded); a path that cannot be captured is timed with events
around an eager loop and marked '*'.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

import moe_ext
from moe_ext.ops import (expert_histogram, group_by_local_expert, moe_permute, moe_unpermute,
                         ungroup_by_local_expert)

CALLS_PER_GRAPH = 20


# ---------------------------------------------------------------- the seeds' plain-torch paths

def seed_permute(hidden, topk_ids, expert_map, num_local):
    """All-gather MoE routing in plain torch: sort every (t, k) by local expert, gather all rows."""
    num_tokens, topk = topk_ids.shape
    token_of_row = torch.arange(num_tokens, device=hidden.device).repeat_interleave(topk)
    flat = topk_ids.reshape(-1)
    local = expert_map[flat] if expert_map is not None else flat
    kept = local != -1
    key = torch.where(kept, local, torch.full_like(local, num_local))
    order = torch.argsort(key, stable=True)
    sorted_tokens = token_of_row[order]
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=hidden.device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key, dtype=torch.int64))
    return hidden[sorted_tokens], sorted_tokens, counts[:num_local]


def seed_unpermute(expert_out, sorted_tokens, sorted_weights, num_tokens):
    """Weighted combine in plain torch: scale each row, index_add_ into the token rows."""
    scaled = expert_out * sorted_weights.unsqueeze(1).to(expert_out.dtype)
    out = torch.zeros((num_tokens, expert_out.shape[1]), dtype=expert_out.dtype, device=expert_out.device)
    out.index_add_(0, sorted_tokens, scaled)
    return out


def seed_regroup(x, permuted_indices):
    """Post-all-to-all regroup as usually written: append a zero row, gather (-1 hits it)."""
    with_zero = torch.vstack((x, x.new_zeros((1, x.shape[1]))))
    return with_zero[permuted_indices]


def seed_ungroup(grouped, permuted_indices, num_rows):
    out = grouped.new_empty((num_rows + 1, grouped.shape[1]))
    out[permuted_indices] = grouped
    return out[:-1]


# ---------------------------------------------------------------- timing

def time_us(fn: Callable[[], object], device: str) -> tuple[float, bool]:
    """Device time of one call in µs, and whether it came from a CUDA graph."""
    if device == "cpu":
        fn()
        repeats, start = 0, time.perf_counter()
        while repeats < 5 or time.perf_counter() - start < 0.2:
            fn()
            repeats += 1
        return (time.perf_counter() - start) / repeats * 1e6, False
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS_PER_GRAPH):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, begin.elapsed_time(end) * 1e3 / CALLS_PER_GRAPH)
        del graph
        return best, True
    except Exception:  # not capturable (host sync, ...): events around an eager loop
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(CALLS_PER_GRAPH):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) * 1e3 / CALLS_PER_GRAPH, False


def copy_floor_us(num_bytes: int, device: str) -> float:
    """A device-to-device copy that reads num_bytes / 2 and writes num_bytes / 2."""
    half = max(16, num_bytes // 2) // 16 * 16
    source = torch.empty(half, dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    return time_us(lambda: destination.copy_(source), device)[0]


@dataclass
class Row:
    case: str
    bytes_moved: int
    floor: float
    ours: float
    seed: float | None
    ours_graph: bool
    seed_graph: bool


# ---------------------------------------------------------------- cases

def routing(generator, num_tokens, topk, num_experts, device):
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:topk] for _ in range(num_tokens)])
    return ids.to(torch.int32).to(device)


def permute_case(name, num_tokens, hidden_size, topk, num_experts, ep_size, device, dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).to(device)
    ids = routing(generator, num_tokens, topk, num_experts, device)
    local = num_experts // ep_size
    active = (0, local)  # rank 0 of ep_size
    expert_map = None
    if ep_size > 1:
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
        expert_map[:local] = torch.arange(local, dtype=torch.int32, device=device)
    row_idx = moe_permute(hidden, ids, num_experts=num_experts, active_expert_range=active).expanded_row_idx
    valid_rows = int((row_idx >= 0).sum())
    needed_tokens = int((row_idx.view(num_tokens, topk) >= 0).any(1).sum())
    row_bytes = hidden_size * hidden.element_size()
    moved = needed_tokens * row_bytes + valid_rows * row_bytes + ids.numel() * 8
    ours, ours_graph = time_us(lambda: moe_permute(hidden, ids, num_experts=num_experts,
                                                   active_expert_range=active), device)
    seed, seed_graph = time_us(lambda: seed_permute(hidden, ids, expert_map, local), device)
    return Row(name, moved, copy_floor_us(moved, device), ours, seed, ours_graph, seed_graph)


def unpermute_case(name, num_tokens, hidden_size, topk, num_experts, device, dtype):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).to(device)
    ids = routing(generator, num_tokens, topk, num_experts, device)
    probs = torch.rand(num_tokens, topk, generator=generator).to(device)
    permuted, row_idx, _ = moe_permute(hidden, ids, num_experts=num_experts)
    _, sorted_tokens, _ = seed_permute(hidden, ids, None, num_experts)
    sorted_weights = probs.reshape(-1)[torch.argsort(ids.reshape(-1), stable=True)]
    row_bytes = hidden_size * hidden.element_size()
    moved = num_tokens * topk * row_bytes + num_tokens * row_bytes + num_tokens * topk * 8
    ours, ours_graph = time_us(lambda: moe_unpermute(permuted, row_idx, probs), device)
    seed, seed_graph = time_us(lambda: seed_unpermute(permuted, sorted_tokens, sorted_weights, num_tokens),
                               device)
    return Row(name, moved, copy_floor_us(moved, device), ours, seed, ours_graph, seed_graph)


def unpermute_backward_case(name, num_tokens, hidden_size, topk, num_experts, device, dtype):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).to(device)
    ids = routing(generator, num_tokens, topk, num_experts, device)
    probs = torch.rand(num_tokens, topk, generator=generator).to(device)
    permuted, row_idx, _ = moe_permute(hidden, ids, num_experts=num_experts)
    grad = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).to(device)
    row_bytes = hidden_size * hidden.element_size()
    # read grad_out once, read permuted rows (for grad_probs), write grad_permuted rows
    moved = num_tokens * row_bytes + 2 * num_tokens * topk * row_bytes
    ours, ours_graph = time_us(lambda: torch.ops.moe_ext.moe_unpermute_backward(
        grad, permuted, row_idx, probs, topk, True), device)

    def seed_backward():  # autograd of x[row_idx] * p summed over k, in plain torch
        gathered = grad.unsqueeze(1) * probs.unsqueeze(2).to(dtype)          # [T, K, H]
        grad_permuted = torch.zeros_like(permuted)
        grad_permuted.index_copy_(0, row_idx.long(), gathered.reshape(-1, hidden_size))
        grad_probs = (permuted[row_idx.long()].view(num_tokens, topk, -1).float()
                      * grad.unsqueeze(1).float()).sum(-1)
        return grad_permuted, grad_probs

    seed, seed_graph = time_us(seed_backward, device)
    return Row(name, moved, copy_floor_us(moved, device), ours, seed, ours_graph, seed_graph)


def regroup_case(name, rows_per_group, experts_per_rank, num_ranks, hidden_size, alignment, device,
                 dtype, inverse=False):
    generator = torch.Generator().manual_seed(3)
    groups = experts_per_rank * num_ranks
    counts = torch.bincount(torch.randint(0, groups, (rows_per_group * groups,), generator=generator),
                            minlength=groups).to(device)
    num_rows = int(counts.sum())
    max_len = num_rows + experts_per_rank * alignment
    x = torch.randn(num_rows, hidden_size, generator=generator).to(dtype).to(device)
    grouped = group_by_local_expert(x, counts, experts_per_rank, num_ranks, alignment, max_len)
    indices_with_zero_row = torch.where(grouped.permuted_indices >= 0, grouped.permuted_indices,
                                        torch.full_like(grouped.permuted_indices, num_rows)).long()
    row_bytes = hidden_size * x.element_size()
    if not inverse:
        moved = num_rows * row_bytes + max_len * row_bytes
        ours, ours_graph = time_us(lambda: group_by_local_expert(x, counts, experts_per_rank, num_ranks,
                                                                 alignment, max_len), device)
        seed, seed_graph = time_us(lambda: seed_regroup(x, indices_with_zero_row), device)
    else:
        valid = grouped.permuted_indices >= 0
        moved = 2 * num_rows * row_bytes
        ours, ours_graph = time_us(lambda: ungroup_by_local_expert(grouped.rows, grouped.permuted_indices,
                                                                   num_rows), device)
        seed, seed_graph = time_us(lambda: seed_ungroup(grouped.rows, indices_with_zero_row, num_rows), device)
        del valid
    return Row(name, moved, copy_floor_us(moved, device), ours, seed, ours_graph, seed_graph)


def histogram_case(name, num_tokens, topk, num_experts, device):
    generator = torch.Generator().manual_seed(4)
    ids = routing(generator, num_tokens, topk, num_experts, device)
    moved = ids.numel() * 4 + num_experts * 8
    ours, ours_graph = time_us(lambda: expert_histogram(ids, num_experts), device)
    seed, seed_graph = time_us(lambda: torch.bincount(ids.reshape(-1), minlength=num_experts), device)
    return Row(name, moved, copy_floor_us(moved, device), ours, seed, ours_graph, seed_graph)


def cases(device: str, small: bool, dtype: torch.dtype):
    if small:
        yield permute_case("permute T=256 H=512 K=8 E=64 EP4", 256, 512, 8, 64, 4, device, dtype)
        yield unpermute_case("unpermute T=256 H=512 K=8", 256, 512, 8, 64, device, dtype)
        yield unpermute_backward_case("unpermute bwd T=256 H=512 K=8", 256, 512, 8, 64, device, dtype)
        yield regroup_case("group_by_local_expert 4x8 H=512", 64, 8, 4, 512, 16, device, dtype)
        yield regroup_case("ungroup_by_local_expert 4x8 H=512", 64, 8, 4, 512, 16, device, dtype, True)
        yield histogram_case("expert_histogram T=256 K=8 E=64", 256, 8, 64, device)
        return
    yield permute_case("permute T=8192 H=7168 K=8 E=256 EP8", 8192, 7168, 8, 256, 8, device, dtype)
    yield permute_case("permute T=4096 H=4096 K=2 E=64", 4096, 4096, 2, 64, 1, device, dtype)
    yield unpermute_case("unpermute T=8192 H=7168 K=8", 8192, 7168, 8, 256, device, dtype)
    yield unpermute_backward_case("unpermute bwd T=8192 H=7168 K=8", 8192, 7168, 8, 256, device, dtype)
    for tokens in (16, 256):
        yield permute_case(f"permute T={tokens} H=7168 K=8 E=256 EP8", tokens, 7168, 8, 256, 8, device, dtype)
        yield permute_case(f"permute T={tokens} H=7168 K=8 E=256", tokens, 7168, 8, 256, 1, device, dtype)
        yield unpermute_case(f"unpermute T={tokens} H=7168 K=8", tokens, 7168, 8, 256, device, dtype)
    yield regroup_case("group_by_local_expert 8 ranks x 32 experts, 16k rows H=7168", 64, 32, 8, 7168, 128,
                       device, dtype)
    yield regroup_case("ungroup_by_local_expert (same)", 64, 32, 8, 7168, 128, device, dtype, True)
    yield histogram_case("expert_histogram T=8192 K=8 E=256", 8192, 8, 256, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small sizes (the default without a GPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# moe_ext {moe_ext.__version__} routing benchmark on {name}, torch {torch.__version__}, {args.dtype}")
    print("# floor = D2D copy of the same bytes (read+write) measured in this run; "
          "times per call in µs ('*' = eager loop, not a CUDA graph)")
    header = f"| {'case':<58} | {'MB':>8} | {'floor':>8} | {'ours':>9} | {'seed':>9} | {'ours/floor':>10} | {'seed/ours':>9} |"
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for row in cases(device, small, dtype):
        mark = lambda graph: "" if graph or device == "cpu" else "*"  # noqa: E731
        seed = f"{row.seed:8.1f}{mark(row.seed_graph)}" if row.seed is not None else "n/a"
        ratio = f"{row.seed / row.ours:9.2f}" if row.seed is not None else "n/a"
        print(f"| {row.case:<58} | {row.bytes_moved / 1e6:8.2f} | {row.floor:8.1f} | "
              f"{row.ours:8.1f}{mark(row.ours_graph) or ' '} | {seed:>9} | {row.ours / row.floor:10.2f} | {ratio} |",
              flush=True)


if __name__ == "__main__":
    main()
