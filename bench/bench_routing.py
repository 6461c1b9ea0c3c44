"""Benchmark of the routing ops against the memory floor and the seeds' plain-torch paths.

    python bench/bench_routing.py            # CUDA if available (the issue's sizes), else a CPU smoke run
    python bench/bench_routing.py --small    # small sizes (any device)
    python bench/bench_routing.py --only unpermute,histogram   # only the rows whose name contains one

For each case it prints: the useful bytes (each needed byte read once plus
each output byte written once), two floors for moving that many bytes measured
in the same run -- ``copy_`` (cudaMemcpyAsync) and an ordinary elementwise
kernel -- our op, the plain-torch path of the seeds (argsort + index +
index_add_ for routing, vstack + gather for the regroup), and our time over
the faster floor. Inputs are L2-cold: each case's inputs are cloned into enough
distinct sets that one graph replay touches at least twice the L2 size. On
CUDA every timing is the device time of one call, taken from a CUDA graph
replaying at least 20 calls (launch gaps included, Python overhead excluded);
a path that cannot be captured is timed with events around an eager loop and
marked '*'. Permute and unpermute run at EP 1/2/4/8/32 as EP rank 0 (its
contiguous share of the experts).
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
MAX_INPUT_SETS = 512  # distinct input copies per graph, so that inputs are L2-cold


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
#
# Every timed call reads inputs that are not warm in L2: a case's inputs are
# cloned into enough distinct sets that one graph replay touches at least twice
# the L2 size, and call i of the graph uses set i % sets. The floors are timed
# the same way over the same number of bytes.

def l2_bytes(device: str) -> int:
    if device != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20))


def input_sets(inputs: tuple, footprint: int, device: str) -> list[tuple]:
    """``inputs`` plus clones of its tensors, enough that the sets together exceed 2 x L2."""
    l2 = l2_bytes(device)
    count = 1 if l2 == 0 else min(MAX_INPUT_SETS, max(1, -(-2 * l2 // max(footprint, 1))))
    clone = lambda value: value.clone() if isinstance(value, torch.Tensor) else value  # noqa: E731
    return [inputs] + [tuple(clone(v) for v in inputs) for _ in range(count - 1)]


def time_us(fn: Callable[..., object], sets: list[tuple], device: str) -> tuple[float, bool]:
    """Device time of one call ``fn(*sets[i])`` in µs, and whether it came from a CUDA graph."""
    if device == "cpu":
        fn(*sets[0])
        repeats, start = 0, time.perf_counter()
        while repeats < 5 or time.perf_counter() - start < 0.2:
            fn(*sets[repeats % len(sets)])
            repeats += 1
        return (time.perf_counter() - start) / repeats * 1e6, False
    calls = max(CALLS_PER_GRAPH, len(sets))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(*sets[i % len(sets)])
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(*sets[i % len(sets)])
        graph.replay()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, begin.elapsed_time(end) * 1e3 / calls)
        del graph
        return best, True
    except Exception:  # not capturable (host sync, ...): events around an eager loop
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(calls):
            fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) * 1e3 / calls, False


def floors_us(num_bytes: int, device: str) -> tuple[float, float]:
    """(memcpy, kernel) floors: moving num_bytes / 2 in and num_bytes / 2 out.

    memcpy is ``copy_`` (cudaMemcpyAsync in a graph); kernel is an ordinary
    elementwise kernel (``torch.neg`` over fp32 words) moving the same bytes. On
    an H200 the kernel copy is the faster of the two at large sizes (the copy
    engine path tops out near 2.7 TB/s), so a ratio against memcpy alone flatters.
    """
    half = max(16, num_bytes // 2) // 16 * 16
    source = torch.ones(half // 4, dtype=torch.float32, device=device)  # no RNG: safe after a failed capture
    sets = input_sets((source, torch.empty_like(source)), 2 * half, device)
    memcpy = time_us(lambda src, dst: dst.copy_(src), sets, device)[0]
    kernel = time_us(lambda src, dst: torch.neg(src, out=dst), sets, device)[0]
    return memcpy, kernel


@dataclass
class Row:
    case: str
    bytes_moved: int
    memcpy: float
    kernel: float
    ours: float
    seed: float | None
    ours_graph: bool
    seed_graph: bool

    @property
    def floor(self) -> float:
        return min(self.memcpy, self.kernel)


def measure(name: str, moved: int, ours_fn, seed_fn, inputs: tuple, device: str) -> Row:
    """Time ours and the seed path over L2-cold copies of ``inputs``, plus both floors."""
    footprint = sum(v.numel() * v.element_size() for v in inputs if isinstance(v, torch.Tensor))
    sets = input_sets(inputs, max(footprint, moved), device)
    ours, ours_graph = time_us(ours_fn, sets, device)
    seed, seed_graph = time_us(seed_fn, sets, device) if seed_fn is not None else (None, False)
    del sets
    memcpy, kernel = floors_us(moved, device)
    return Row(name, moved, memcpy, kernel, ours, seed, ours_graph, seed_graph)


# ---------------------------------------------------------------- cases

def routing(generator, num_tokens, topk, num_experts, device):
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:topk] for _ in range(num_tokens)])
    return ids.to(torch.int32).to(device)


def rank0_range(num_experts: int, ep_size: int) -> tuple[int, int]:
    """The active expert range of EP rank 0 (experts contiguous per rank)."""
    return 0, num_experts // ep_size


def permute_case(name, num_tokens, hidden_size, topk, num_experts, ep_size, device, dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).to(device)
    ids = routing(generator, num_tokens, topk, num_experts, device)
    active = rank0_range(num_experts, ep_size)
    local = active[1]
    expert_map = None
    if ep_size > 1:
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
        expert_map[:local] = torch.arange(local, dtype=torch.int32, device=device)
    row_idx = moe_permute(hidden, ids, num_experts=num_experts, active_expert_range=active).expanded_row_idx
    valid_rows = int((row_idx >= 0).sum())
    needed_tokens = int((row_idx.view(num_tokens, topk) >= 0).any(1).sum())
    row_bytes = hidden_size * hidden.element_size()
    # useful bytes: each needed token row read once, each valid row written once, the ids read
    moved = needed_tokens * row_bytes + valid_rows * row_bytes + ids.numel() * ids.element_size()
    yield measure(name, moved,
                  lambda h, i: moe_permute(h, i, num_experts=num_experts, active_expert_range=active),
                  lambda h, i: seed_permute(h, i, expert_map, local), (hidden, ids), device)
    if num_tokens * topk > 2048:  # the index alone (H=0: no row copied), to split the time; same bytes column
        yield measure(f"  (index only, H=0) {name.split(' ', 1)[1]}", moved,
                      lambda h, i: moe_permute(h[:, :0], i, num_experts=num_experts, active_expert_range=active),
                      None, (hidden, ids), device)


def unpermute_case(name, num_tokens, hidden_size, topk, num_experts, ep_size, device, dtype):
    """Combine on EP rank 0: its local rows only; tokens with no local row get zeros."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).to(device)
    ids = routing(generator, num_tokens, topk, num_experts, device)
    probs = torch.rand(num_tokens, topk, generator=generator).to(device)
    active = rank0_range(num_experts, ep_size)
    permuted, row_idx, _ = moe_permute(hidden, ids, num_experts=num_experts, active_expert_range=active)
    valid_rows = int((row_idx >= 0).sum())
    expert_map = None
    if ep_size > 1:
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
        expert_map[:active[1]] = torch.arange(active[1], dtype=torch.int32, device=device)
    _, sorted_tokens, _ = seed_permute(hidden, ids, expert_map, active[1])
    flat = ids.reshape(-1).long()
    kept = (flat >= active[0]) & (flat < active[1])
    order = torch.argsort(torch.where(kept, flat, torch.full_like(flat, num_experts)), stable=True)
    sorted_weights = probs.reshape(-1)[order][:valid_rows]
    sorted_tokens = sorted_tokens[:valid_rows]
    row_bytes = hidden_size * hidden.element_size()
    # useful bytes: each valid row read once, every output row written once, indices + probs read
    moved = valid_rows * row_bytes + num_tokens * row_bytes + num_tokens * topk * 8
    return measure(name, moved,
                   lambda p, r, w, t, sw: moe_unpermute(p, r, w),
                   lambda p, r, w, t, sw: seed_unpermute(p[:valid_rows], t, sw, num_tokens),
                   (permuted, row_idx, probs, sorted_tokens, sorted_weights), device)


