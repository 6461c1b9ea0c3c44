"""The DTensor expert-parallel styles with two micro-batches in flight, on gloo with 2 ranks.

A style dispatches in a forward pre-hook and combines in a forward hook. Two
micro-batches run on two threads (the shape of an overlapped schedule such as
DualPipe's, where one micro-batch's forward meets another's at the dispatch),
ordered so that both are dispatched before either is combined: A dispatches,
B dispatches, A computes and combines, B computes and combines. Each output,
the input gradients and the full parameter gradients must equal the
unparallelised module's over every rank's rows of both micro-batches. The
micro-batches differ in size on each rank (one is empty on rank 1), so a
combine handed the other call's split sizes cannot pass unnoticed.

Also: a bad dispatch input on one rank raises on both ranks in the same call,
through the count exchange, and the ranks stay in step.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from moe_ext.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

DIM, HIDDEN, EXPERTS, TOP_K = 8, 6, 4, 2
WORLD = 2
WAIT_S = 30.0
TOL = 1e-9


def _experts(seed):
    from moe_ext.parallel.expert_parallel import GroupedExperts

    torch.manual_seed(seed)
    return GroupedExperts(DIM, HIDDEN, EXPERTS, dtype=torch.float64)


def _micro_batch(seed, rank, num_rows):
    """Rows sorted by expert (expert 1 never chosen), their counts, and the output gradient."""
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    ids = torch.tensor([0, 2, 3])[torch.randint(0, 3, (num_rows,), generator=generator)].sort().values
    counts = torch.bincount(ids, minlength=EXPERTS)
    rows = torch.randn(num_rows, DIM, generator=generator, dtype=torch.float64)
    grad = torch.randn(num_rows, DIM, generator=generator, dtype=torch.float64)
    return rows, counts, grad


def _interleaved(module, calls):
    """``module(*calls[0])`` on thread A and ``module(*calls[1])`` on thread B, both dispatched before either
    combines. A gate, a pre-hook registered after the style's (so it runs once the dispatch is done), parks
    A until B has dispatched and parks B until A has returned; the collectives therefore run in the same
    order on every rank. Returns the two outputs."""
    dispatched, a_done = [threading.Event(), threading.Event()], threading.Event()
    which = threading.local()
    outputs, errors = [None, None], []

    def gate(_module, _args):
        index = which.index
        dispatched[index].set()
        if not (dispatched[1] if index == 0 else a_done).wait(WAIT_S):
            raise RuntimeError(f"micro-batch {'AB'[index]}: the other micro-batch never reached its point")

    def run(index):
        which.index = index
        try:
            outputs[index] = module(*calls[index])
        except BaseException as error:  # re-raised on the calling thread
            errors.append(error)
        finally:
            dispatched[index].set()
            if index == 0:
                a_done.set()

    handle = module.register_forward_pre_hook(gate)
    try:
        threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
        threads[0].start()
        dispatched[0].wait(WAIT_S)
        threads[1].start()
        for thread in threads:
            thread.join(2 * WAIT_S)
    finally:
        handle.remove()
    if errors:
        raise errors[0]
    assert all(out is not None for out in outputs), "a micro-batch did not finish"
    return outputs


def _check_experts_style(style, mesh, rank, sizes, seed, what):
    """Two micro-batches through ``style`` on GroupedExperts, interleaved, against the plain module."""
    from torch.distributed.tensor.parallel import parallelize_module

    batches = [[_micro_batch(seed + m, r, sizes[m][r]) for r in range(WORLD)] for m in range(2)]
    reference = _experts(seed)
    reference_x = [[rows.clone().requires_grad_(True) for rows, _, _ in batch] for batch in batches]
    reference_out = [[reference(x, counts) for x, (_, counts, _) in zip(xs, batch)]
                     for xs, batch in zip(reference_x, batches)]
    sum((out * grad).sum() for outs, batch in zip(reference_out, batches)
        for out, (_, _, grad) in zip(outs, batch)).backward()

    module = parallelize_module(_experts(seed), mesh, style)
    xs = [batches[m][rank][0].clone().requires_grad_(True) for m in range(2)]
    outs = _interleaved(module, [(xs[m], batches[m][rank][1]) for m in range(2)])
    for m in range(2):  # one backward per micro-batch: each enters its all-to-alls in the same order everywhere
        (outs[m] * batches[m][rank][2]).sum().backward()
    for m in range(2):
        name = f"{what}, micro-batch {'AB'[m]} ({sizes[m][rank]} rows on rank {rank})"
        torch.testing.assert_close(outs[m], reference_out[m][rank].detach(), atol=TOL, rtol=TOL,
                                   msg=lambda text, n=name: f"{n} output: {text}")
        torch.testing.assert_close(xs[m].grad, reference_x[m][rank].grad, atol=TOL, rtol=TOL,
                                   msg=lambda text, n=name: f"{n} input grad: {text}")
    for param in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(module, param).grad.full_tensor(), getattr(reference, param).grad,
                                   atol=TOL, rtol=TOL, msg=lambda text, p=param: f"{what} {p} grad: {text}")


def _check_reorderer(mesh, rank):
    """ReordererSequenceParallel: micro-batches of 5 and 8 tokens start at different tokens on rank 1."""
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_ext.parallel.expert_parallel import ReordererSequenceParallel, TokenReorderer, token_share

    generator = torch.Generator().manual_seed(5)
    calls = [(torch.rand(tokens, TOP_K, generator=generator, dtype=torch.float64),
              torch.randint(0, EXPERTS, (tokens, TOP_K), generator=generator)) for tokens in (5, 8)]
    module = parallelize_module(TokenReorderer(EXPERTS, TOP_K), mesh, ReordererSequenceParallel())
    outs = _interleaved(module, calls)
    plain = TokenReorderer(EXPERTS, TOP_K)
    for m, (scores, ids) in enumerate(calls):
        start, end = token_share(ids.shape[0], WORLD, rank)
        expected_scores, expected_tokens, expected_counts = plain(scores[start:end], ids[start:end])
        # the plain reorderer over all tokens: this rank's pairs are those of its tokens, in the same order
        all_scores, all_tokens, _ = plain(scores, ids)
        mine = (all_tokens >= start) & (all_tokens < end)
        assert torch.equal(outs[m][1], all_tokens[mine]), f"reorderer micro-batch {'AB'[m]} token indices"
        assert torch.equal(outs[m][0], all_scores[mine]), f"reorderer micro-batch {'AB'[m]} scores"
        assert torch.equal(outs[m][1], expected_tokens + start) and torch.equal(outs[m][2], expected_counts)
        assert torch.equal(outs[m][0], expected_scores)


def _check_hand_off_refusal(mesh):
    """A forward whose first tensor is not the one the style's pre-hook returned has no dispatch to combine:
    refused by name (no collective is involved for the reorderer, so each rank checks it alone)."""
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_ext.parallel.expert_parallel import ReordererSequenceParallel, TokenReorderer

    module = parallelize_module(TokenReorderer(EXPERTS, TOP_K), mesh, ReordererSequenceParallel())
    module.register_forward_pre_hook(lambda _module, args: tuple(arg.clone() for arg in args))
    with pytest.raises(RuntimeError, match="ReordererSequenceParallel: the forward hook found no pre-hook"):
        module(torch.rand(4, TOP_K), torch.randint(0, EXPERTS, (4, TOP_K)))


def _run(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from moe_ext.parallel.expert_parallel import ExpertParallel, ExpertTensorParallel

    mesh = init_device_mesh("cpu", (world_size,))
    # rows per [micro-batch][rank]: A and B differ on each rank, B is empty on rank 1
    sizes = [[7, 4], [3, 0]]
    _check_experts_style(ExpertParallel(alignment=4), mesh, rank, sizes, 21, "EP 2, alignment 4")
    mesh_2d = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("ep", "tp"))
    _check_experts_style(ExpertTensorParallel(), mesh_2d, rank, sizes, 31, "ETP [ep 2, tp 1]")
    _check_reorderer(mesh, rank)
    _check_hand_off_refusal(mesh)
    dist.barrier()
    return 4


def test_two_micro_batches_in_flight_match_the_unparallelised_module():
    assert run_distributed(_run, WORLD, timeout=90) == [4] * WORLD


def _run_refusals(rank, world_size):
    """Rank 1 alone passes a bad dispatch input: both ranks raise in the same call (rank 1 naming the argument,
    rank 0 naming rank 1), no rows move, and the next good call runs on both (the ranks stayed in step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from moe_ext.errors import ArgumentError
    from moe_ext.parallel.expert_parallel import ExpertParallel

    module = parallelize_module(_experts(41), init_device_mesh("cpu", (world_size,)), ExpertParallel())
    plain = _experts(41)
    good = _micro_batch(41, rank, 5)[:2]
    bad_inputs = [
        ((torch.randn(2, DIM, dtype=torch.float64), torch.tensor([3, -1, 0, 0])), ArgumentError,
         r"non-negative counts summing to routed_input's 2 rows, got sum 2, smallest -1"),
        ((torch.randn(3, DIM, dtype=torch.float64), torch.tensor([1, 1, 1, 1])), ArgumentError,
         r"summing to routed_input's 3 rows, got sum 4"),
        ((torch.randn(3, DIM, dtype=torch.float64), torch.tensor([1, 1, 1])), ArgumentError,
         r"num_tokens_per_expert must be \[4\] \(every expert of the EP group\), got \[3\]"),
        ((torch.randn(2, DIM, dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0, 0.0])), TypeError,
         r"num_tokens_per_expert must be an integer tensor, got torch.float32"),
        ((torch.randn(2, 5, dtype=torch.float64), torch.tensor([1, 1, 0, 0])), ArgumentError,
         r"routed_input must be \[N, 8\] \(rows sorted by expert\), got \[2, 5\]"),
    ]
    for inputs, error, message in bad_inputs:
        if rank == 1:
            with pytest.raises(error, match=message):
                module(*inputs)
        else:
            with pytest.raises(ArgumentError, match="EP group rank 1 refused its dispatch input"):
                module(*good)
        torch.testing.assert_close(module(*good), plain(*good), atol=TOL, rtol=TOL)
    dist.barrier()
    return len(bad_inputs)


def test_a_bad_dispatch_input_on_one_rank_raises_on_every_rank():
    assert run_distributed(_run_refusals, WORLD, timeout=60) == [5] * WORLD
