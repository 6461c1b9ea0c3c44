"""moe_ext.parallel.expert_parallel: each DTensor style against the unparallelised module, on gloo.

Every rank builds every rank's inputs from one seed, so it can run the plain
(unsharded) module over all of them in one process and compare its own output,
its input gradient and the full parameter gradients (DTensor ``full_tensor()``)
with that reference. Routing is skewed: some experts get no rows, one rank
sends no tokens, token counts do not divide by the mesh size.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ext.testing.distributed import run_distributed
from moe_ext.testing.distributed import test_backend as backend_under_test

pytestmark = pytest.mark.distributed

DIM, HIDDEN, EXPERTS, TOP_K = 8, 6, 8, 2
ATOL = RTOL = 1e-5


def _weights(seed):
    from moe_ext.parallel.expert_parallel import GroupedExperts

    torch.manual_seed(seed)
    return GroupedExperts(DIM, HIDDEN, EXPERTS, dtype=torch.float64)


def _routing(generator, num_tokens):
    """Skewed top-k ids (experts 0-2 and 6 popular, 3 and 7 never chosen) and scores."""
    popular = torch.tensor([0, 1, 2, 6, 4, 5])
    weights = torch.tensor([8.0, 4.0, 3.0, 2.0, 1.0, 1.0])
    ids = torch.stack([popular[torch.multinomial(weights, TOP_K, generator=generator)]
                       for _ in range(num_tokens)]) if num_tokens else torch.empty(0, TOP_K, dtype=torch.long)
    scores = torch.rand(num_tokens, TOP_K, generator=generator, dtype=torch.float64)
    return ids, scores


def _sorted_rows(generator, num_tokens):
    """Rows already sorted by expert (what a reorderer hands the experts) and their counts."""
    ids, _ = _routing(generator, num_tokens)
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=EXPERTS)
    rows = torch.randn(flat.numel(), DIM, generator=generator, dtype=torch.float64)
    return rows, counts


def _case_inputs(seed, groups, tokens):
    generator = torch.Generator().manual_seed(seed)
    inputs = [_sorted_rows(generator, tokens[i]) for i in range(groups)]
    grads = [torch.randn(rows.shape[0], DIM, generator=generator, dtype=torch.float64) for rows, _ in inputs]
    return inputs, grads


def _reference(seed, inputs, grads):
    """Unsharded module over every group's rows; the loss counts each group once."""
    module = _weights(seed)
    xs = [rows.clone().requires_grad_(True) for rows, _ in inputs]
    outs = [module(x, counts) for x, (_, counts) in zip(xs, inputs)]
    sum((out * grad).sum() for out, grad in zip(outs, grads)).backward()
    return module, xs, outs


def _compare(module, reference, x, x_ref, out, out_ref, what):
    out, x_grad = out.cpu(), x.grad.cpu()
    torch.testing.assert_close(out, out_ref.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} output: {m}")
    torch.testing.assert_close(x_grad, x_ref.grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} input grad: {m}")
    for name in ("w1", "w2", "w3"):
        grad = getattr(module, name).grad
        full = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).cpu()
        torch.testing.assert_close(full, getattr(reference, name).grad, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=name: f"{what} {n} grad: {m}")


def _run_style(style, mesh, group_index, groups, tokens, seed, what):
    from torch.distributed.tensor.parallel import parallelize_module

    device = mesh.device_type
    inputs, grads = _case_inputs(seed + 1, groups, tokens)
    reference, xs_ref, outs_ref = _reference(seed, inputs, grads)
    module = parallelize_module(_weights(seed).to(device), mesh, style)
    rows, counts = inputs[group_index]
    x = rows.to(device).requires_grad_(True)
    out = module(x, counts.to(device))
    (out * grads[group_index].to(device)).sum().backward()
    _compare(module, reference, x, xs_ref[group_index], out, outs_ref[group_index], what)