def unpermute_backward_case(name, num_tokens, hidden_size, topk, num_experts, ep_size, device, dtype):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).to(device)
    ids = routing(generator, num_tokens, topk, num_experts, device)
    probs = torch.rand(num_tokens, topk, generator=generator).to(device)
    active = rank0_range(num_experts, ep_size)
    permuted, row_idx, _ = moe_permute(hidden, ids, num_experts=num_experts, active_expert_range=active)
    valid_rows = int((row_idx >= 0).sum())
    needed_tokens = int((row_idx.view(num_tokens, topk) >= 0).any(1).sum())
    grad = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).to(device)
    row_bytes = hidden_size * hidden.element_size()
    # useful bytes: grad rows of tokens with a local row, the valid permuted rows (for grad_probs),
    # the grad_permuted rows written, indices and probs read, grad_probs written
    moved = needed_tokens * row_bytes + 2 * valid_rows * row_bytes + num_tokens * topk * 12

    def seed_backward(g, p, r, w):  # autograd of x[row_idx] * p summed over k, in plain torch (no host sync)
        keep = r >= 0
        dump = p.shape[0]  # dropped entries write into one extra row, cut off afterwards
        target = torch.where(keep, r, torch.full_like(r, dump)).long()
        safe = torch.where(keep, r, torch.zeros_like(r)).long()
        gathered = g.unsqueeze(1) * w.unsqueeze(2).to(dtype)          # [T, K, H]
        grad_permuted = p.new_zeros((dump + 1, hidden_size))
        grad_permuted.index_copy_(0, target, gathered.reshape(-1, hidden_size))
        grad_probs = (p[safe].view(num_tokens, topk, -1).float() * g.unsqueeze(1).float()).sum(-1)
        return grad_permuted[:dump], grad_probs * keep.view(num_tokens, topk)

    return measure(name, moved,
                   lambda g, p, r, w: torch.ops.moe_ext.moe_unpermute_backward(g, p, r, w, topk, True),
                   seed_backward, (grad, permuted, row_idx.view(-1), probs), device)


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
        return measure(name, moved,
                       lambda x_, c, z: group_by_local_expert(x_, c, experts_per_rank, num_ranks, alignment,
                                                              max_len),
                       lambda x_, c, z: seed_regroup(x_, z), (x, counts, indices_with_zero_row), device)
    moved = 2 * num_rows * row_bytes
    return measure(name, moved,
                   lambda g, i, z: ungroup_by_local_expert(g, i, num_rows),
                   lambda g, i, z: seed_ungroup(g, z, num_rows),
                   (grouped.rows, grouped.permuted_indices, indices_with_zero_row), device)


