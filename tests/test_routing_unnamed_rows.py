"""The rows of moe_unpermute's grad_permuted that no entry names are unspecified (CUDA leaves them
unwritten, like moe_permute's tail): moe_ext's own consumers must never read them in backward.

The CPU kernel of ``moe_unpermute_backward`` is overridden for these tests by one with the same math
that fills the unnamed rows with NaN; the gradients of the expert weights, the hidden states and the
routing weights must stay finite and equal to those of the regular kernel, through the comm methods'
local path (permute_by_local_expert -> run_local_experts -> unpermute_weighted, loop and grouped-mm
backends, as an EP rank holding a quarter of the experts, with "no expert" -1 ids) and through the
regroup path (moe_permute -> group_by_local_expert -> experts -> ungroup_by_local_expert -> moe_unpermute).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from moe_ext.moe.comm.base import PermuteResult
from moe_ext.moe.experts import run_local_experts
from moe_ext.moe.routing import permute_by_local_expert, unpermute_weighted
from moe_ext.ops import group_by_local_expert, moe_permute, moe_unpermute, ungroup_by_local_expert

T, K, E, H, I = 40, 4, 16, 16, 8

pytestmark = pytest.mark.filterwarnings("ignore:Warning only once for all operators")


def _poisoned_backward(grad_output, permuted, expanded_row_idx, probs, topk, compute_grad_probs):
    rows = expanded_row_idx.reshape(-1).long()
    named = rows >= 0
    token = torch.arange(rows.numel()) // topk
    scale = probs.reshape(-1)[named].float().unsqueeze(1) if probs is not None else 1.0
    grad_permuted = torch.full_like(permuted, float("nan"))
    grad_permuted[rows[named]] = (grad_output.float()[token[named]] * scale).to(permuted.dtype)
    if probs is None:
        return grad_permuted, permuted.new_empty((0,))
    grad_probs = torch.zeros(rows.numel(), dtype=torch.float32)
    if compute_grad_probs:
        grad_probs[named] = (grad_output.float()[token[named]] * permuted.float()[rows[named]]).sum(1)
    return grad_permuted, grad_probs.view(-1, topk).to(probs.dtype)


@contextmanager
def poisoned_unnamed_rows():
    library = torch.library.Library("moe_ext", "IMPL")  # noqa: TOR901 (overrides the CPU kernel, restored below)
    library.impl("moe_unpermute_backward", _poisoned_backward, "CPU")
    try:
        yield
    finally:
        library._destroy()


def _weights(dtype):
    g = torch.Generator().manual_seed(1)
    return ((torch.randn(E // 4, H, 2 * I, generator=g) / 4).to(dtype).requires_grad_(),
            (torch.randn(E // 4, I, H, generator=g) / 3).to(dtype).requires_grad_())


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[::5, 1] = -1  # padding tokens' "no expert"
    probs = torch.rand(T, K, generator=g).requires_grad_()
    return hidden, ids, probs


def _local_path(backend, dtype):
    """An EP rank holding experts [0, E/4): most of the T*K rows are dropped (unnamed)."""
    hidden, ids, probs = _inputs(dtype)
    w13, w2 = _weights(dtype)
    local_ids = torch.where(ids < E // 4, ids, torch.full_like(ids, -1))
    permuted, row_idx, counts = permute_by_local_expert(hidden, local_ids, E // 4)
    assert int(counts.sum()) < permuted.shape[0] // 2  # a large unwritten tail
    out = run_local_experts(PermuteResult(permuted, counts), w13, w2, backend=backend)
    unpermute_weighted(out, row_idx, probs).float().square().sum().backward()
    return [t.grad for t in (hidden, probs, w13, w2)]


def _regroup_path(dtype):
    hidden, ids, probs = _inputs(dtype)
    w13, w2 = _weights(dtype)
    permuted, row_idx, counts = moe_permute(hidden, ids, num_experts=E, active_expert_range=(0, E // 4))
    max_len = permuted.shape[0] + (E // 4) * 4
    grouped = group_by_local_expert(permuted, counts, E // 4, 1, 4, max_len)
    out = run_local_experts(PermuteResult(grouped.rows, grouped.m_sizes.to(torch.int64)), w13, w2, backend="loop")
    arrived = ungroup_by_local_expert(out, grouped.permuted_indices, permuted.shape[0])
    moe_unpermute(arrived, row_idx, probs).float().square().sum().backward()
    return [t.grad for t in (hidden, probs, w13, w2)]


def test_the_override_really_poisons_unnamed_rows():
    permuted = torch.randn(6, 3, requires_grad=True)
    row_idx = torch.tensor([2, -1, 0, 3], dtype=torch.int32)
    with poisoned_unnamed_rows():
        moe_unpermute(permuted, row_idx, topk=2).sum().backward()
    assert torch.isnan(permuted.grad[[1, 4, 5]]).all() and torch.isfinite(permuted.grad[[0, 2, 3]]).all()
    permuted.grad = None
    moe_unpermute(permuted, row_idx, topk=2).sum().backward()  # the regular kernel is back
    assert torch.count_nonzero(permuted.grad[[1, 4, 5]]) == 0


@pytest.mark.parametrize("backend,dtype", [("loop", torch.float32), ("grouped_mm", torch.bfloat16)])
def test_local_expert_path_never_reads_unnamed_gradient_rows(backend, dtype):
    want = _local_path(backend, dtype)
    try:
        with poisoned_unnamed_rows():
            got = _local_path(backend, dtype)
    except RuntimeError as error:  # CPU builds without a grouped-mm kernel
        if backend != "grouped_mm":
            raise
        pytest.skip(f"torch._grouped_mm unavailable here: {error}")
    # (the override sums its fp32 dots in another order than the C++ kernel: rounding only)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **({} if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)))


def test_regroup_path_never_reads_unnamed_gradient_rows():
    want = _regroup_path(torch.float32)
    with poisoned_unnamed_rows():
        got = _regroup_path(torch.float32)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
