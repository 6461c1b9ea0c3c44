"""MoeExtTokenDispatcher against torchtitan 0.3's own dispatchers and a single-process reference, gloo.

Needs torchtitan 0.3.0 (installed by the test requirements without its
dependencies; at import it needs spmd_types, tyro and triton). Each rank routes its
own tokens (uneven counts, one rank with none, skewed experts), runs dispatch ->
per-expert linear experts -> combine with torchtitan's AllToAllTokenDispatcher and
with moe_ext's, and compares outputs and input, score and expert-weight gradients:
moe_ext's with a one-process computation over every rank's tokens (fp64, 1e-9) and
with torchtitan's (1e-5: torchtitan's combine rounds to fp32).
"""

from __future__ import annotations

import pytest
import torch

from moe_ext.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

pytest.importorskip("torchtitan.models.common.token_dispatcher",
                    reason="torchtitan 0.3 is a test requirement: bash scripts/run_tests.sh installs it")

DIM, EXPERTS, TOP_K = 8, 8, 2
ATOL = RTOL = 1e-9
# torchtitan's combine multiplies rows by scores in float32 (``.to(torch.float32)``) even for fp64 rows
TORCHTITAN_TOL = 1e-5


def _rank_inputs(rank, seed, num_tokens):
    generator = torch.Generator().manual_seed(seed + 100 * rank)
    popular = torch.tensor([0, 1, 2, 5, 6, 4])
    weights = torch.tensor([6.0, 3.0, 3.0, 2.0, 1.0, 1.0])  # experts 3 and 7 never chosen
    ids = (torch.stack([popular[torch.multinomial(weights, TOP_K, generator=generator)] for _ in range(num_tokens)])
           if num_tokens else torch.empty(0, TOP_K, dtype=torch.long))
    x = torch.randn(num_tokens, DIM, generator=generator, dtype=torch.float64)
    scores = torch.rand(num_tokens, TOP_K, generator=generator, dtype=torch.float64)
    grad = torch.randn(num_tokens, DIM, generator=generator, dtype=torch.float64)
    return x, scores, ids, grad


def _expert_weights(seed):
    return torch.randn(EXPERTS, DIM, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _experts(rows, counts, weights):
    """Per-local-expert linear layers over rows grouped by expert; rows past the counts give zeros."""
    pieces, start = [], 0
    for expert, count in enumerate(int(c) for c in counts.tolist()):
        pieces.append(rows[start:start + count] @ weights[expert])
        start += count
    pieces.append(rows.new_zeros((rows.shape[0] - start, rows.shape[1])))
    return torch.cat(pieces, 0)


def _reference(inputs, weights):
    """One process, every rank's tokens: out[t] = sum_k score[t,k] * x[t] @ W[id[t,k]]."""
    weights = weights.clone().requires_grad_(True)
    results = []
    for x, scores, ids, grad in inputs:
        x, scores = x.clone().requires_grad_(True), scores.clone().requires_grad_(True)
        out = torch.einsum("tk,tkd->td", scores, torch.einsum("td,tkde->tke", x, weights[ids]))
        (out * grad).sum().backward()
        results.append((out.detach(), x.grad, scores.grad))
    return results, weights.grad


def _run_dispatcher(dispatcher, x, scores, ids, grad, local_weights, backward):
    counts = torch.bincount(ids.reshape(-1), minlength=EXPERTS)
    x, scores = x.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    local_weights = local_weights.clone().requires_grad_(True)
    rows, local_counts, metadata = dispatcher.dispatch(x, scores, ids, counts)
    out = dispatcher.combine(_experts(rows, local_counts, local_weights), metadata, x)
    if backward:
        (out * grad).sum().backward()
    return out.detach(), x.grad, scores.grad, local_weights.grad


def _run(rank, world_size, seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.distributed.utils import set_spmd_backend
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher

    from moe_ext.parallel.torchtitan_dispatcher import MoeExtTokenDispatcher

    # torchtitan's default backend expects its trainer's spmd mesh stack; plain DTensor collectives here
    set_spmd_backend("partial_dtensor")
    tokens = [3 + 4 * r for r in range(world_size - 1)] + [0]
    inputs = [_rank_inputs(r, seed, tokens[r]) for r in range(world_size)]
    weights = _expert_weights(seed)
    expected, weight_grad = _reference(inputs, weights)
    local = EXPERTS // world_size
    mine = slice(rank * local, (rank + 1) * local)
    mesh = init_device_mesh("cpu", (world_size,))

    ours = MoeExtTokenDispatcher(MoeExtTokenDispatcher.Config(num_experts=EXPERTS, top_k=TOP_K, alignment=2))
    ours.wire_meshes(ep_mesh=mesh)
    out, x_grad, score_grad, local_grad = _run_dispatcher(ours, *inputs[rank], weights[mine], backward=True)
    ref_out, ref_x_grad, ref_score_grad = expected[rank]
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x_grad, ref_x_grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(score_grad, ref_score_grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(local_grad, weight_grad[mine], atol=ATOL, rtol=RTOL)

    theirs = AllToAllTokenDispatcher(AllToAllTokenDispatcher.Config(num_experts=EXPERTS, top_k=TOP_K))
    theirs.wire_meshes(ep_mesh=mesh)
    their_run = _run_dispatcher(theirs, *inputs[rank], weights[mine], backward=True)
    for a, b in zip((out, x_grad, score_grad, local_grad), their_run):
        torch.testing.assert_close(a, b, atol=TORCHTITAN_TOL, rtol=TORCHTITAN_TOL)

    # EP 1 (no mesh wired): the local path against torchtitan's LocalTokenDispatcher
    local_ours = MoeExtTokenDispatcher(MoeExtTokenDispatcher.Config(num_experts=EXPERTS, top_k=TOP_K))
    local_theirs = LocalTokenDispatcher(LocalTokenDispatcher.Config(num_experts=EXPERTS, top_k=TOP_K))
    ours_1 = _run_dispatcher(local_ours, *inputs[rank], weights, backward=True)
    theirs_1 = _run_dispatcher(local_theirs, *inputs[rank], weights, backward=True)
    for a, b, exact in zip(ours_1, theirs_1, expected[rank]):
        torch.testing.assert_close(a, exact, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(a, b, atol=TORCHTITAN_TOL, rtol=TORCHTITAN_TOL)
    return tokens[rank]


@pytest.mark.parametrize("world_size", [2, 4])
def test_moe_ext_dispatcher_matches_torchtitan_and_reference(world_size):
    results = run_distributed(_run, world_size, 5, timeout=180)
    assert results == [3 + 4 * r for r in range(world_size - 1)] + [0]