def histogram_case(name, num_tokens, topk, num_experts, device):
    generator = torch.Generator().manual_seed(4)
    ids = routing(generator, num_tokens, topk, num_experts, device)
    moved = ids.numel() * 4 + num_experts * 8
    return measure(name, moved, lambda i: expert_histogram(i, num_experts),
                   lambda i: torch.bincount(i.reshape(-1), minlength=num_experts), (ids,), device)


# ---------------------------------------------------------------- aligned and fp8 variants (issue 20, 4 and 5)

def seed_permute_padded(hidden, topk_ids, expert_map, num_local, alignment, scales):
    """The plain-torch path: seed_permute, then the usual padding step (a second copy of the rows into a
    zeroed buffer at padded offsets, as torchtitan-style code does); scales gathered with their rows."""
    rows, sorted_tokens, counts = seed_permute(hidden.view(torch.uint8) if hidden.element_size() == 1 else hidden,
                                               topk_ids, expert_map, num_local)
    padded = (counts + alignment - 1) // alignment * alignment
    ends = torch.cumsum(counts, 0)
    position = torch.arange(rows.shape[0], device=rows.device)
    expert = torch.searchsorted(ends, position, right=True).clamp_max(num_local - 1)
    bound = topk_ids.numel() + num_local * (alignment - 1)
    moved = position - (ends - counts)[expert] + (torch.cumsum(padded, 0) - padded)[expert]
    destination = torch.where(position < ends[-1], moved, torch.full_like(position, bound))
    out = rows.new_zeros((bound + 1, rows.shape[1]))
    out.index_copy_(0, destination, rows)
    out_scales = None
    if scales is not None:
        out_scales = scales.new_zeros((bound + 1, scales.shape[1]))
        out_scales.index_copy_(0, destination, scales[sorted_tokens])
    return out, out_scales, padded