def _block_case(mesh, world_size, rank, seed, num_tokens):
    """TokenReorderer under ReordererSequenceParallel + GroupedExperts under ExpertParallel, one 1-D mesh."""
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_ext.distributed import functional as dfn
    from moe_ext.parallel.expert_parallel import (ExpertParallel, ReordererSequenceParallel,
                                                  TokenReorderer)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.reorderer = TokenReorderer(EXPERTS, TOP_K)
            self.experts = _weights(seed)

        def forward(self, x, scores, ids):
            top, token_indices, counts = self.reorderer(scores, ids)
            rows = self.experts(x[token_indices], counts)
            return torch.zeros_like(x).index_add(0, token_indices, rows * top.unsqueeze(1))

    generator = torch.Generator().manual_seed(seed + 7)
    ids, scores = _routing(generator, num_tokens)
    x_full = torch.randn(num_tokens, DIM, generator=generator, dtype=torch.float64)
    grad = torch.randn(num_tokens, DIM, generator=generator, dtype=torch.float64)

    reference = Block()
    x_ref, s_ref = x_full.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    out_ref = reference(x_ref, s_ref, ids)
    (out_ref * grad).sum().backward()

    device = mesh.device_type
    block = parallelize_module(Block().to(device), mesh, {"reorderer": ReordererSequenceParallel(),
                                                          "experts": ExpertParallel(alignment=4)})
    x, s = x_full.to(device).requires_grad_(True), scores.to(device).requires_grad_(True)
    # x and the scores are replicated: each rank uses its share, so their gradients are summed
    partial = block(dfn.copy_to_group(x, mesh.get_group()), dfn.copy_to_group(s, mesh.get_group()), ids.to(device))
    out = dfn.all_reduce(partial, mesh.get_group())
    (out * grad.to(device)).sum().backward()
    out, x, s = out.cpu(), x.grad.cpu(), s.grad.cpu()
    what = f"reorderer SP + EP, {num_tokens} tokens over {world_size}"
    torch.testing.assert_close(out, out_ref.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} output: {m}")
    torch.testing.assert_close(x, x_ref.grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} x grad: {m}")
    torch.testing.assert_close(s, s_ref.grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} score grad: {m}")
    for name in ("w1", "w2", "w3"):
        full = getattr(block.experts, name).grad.full_tensor().cpu()
        torch.testing.assert_close(full, getattr(reference.experts, name).grad, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=name: f"{what} {n} grad: {m}")


def _run(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from moe_ext.parallel.expert_parallel import ExpertParallel, ExpertTensorParallel, TensorParallel

    device = "cuda" if backend_under_test() == "nccl" else "cpu"
    checks = 0
    mesh = init_device_mesh(device, (world_size,))
    # EP over the world: the last rank sends no tokens; experts 3 and 7 get no rows
    tokens = [5 + 3 * r for r in range(world_size - 1)] + [0]
    for alignment in (1, 4):
        _run_style(ExpertParallel(alignment=alignment), mesh, rank, world_size, tokens, 11,
                   f"EP{world_size} alignment {alignment}")
        checks += 1
    # TP over the world: identical inputs on every rank, one loss
    _run_style(TensorParallel(), mesh, 0, 1, [7], 12, f"TP{world_size}")
    checks += 1
    # sequence-parallel reorderer + EP: token counts that do and do not divide
    for num_tokens in (2 * world_size, 2 * world_size + 1):
        _block_case(mesh, world_size, rank, 13, num_tokens)
        checks += 1
    if world_size == 4:
        mesh_2d = init_device_mesh(device, (2, 2), mesh_dim_names=("ep", "tp"))
        ep_index = rank // 2
        _run_style(ExpertTensorParallel(alignment=2), mesh_2d, ep_index, 2, [9, 0], 14, "ETP 2x2")
        checks += 1
        # EP on a subgroup of the world: two model copies of EP 2
        _run_style(ExpertParallel(), init_device_mesh(device, (2, 2), mesh_dim_names=("dp", "ep"))["ep"],
                   rank % 2, 2, [6, 3], 15 + rank // 2, "EP2 subgroup")
        checks += 1
    dist.barrier()
    return checks


@pytest.mark.parametrize("world_size", [2, 4])
def test_styles_match_unparallelised_module(world_size):
    if backend_under_test() == "nccl" and world_size > torch.cuda.device_count():
        pytest.skip(f"needs {world_size} GPUs for NCCL")
    results = run_distributed(_run, world_size, backend=backend_under_test(), timeout=180)
    assert results == [5 if world_size == 2 else 7] * world_size


def test_token_share_and_arguments():
    from moe_ext.errors import ArgumentError
    from moe_ext.parallel.expert_parallel import (ExpertParallel, GroupedExperts, TensorParallel, padded_rows,
                                                  token_share)

    assert [token_share(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [token_share(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert padded_rows(10, 3, 4) == 24
    with pytest.raises(TypeError, match="alignment must be an int"):
        ExpertParallel(alignment=2.0)
    with pytest.raises(ArgumentError, match="alignment must be >= 1"):
        ExpertParallel(alignment=0)
    with pytest.raises(TypeError, match="reduce_output must be a bool"):
        TensorParallel(reduce_output=1)
    experts = GroupedExperts(4, 3, 2)
    with pytest.raises(ArgumentError, match=r"num_tokens_per_expert must be \[2\]"):
        experts(torch.zeros(3, 4), torch.tensor([3]))
    with pytest.raises(ArgumentError, match="sums to 5, more than the 3 rows"):
        experts(torch.zeros(3, 4), torch.tensor([3, 2]))
    # rows past the counted ones come back as zeros
    out = experts(torch.randn(5, 4), torch.tensor([1, 2]))
    assert out.shape == (5, 4) and torch.equal(out[3:], torch.zeros(2, 4))
