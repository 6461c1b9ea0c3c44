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

Public columns (issue 20 item 8): the public Triton routing kernels of megablocks
0.10.0 and TransformerEngine 2.20.2 timed the same way on the same inputs, their
outputs checked against ours first; they need the pinned archives in
.bench_public/ (bash scripts/fetch_public_kernels.sh; MOE_EXT_BENCH_PUBLIC
overrides the folder) and CUDA, else the header says why and the cells are
n/a. bench/public_kernels.py loads them; docs/PERFORMANCE.md says what each
column times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import moe_ext
from moe_ext.ops import (expert_histogram, group_by_local_expert, moe_permute, moe_unpermute,
                         ungroup_by_local_expert)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import public_kernels  # noqa: E402  (bench/public_kernels.py: the public comparators, loaded at run time)

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


MAX_SETS_BYTES = 8 << 30  # memory cap on the clones of one case's inputs


def input_sets(inputs: tuple, touched: int, device: str) -> list[tuple]:
    """``inputs`` plus clones of its tensors, enough that one round over the sets touches > 2 x L2 (so a call's
    inputs are not left in L2 by the previous call on the same set).

    ``touched`` is what one call reads and writes (the case's useful bytes), not the inputs' size: a call may
    read only part of its inputs -- unpermute under EP reads only the valid rows of a [T*K, H] buffer -- and
    counting the whole buffer gave too few sets (before 2026-11-30 20:55: at decode sizes under EP the rows a
    replay read stayed in L2 while the floors' did not).
    """
    l2 = l2_bytes(device)
    footprint = sum(v.numel() * v.element_size() for v in inputs if isinstance(v, torch.Tensor))
    count = 1 if l2 == 0 else min(MAX_INPUT_SETS, max(1, -(-2 * l2 // max(touched, 1))),
                                  max(1, MAX_SETS_BYTES // max(footprint, 1)))
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
class PublicCall:
    """A public kernel's call on the case's inputs: ``fn(*inputs)``; ``check(output)`` returns None when the
    output matches ours (same rows; sums within bf16 rounding), else what differs."""
    fn: Callable[..., object]
    inputs: tuple
    check: Callable[[object], str | None]


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
    # per public kernel key: (µs, from a CUDA graph) or why there is no time ("n/a", "wrong", "error")
    public: dict[str, tuple[float, bool] | str] | None = None

    @property
    def floor(self) -> float:
        return min(self.memcpy, self.kernel)


def footprint_of(inputs: tuple) -> int:
    return sum(v.numel() * v.element_size() for v in inputs if isinstance(v, torch.Tensor))


def time_public(key: str, call: PublicCall | str, moved: int, device: str) -> tuple[float, bool] | str:
    """Check the public kernel's output against ours once, then time it like ours (L2-cold, CUDA graph)."""
    if isinstance(call, str):
        return call
    try:
        problem = call.check(call.fn(*call.inputs))
    except Exception as error:  # noqa: BLE001 - a public kernel that fails on this case gets "error", the run goes on
        print(f"# public {key}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
              file=sys.stderr)
        return "error"
    if problem:
        print(f"# public {key}: output differs from ours: {problem}", file=sys.stderr)
        return "wrong"
    sets = input_sets(call.inputs, moved, device)
    return time_us(call.fn, sets, device)


def measure(name: str, moved: int, ours_fn, seed_fn, inputs: tuple, device: str,
            public: dict[str, PublicCall | str] | None = None) -> Row:
    """Time ours, the seed path and each available public kernel over L2-cold copies of the inputs, plus
    both floors."""
    sets = input_sets(inputs, moved, device)
    ours, ours_graph = time_us(ours_fn, sets, device)
    seed, seed_graph = time_us(seed_fn, sets, device) if seed_fn is not None else (None, False)
    del sets
    timed = {key: time_public(key, call, moved, device) for key, call in (public or {}).items()}
    memcpy, kernel = floors_us(moved, device)
    return Row(name, moved, memcpy, kernel, ours, seed, ours_graph, seed_graph, timed)


# ---------------------------------------------------------------- public comparators (issue 20 item 8)
#
# megablocks (backend/kernels.py): gather / scatter / scatter_wgrad / _padded_copy take a precomputed index
# (token indices sorted by expert, their expert ids, bins = inclusive cumsum of the counts). Its own index
# ops (ops.sort, ops.histogram) are CUDA-extension ops, not Triton, so for permute the timed call builds the
# same index with torch ops (stable torch.sort, a scatter_add_ histogram, cumsum): "index included", like
# ours; the "(index only, H=0)" row times that index alone. It has no expert filter (it moves all T*K rows),
# so it has no EP row, and no scale rows (no fp8+scales row).
# te (transformer_engine pytorch/triton/permutation.py, the mask-map path): a [T, E] routing mask ->
# make_row_id_map (three Triton passes) -> permute_with_mask_map (fp8 rows with block scales and fused
# padding included); unpermute and its backward with merging probs [T, E]. The timed permute builds the mask
# from topk_ids (one scatter): index included. Under EP it gets the local experts' columns of the mask and
# the exact local row count (what Megatron's dispatcher passes as num_out_tokens).

PUBLIC: dict[str, public_kernels.Public] = {}  # filled by main(); empty = no public column asked for
PUBLIC_KEYS = ("megablocks", "te")


def public_calls(**builders) -> dict[str, PublicCall | str]:
    """Per public kernel: its PublicCall when it is available and applies to the case, else "n/a".
    A builder is a function of the kernel's modules returning a PublicCall, or a str: why it does not apply."""
    calls: dict[str, PublicCall | str] = {}
    for key in PUBLIC_KEYS:
        public, builder = PUBLIC.get(key), builders.get(key, "does not apply")
        if public is None or not public.available or isinstance(builder, str):
            calls[key] = "n/a"
        else:
            calls[key] = builder(public.modules)
    return calls


def rows_equal(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} vs ours {tuple(want.shape)}"
    if got.element_size() == 1:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    if not torch.equal(got, want):
        return f"{name}: {int((got != want).any(-1).sum()) if got.dim() > 1 else int((got != want).sum())} rows differ"
    return None


def close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-2) -> str | None:
    """Sums in another order / with another rounding of the products: within rtol of ours' largest value."""
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} vs ours {tuple(want.shape)}"
    got, want = got.float(), want.float()
    error = float((got - want).abs().max()) if got.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    return None if error <= rtol * max(scale, 1e-6) else f"{name}: max abs diff {error:.4g} (ours' max {scale:.4g})"


def first_problem(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


def megablocks_index(ids: torch.Tensor, num_experts: int):
    """megablocks' indices_and_bins in torch ops: (indices of the flat (t, k) entries sorted by expert, stable;
    their expert ids; bins = inclusive cumsum of the per-expert counts, int32)."""
    flat = ids.reshape(-1)
    bin_ids, indices = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat))
    return indices, bin_ids, torch.cumsum(counts, 0, dtype=torch.int32)


def te_routing_map(ids: torch.Tensor, num_experts: int, local: int) -> torch.Tensor:
    """The [T, local] bool routing mask of the local experts 0..local-1 (a view of the [T, E] mask)."""
    mask = torch.zeros((ids.shape[0], num_experts), dtype=torch.bool, device=ids.device)
    mask.scatter_(1, ids.long(), True)
    return mask[:, :local]


def te_merging_probs(ids: torch.Tensor, probs: torch.Tensor, num_experts: int, local: int) -> torch.Tensor:
    dense = torch.zeros((ids.shape[0], num_experts), dtype=probs.dtype, device=ids.device)
    dense.scatter_(1, ids.long(), probs)
    return dense[:, :local].contiguous()


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
    ours = moe_permute(hidden, ids, num_experts=num_experts, active_expert_range=active).permuted[:valid_rows]

    def megablocks(modules):
        def call(h, i):
            indices, bin_ids, bins = megablocks_index(i, num_experts)
            return modules["kernels"].gather(h, indices, bin_ids, None, bins, topk)
        return PublicCall(call, (hidden, ids), lambda out: rows_equal("permuted", out, ours))

    def te(modules):
        def call(h, i):
            row_id_map = modules["permutation"].make_row_id_map(te_routing_map(i, num_experts, local), num_tokens,
                                                                local)
            return modules["permutation"].permute_with_mask_map(h, row_id_map, None, None, None, num_tokens, local,
                                                                max(valid_rows, 1), hidden_size, None)[0]
        return PublicCall(call, (hidden, ids), lambda out: rows_equal("permuted", out[:valid_rows], ours))

    no_filter = "megablocks moves all T*K rows: no expert filter"
    yield measure(name, moved,
                  lambda h, i: moe_permute(h, i, num_experts=num_experts, active_expert_range=active),
                  lambda h, i: seed_permute(h, i, expert_map, local), (hidden, ids), device,
                  public_calls(megablocks=megablocks if ep_size == 1 else no_filter, te=te))
    if num_tokens * topk > 2048:  # the index alone (H=0: no row copied), to split the time; same bytes column
        def megablocks_index_only(modules):
            return PublicCall(lambda h, i: megablocks_index(i, num_experts), (hidden, ids), lambda out: None)

        def te_index_only(modules):
            return PublicCall(lambda h, i: modules["permutation"].make_row_id_map(
                te_routing_map(i, num_experts, local), num_tokens, local), (hidden, ids), lambda out: None)

        yield measure(f"  (index only, H=0) {name.split(' ', 1)[1]}", moved,
                      lambda h, i: moe_permute(h[:, :0], i, num_experts=num_experts, active_expert_range=active),
                      None, (hidden, ids), device,
                      public_calls(megablocks=megablocks_index_only if ep_size == 1 else no_filter, te=te_index_only))


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
    ours = moe_unpermute(permuted, row_idx, probs)
    local = active[1]

    def megablocks(modules):  # scatter: weighted sum of each token's K rows, the index from the forward
        indices, bin_ids, bins = megablocks_index(ids, num_experts)
        return PublicCall(lambda p, ix, b, w, bn: modules["kernels"].scatter(p, ix, b, w, bn, topk),
                          (permuted, indices, bin_ids, probs.reshape(-1), bins), lambda out: close("out", out, ours))

    def te(modules):  # unpermute_with_mask_map with merging probs, the row_id_map from the forward
        row_id_map = modules["permutation"].make_row_id_map(te_routing_map(ids, num_experts, local), num_tokens,
                                                            local)
        merging = te_merging_probs(ids, probs, num_experts, local)
        return PublicCall(lambda p, m, mp: modules["permutation"].unpermute_with_mask_map(
            p, m, mp, None, None, num_tokens, local, hidden_size)[0],
            (permuted, row_id_map, merging), lambda out: close("out", out, ours))

    return measure(name, moved,
                   lambda p, r, w, t, sw: moe_unpermute(p, r, w),
                   lambda p, r, w, t, sw: seed_unpermute(p[:valid_rows], t, sw, num_tokens),
                   (permuted, row_idx, probs, sorted_tokens, sorted_weights), device,
                   public_calls(megablocks=megablocks if ep_size == 1 else "no expert filter", te=te))


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

    ours_permuted, ours_probs = torch.ops.moe_ext.moe_unpermute_backward(grad, permuted, row_idx.view(-1), probs,
                                                                         topk, True)
    ours_permuted = ours_permuted[:valid_rows]
    local = active[1]
    kept = (ids >= active[0]) & (ids < active[1])

    def megablocks(modules):  # ScatterOp.backward: gather of grad (weighted) + scatter_wgrad (the prob grads)
        indices, bin_ids, bins = megablocks_index(ids, num_experts)
        kernels = modules["kernels"]

        def call(g, p, ix, b, w, bn):
            return kernels.gather(g, ix, b, w, bn, topk), kernels.scatter_wgrad(p, g, ix, b, bn, topk)
        return PublicCall(call, (grad, permuted, indices, bin_ids, probs.reshape(-1), bins),
                          lambda out: first_problem(close("grad_permuted", out[0], ours_permuted),
                                                    close("grad_probs", out[1].view(num_tokens, topk), ours_probs)))

    def te(modules):  # unpermute_with_mask_map_bwd_with_merging_probs
        permutation = modules["permutation"]
        row_id_map = permutation.make_row_id_map(te_routing_map(ids, num_experts, local), num_tokens, local)
        merging = te_merging_probs(ids, probs, num_experts, local)
        local_ids = torch.where(kept, ids, torch.zeros_like(ids)).long()

        def check(out):
            grad_probs = torch.where(kept, out[1].gather(1, local_ids), torch.zeros_like(ours_probs))
            return first_problem(close("grad_permuted", out[0][:valid_rows], ours_permuted),
                                 close("grad_probs", grad_probs, ours_probs * kept))
        return PublicCall(lambda g, p, m, mp: permutation.unpermute_with_mask_map_bwd_with_merging_probs(
            g, m, p, mp, None, num_tokens, local, max(valid_rows, 1), hidden_size),
            (grad, permuted, row_id_map, merging), check)

    return measure(name, moved,
                   lambda g, p, r, w: torch.ops.moe_ext.moe_unpermute_backward(g, p, r, w, topk, True),
                   seed_backward, (grad, permuted, row_idx.view(-1), probs), device,
                   public_calls(megablocks=megablocks if ep_size == 1 else "no expert filter", te=te))


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
    # te: TransformerEngine's chunk sort (make_chunk_sort_map + sort_chunks_by_map), what Megatron's all-to-all
    # dispatcher runs after the exchange: chunks (rank r, expert e) reordered to (e, r), no padding -- so only
    # rows without alignment (and, as here, no empty expert: ours gives an empty expert one zero row) compare.
    chunk_order = torch.arange(groups, device=device).view(num_ranks, experts_per_rank).t().reshape(-1)
    empty_expert = bool((counts.view(num_ranks, experts_per_rank).sum(0) == 0).any())
    te_applies = alignment == 1 and not empty_expert
    if not inverse:
        moved = num_rows * row_bytes + max_len * row_bytes
        ours_rows = grouped.rows[:num_rows]

        def te(modules):
            permutation = modules["permutation"]

            def call(x_, c, order):
                row_id_map = permutation.make_chunk_sort_map(c, order, num_rows, groups)
                return permutation.sort_chunks_by_map(x_, row_id_map, None, num_rows, hidden_size, True)[0]
            return PublicCall(call, (x, counts, chunk_order), lambda out: rows_equal("rows", out, ours_rows))

        return measure(name, moved,
                       lambda x_, c, z: group_by_local_expert(x_, c, experts_per_rank, num_ranks, alignment,
                                                              max_len),
                       lambda x_, c, z: seed_regroup(x_, z), (x, counts, indices_with_zero_row), device,
                       public_calls(megablocks="no chunk sort", te=te if te_applies else "pads no expert block"))
    moved = 2 * num_rows * row_bytes

    def te_inverse(modules):  # the forward's map, read backwards (like ours: the forward's permuted_indices)
        permutation = modules["permutation"]
        row_id_map = permutation.make_chunk_sort_map(counts, chunk_order, num_rows, groups)
        return PublicCall(lambda g, m: permutation.sort_chunks_by_map(g, m, None, num_rows, hidden_size, False)[0],
                          (grouped.rows, row_id_map), lambda out: rows_equal("rows", out, x))

    return measure(name, moved,
                   lambda g, i, z: ungroup_by_local_expert(g, i, num_rows),
                   lambda g, i, z: seed_ungroup(g, z, num_rows),
                   (grouped.rows, grouped.permuted_indices, indices_with_zero_row), device,
                   public_calls(megablocks="no chunk sort", te=te_inverse if te_applies else "pads no expert block"))


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
    ours_rows = result.permuted[:padded_rows]
    ours_scales = result.permuted_scales[:padded_rows] if fp8 else None

    def padded_bins_of(bins):  # inclusive cumsum of the counts, each rounded up to the alignment
        counts = torch.diff(bins, prepend=bins.new_zeros(1))
        return torch.cumsum((counts + alignment - 1) // alignment * alignment, 0, dtype=torch.int32)

    def megablocks(modules):
        """padded_gather's body (torch.zeros of the padded rows, then _padded_copy) with the padded row count known
        on the host, as padded_gather would read it with .item(): no host sync, so it can be graph-captured."""
        kernels = modules["kernels"]

        def call(h, i):
            indices, bin_ids, bins = megablocks_index(i, num_experts)
            out = torch.zeros((padded_rows, hidden_size), dtype=h.dtype, device=h.device)
            kernels._padded_copy[(indices.shape[0],)](h, out, indices, bin_ids, None, bins, padded_bins_of(bins),
                                                      NUM_COLUMNS=hidden_size, A_TO_B=True, TOP_K=topk, SCALE=False)
            return out
        return PublicCall(call, inputs, lambda out: rows_equal("permuted", out, ours_rows))

    def te(modules):
        """permute_with_mask_map: fp8 rows with their scale rows, fused padding via pad_offsets (the rows added
        before each expert's block); num_out_tokens = the padded row count, known on the host."""
        permutation = modules["permutation"]

        def call(h, i, *s):
            mask = te_routing_map(i, num_experts, local)
            row_id_map = permutation.make_row_id_map(mask, num_tokens, local)
            pad_offsets = None
            if alignment > 1:
                counts = mask.sum(0)
                extra = (counts + alignment - 1) // alignment * alignment - counts
                pad_offsets = torch.cumsum(extra, 0) - extra
            return permutation.permute_with_mask_map(h, row_id_map, None, s[0] if s else None, pad_offsets,
                                                     num_tokens, local, max(padded_rows, 1), hidden_size,
                                                     s[0].shape[1] if s else None)

        def check(out):
            return first_problem(rows_equal("permuted", out[0][:padded_rows], ours_rows),
                                 rows_equal("scales", out[1][:padded_rows], ours_scales) if fp8 else None)
        return PublicCall(call, inputs, check)

    mb_applies = "no expert filter" if ep_size > 1 else ("no scale rows" if fp8 else megablocks)
    return measure(name, moved,
                   lambda h, i, *s: moe_permute(h, i, num_experts=num_experts, active_expert_range=active,
                                                alignment=alignment, scales=s[0] if s else None),
                   lambda h, i, *s: seed_permute_padded(h, i, expert_map, local, alignment, s[0] if s else None),
                   inputs, device, public_calls(megablocks=mb_applies, te=te))


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
    yield single(regroup_case, "group_by_local_expert (same) A=1", 64, 32, 8, 7168, 1)
    yield single(regroup_case, "ungroup_by_local_expert (same) A=1", 64, 32, 8, 7168, 1, inverse=True)
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
    parser.add_argument("--no-public", action="store_true",
                        help="leave the public comparator columns out (n/a; no Triton compile or autotune)")
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
    PUBLIC.clear()
    if not args.no_public:
        PUBLIC.update(public_kernels.load(device))
    print(f"# moe_ext {moe_ext.__version__} routing benchmark on {name}, torch {torch.__version__}, {args.dtype}, "
          f"L2 {l2_bytes(device) >> 20} MiB")
    print("# floors: memcpy = copy_ of the same bytes, kernel = an elementwise kernel moving them; ratio against "
          "the faster. Inputs L2-cold (rotated copies). Times per call in µs ('*' = eager loop, not a CUDA graph)")
    for key, public in PUBLIC.items():
        state = "timed where it applies" if public.available else f"n/a ({public.reason})"
        print(f"# public {key}: {public.archive.label}: {state}")
    if args.no_public:
        print("# public: n/a (--no-public)")
    print("# public columns: the index build is included in permute (megablocks: torch.sort + scatter_add_ + cumsum, "
          "its own sort/histogram being CUDA-extension ops; te: topk_ids -> [T, E] mask + make_row_id_map), and "
          "timed alone in '(index only, H=0)'; unpermute and backward take the forward's index, like ours. n/a = "
          "not available or does not apply (megablocks: no EP filter, no scale rows); 'wrong' = output differs "
          "from ours (stderr says how), not timed. ours/public: ours over the faster public")
    header = (f"| {'case':<46} | {'MB':>8} | {'memcpy':>8} | {'kernel':>8} | {'ours':>9} | {'seed':>9} "
              f"| {'ours/floor':>10} | {'seed/ours':>9} | {'megablocks':>10} | {'te':>9} | {'ours/public':>11} |")
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for row in cases(device, small, dtype, only):
        mark = lambda graph: "" if graph or device == "cpu" else "*"  # noqa: E731
        seed = f"{row.seed:8.1f}{mark(row.seed_graph)}" if row.seed is not None else "n/a"
        ratio = f"{row.seed / row.ours:9.2f}" if row.seed is not None else "n/a"
        public = row.public or {}
        cells = {key: (f"{value[0]:8.1f}{mark(value[1])}" if isinstance(value, tuple) else value)
                 for key, value in public.items()}
        times = [value[0] for value in public.values() if isinstance(value, tuple)]
        versus = f"{row.ours / min(times):11.2f}" if times else "n/a"
        print(f"| {row.case:<46} | {row.bytes_moved / 1e6:8.2f} | {row.memcpy:8.1f} | {row.kernel:8.1f} | "
              f"{row.ours:8.1f}{mark(row.ours_graph) or ' '} | {seed:>9} | {row.ours / row.floor:10.2f} | {ratio} | "
              f"{cells.get('megablocks', 'n/a'):>10} | {cells.get('te', 'n/a'):>9} | {versus:>11} |", flush=True)
        torch.cuda.empty_cache() if device == "cuda" else None

if __name__ == "__main__":
    main()