def permute_variant_case(name, num_tokens, hidden_size, topk, num_experts, ep_size, device, dtype, *,
                         alignment=1, fp8=False):
    """moe_permute with alignment and / or float8 rows with per-128-column-block fp32 scales, on EP rank 0.
    Useful bytes: needed token rows (and their scales) read once, valid and pad rows written once, ids read."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype)
    scales = None
    if fp8:
        hidden = hidden.float().to(torch.float8_e4m3fn)
        scales = (torch.rand(num_tokens, -(-hidden_size // 128), generator=generator) + 0.5).to(device)
    hidden = hidden.to(device)
    ids = routing(generator, num_tokens, topk, num_experts, device)
    active = rank0_range(num_experts, ep_size)
    local = active[1]
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    expert_map[:local] = torch.arange(local, dtype=torch.int32, device=device)
    result = moe_permute(hidden, ids, num_experts=num_experts, active_expert_range=active, alignment=alignment,
                         scales=scales)
    padded_rows = int(result.expert_tokens.sum())
    needed_tokens = int((result.expanded_row_idx.view(num_tokens, topk) >= 0).any(1).sum())
    row_bytes = hidden_size * hidden.element_size() + (scales.shape[1] * 4 if fp8 else 0)
    moved = needed_tokens * row_bytes + padded_rows * row_bytes + ids.numel() * ids.element_size()
    inputs = (hidden, ids) + ((scales,) if fp8 else ())
    return measure(name, moved,
                   lambda h, i, *s: moe_permute(h, i, num_experts=num_experts, active_expert_range=active,
                                                alignment=alignment, scales=s[0] if s else None),
                   lambda h, i, *s: seed_permute_padded(h, i, expert_map, local, alignment, s[0] if s else None),
                   inputs, device)


def variant_cases(device: str, small: bool, dtype: torch.dtype):
    """(name, thunk) of the aligned and fp8 rows; each thunk yields that case's rows."""
    def case(name, *args, **kwargs):
        return name, lambda: [permute_variant_case(name, *args, device, dtype, **kwargs)]

    if small:
        yield case("permute aligned A=128 T=256 H=512 K=8 EP4", 256, 512, 8, 64, 4, alignment=128)
        yield case("permute fp8+scales T=256 H=512 K=8 EP4", 256, 512, 8, 64, 4, fp8=True)
        return
    for ep in (1, 8):
        yield case(f"permute aligned A=128 T=8192 H=7168 K=8 EP{ep}", 8192, 7168, 8, 256, ep, alignment=128)
        yield case(f"permute fp8+scales T=8192 H=7168 K=8 EP{ep}", 8192, 7168, 8, 256, ep, fp8=True)
        yield case(f"permute fp8+scales A=128 T=8192 H=7168 K=8 EP{ep}", 8192, 7168, 8, 256, ep, alignment=128,
                   fp8=True)
    yield case("permute fp8+scales A=128 T=256 H=7168 K=8 EP8", 256, 7168, 8, 256, 8, alignment=128, fp8=True)


EP_SIZES = (1, 2, 4, 8, 32)


def case_list(device: str, small: bool, dtype: torch.dtype):
    """Every case as (name, thunk): the thunk builds the inputs and yields the case's rows (permute adds an
    '(index only, H=0)' row). Nothing is built or timed until a thunk is called, so --only is cheap."""
    def permute(name, *args):
        return name, lambda: permute_case(name, *args, device, dtype)

    def single(build, name, *args, **kwargs):
        return name, lambda: [build(name, *args, device, dtype, **kwargs)]

    if small:
        yield permute("permute T=256 H=512 K=8 E=64 EP4", 256, 512, 8, 64, 4)
        yield single(unpermute_case, "unpermute T=256 H=512 K=8 EP4", 256, 512, 8, 64, 4)
        yield single(unpermute_backward_case, "unpermute bwd T=256 H=512 K=8", 256, 512, 8, 64, 1)
        yield single(regroup_case, "group_by_local_expert 4x8 H=512", 64, 8, 4, 512, 16)
        yield single(regroup_case, "ungroup_by_local_expert 4x8 H=512", 64, 8, 4, 512, 16, inverse=True)
        yield "expert_histogram T=256 K=8 E=64", lambda: [histogram_case("expert_histogram T=256 K=8 E=64", 256, 8,
                                                                         64, device)]
        yield from variant_cases(device, small, dtype)
        return
    for ep in EP_SIZES:
        yield permute(f"permute T=8192 H=7168 K=8 E=256 EP{ep}", 8192, 7168, 8, 256, ep)
    yield permute("permute T=4096 H=4096 K=2 E=64", 4096, 4096, 2, 64, 1)
    for ep in EP_SIZES:
        yield single(unpermute_case, f"unpermute T=8192 H=7168 K=8 E=256 EP{ep}", 8192, 7168, 8, 256, ep)
    yield single(unpermute_case, "unpermute T=4096 H=4096 K=2 E=64", 4096, 4096, 2, 64, 1)
    for ep in EP_SIZES:
        yield single(unpermute_backward_case, f"unpermute bwd T=8192 H=7168 K=8 E=256 EP{ep}", 8192, 7168, 8, 256, ep)
    yield single(unpermute_backward_case, "unpermute bwd T=4096 H=4096 K=2 E=64", 4096, 4096, 2, 64, 1)
    for tokens in (16, 256):
        for ep in (1, 8):
            yield permute(f"permute T={tokens} H=7168 K=8 E=256 EP{ep}", tokens, 7168, 8, 256, ep)
            yield single(unpermute_case, f"unpermute T={tokens} H=7168 K=8 E=256 EP{ep}", tokens, 7168, 8, 256, ep)
    yield single(regroup_case, "group_by_local_expert 8 ranks x 32 experts, 16k rows H=7168", 64, 32, 8, 7168, 128)
    yield single(regroup_case, "ungroup_by_local_expert (same)", 64, 32, 8, 7168, 128, inverse=True)
    yield "expert_histogram T=8192 K=8 E=256", lambda: [histogram_case("expert_histogram T=8192 K=8 E=256", 8192, 8,
                                                                       256, device)]
    yield from variant_cases(device, small, dtype)


def selected(name: str, only: list[str]) -> bool:
    """--only: keep a case whose name contains any of the substrings (case-insensitive); all without --only."""
    return not only or any(part.lower() in name.lower() for part in only)


def cases(device: str, small: bool, dtype: torch.dtype, only: list[str] | None = None):
    """The rows of the cases ``selected`` by ``only``, timed one case at a time."""
    for name, rows in case_list(device, small, dtype):
        if selected(name, only or []):
            yield from rows()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small sizes (the default without a GPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="time only the cases whose name contains SUBSTRING (case-insensitive; repeatable or "
                             "comma-separated: a case is kept if it contains any). A case's extra rows, such as "
                             "permute's '(index only, H=0)' row, are kept or dropped with it")
    args = parser.parse_args()
    only = [part for value in args.only for part in value.split(",") if part]
    if args.only and not only:
        parser.error("--only needs a non-empty SUBSTRING")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    dtype = getattr(torch, args.dtype)
    if not any(selected(case_name, only) for case_name, _ in case_list(device, small, dtype)):
        parser.error(f"--only {','.join(only)} matches no case; the cases are:\n  "
                     + "\n  ".join(case_name for case_name, _ in case_list(device, small, dtype)))
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# moe_ext {moe_ext.__version__} routing benchmark on {name}, torch {torch.__version__}, {args.dtype}, "
          f"L2 {l2_bytes(device) >> 20} MiB")
    print("# floors: memcpy = copy_ of the same bytes, kernel = an elementwise kernel moving them; ratio against "
          "the faster. Inputs L2-cold (rotated copies). Times per call in µs ('*' = eager loop, not a CUDA graph)")
    header = (f"| {'case':<46} | {'MB':>8} | {'memcpy':>8} | {'kernel':>8} | {'ours':>9} | {'seed':>9} "
              f"| {'ours/floor':>10} | {'seed/ours':>9} |")
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for row in cases(device, small, dtype, only):
        mark = lambda graph: "" if graph or device == "cpu" else "*"  # noqa: E731
        seed = f"{row.seed:8.1f}{mark(row.seed_graph)}" if row.seed is not None else "n/a"
        ratio = f"{row.seed / row.ours:9.2f}" if row.seed is not None else "n/a"
        print(f"| {row.case:<46} | {row.bytes_moved / 1e6:8.2f} | {row.memcpy:8.1f} | {row.kernel:8.1f} | "
              f"{row.ours:8.1f}{mark(row.ours_graph) or ' '} | {seed:>9} | {row.ours / row.floor:10.2f} | {ratio} |",
              flush=True)
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
