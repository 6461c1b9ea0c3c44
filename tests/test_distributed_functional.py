"""moe_ext.distributed.functional on gloo (2 and 4 ranks), world group and subgroups.

Every rank builds every rank's inputs and output gradients from one seed, so it
can compute the whole collective as one single-process autograd graph and
compare its own output and input gradient with that reference. One spawned
group per world size runs every case (spawning costs seconds).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ext.distributed import functional as F
from moe_ext.testing.distributed import run_distributed

ATOL = RTOL = 1e-6


def _leaves(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(True) for shape in shapes]


def _check(rank_in_group, members, op, reference, shapes, grad_shapes, seed, what):
    """Run ``op(x)`` here; ``reference(xs) -> outs`` for every member in one process; compare."""
    xs_ref = _leaves(shapes, seed)
    grads = [g.detach() for g in _leaves(grad_shapes, seed + 1)]
    outs_ref = reference(xs_ref)
    loss = sum((out * grad).sum() for out, grad in zip(outs_ref, grads))
    loss.backward()
    x = xs_ref[rank_in_group].detach().clone().requires_grad_(True)
    out = op(x)
    mine = rank_in_group if len(outs_ref) > 1 else 0  # one output: replicated on every rank, loss counted once
    (out * grads[mine]).sum().backward()
    torch.testing.assert_close(out, outs_ref[mine].detach(), atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{what} forward: {m}")
    expected = xs_ref[rank_in_group].grad
    torch.testing.assert_close(x.grad, expected if expected is not None else torch.zeros_like(x),
                               atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} grad: {m}")
    return 1


def _cases(group, members, seed):
    """Every op on ``group`` (any accepted group form); members: its size."""
    size, me = F.group_size(group), F.group_rank(group)
    assert size == members
    checks = 0
    for dim, shape in ((0, (3, 5)), (1, (2, 3, 4)), (-1, (4, 2)), (0, (0, 3))):
        d = dim % len(shape)
        shapes = [shape] * size
        gathered = list(shape)
        gathered[d] *= size
        # all_gather, default (reduce-scatter backward): every rank's output is its own.
        checks += _check(me, size, lambda x: F.all_gather(x, dim, group),
                         lambda xs: [torch.cat(xs, d)] * size, shapes, [gathered] * size, seed,
                         f"all_gather dim={dim} shape={shape}")
        # all_gather with slice backward: one replicated output, the loss counted once.
        checks += _check(me, size, lambda x: F.all_gather(x, dim, group, backward="slice"),
                         lambda xs: [torch.cat(xs, d)], shapes, [gathered], seed + 2,
                         f"all_gather slice dim={dim} shape={shape}")
        # reduce_scatter and split need a divisible dim.
        big = list(shape)
        big[d] *= size
        checks += _check(me, size, lambda x: F.reduce_scatter(x, dim, group),
                         lambda xs: list(sum(xs).chunk(size, d)) if big[d] else [sum(xs)] * size,
                         [big] * size, [shape] * size, seed + 3, f"reduce_scatter dim={dim} shape={big}")
        # split of a replicated tensor: the reference is one tensor, sliced per rank.
        def split_ref(xs):
            return list(xs[0].chunk(size, d)) if big[d] else [xs[0]] * size
        xs_once = _leaves([big], seed + 4)
        grads = [g.detach() for g in _leaves([shape] * size, seed + 5)]
        sum((o * g).sum() for o, g in zip(split_ref(xs_once), grads)).backward()
        x = xs_once[0].detach().clone().requires_grad_(True)
        out = F.split(x, dim, group)
        (out * grads[me]).sum().backward()
        torch.testing.assert_close(out, split_ref(xs_once)[me].detach(), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(x.grad, xs_once[0].grad, atol=ATOL, rtol=RTOL)
        checks += 1
    # all_reduce: identity backward (one replicated output) and all_reduce backward (per-rank losses).
    checks += _check(me, size, lambda x: F.all_reduce(x, group), lambda xs: [sum(xs)], [(3, 4)] * size,
                     [(3, 4)], seed + 6, "all_reduce identity")
    checks += _check(me, size, lambda x: F.all_reduce(x, group, backward="all_reduce"),
                     lambda xs: [sum(xs)] * size, [(3, 4)] * size, [(3, 4)] * size, seed + 7, "all_reduce sum")
    # copy_to_group: a replicated input consumed per rank.
    xs_once = _leaves([(2, 3)], seed + 8)
    grads = [g.detach() for g in _leaves([(2, 3)] * size, seed + 9)]
    sum((xs_once[0] * g).sum() for g in grads).backward()
    x = xs_once[0].detach().clone().requires_grad_(True)
    (F.copy_to_group(x, group) * grads[me]).sum().backward()
    torch.testing.assert_close(x.grad, xs_once[0].grad, atol=ATOL, rtol=RTOL)
    checks += 1
    # all_to_all_single with random splits, zeros included (a rank sending or receiving nothing).
    generator = torch.Generator().manual_seed(seed + 10)
    for trial in range(4):
        table = torch.randint(0, 4, (size, size), generator=generator)  # table[s, r]: rows s sends to r
        if trial == 1:
            table[:, 0] = 0  # rank 0 receives nothing
            table[0, :] = 0  # and sends nothing
        if trial == 2:
            table.zero_()
        sends = table.sum(1).tolist()

        def a2a_ref(xs):
            outs = []
            for r in range(size):
                pieces = []
                for s in range(size):
                    start = int(table[s, :r].sum())
                    pieces.append(xs[s][start:start + int(table[s, r])])
                outs.append(torch.cat(pieces))
            return outs
        recvs = table.sum(0).tolist()
        checks += _check(me, size, lambda x: F.all_to_all_single(x, table[:, me].tolist(), table[me].tolist(),
                                                                 group),
                         a2a_ref, [(n, 3) for n in sends], [(n, 3) for n in recvs], seed + 11 + trial,
                         f"all_to_all_single {table.tolist()}")
    return checks


def _run(rank, world_size):
    from moe_ext.distributed import ParallelGroup
    from moe_ext.moe.config import CommGroup
    checks = _cases(None, world_size, 10)
    checks += _cases(dist.group.WORLD, world_size, 20)
    checks += _cases(CommGroup(dist.group.WORLD), world_size, 30)
    if world_size == 4:
        # Subgroups whose group ranks differ from the global ranks: {0,1}, {2,3} and {1,3}, {0,2}.
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        strided = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        mine = halves[rank // 2]
        checks += _cases(mine, 2, 40 + rank // 2)
        checks += _cases(strided[rank % 2], 2, 50 + rank % 2)
        checks += _cases(ParallelGroup("sub", [r for r in range(4) if r // 2 == rank // 2], mine), 2, 60 + rank // 2)
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
        checks += _cases(mesh.get_group("ep"), 2, 70 + rank // 2)
        checks += _cases(mesh["dp"], 2, 80 + rank % 2)
    # A group of one: no process group at all, the input comes back.
    x = torch.ones(2, 2)
    single = CommGroup(None)
    assert F.all_gather(x, 0, single) is x and F.all_reduce(x, single) is x
    assert F.all_to_all_single(x, [2], [2], single) is x
    return checks, _bad_arguments(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_collectives_match_single_process_autograd(world_size):
    results = run_distributed(_run, world_size, timeout=120)
    checks = [count for count, _ in results]
    assert len(set(checks)) == 1 and checks[0] > 0
    errors = results[0][1]  # argument checks ran on every rank, each refused locally
    assert "x.size(0) must be a multiple of the group size" in errors[0]
    assert "input_split_sizes must sum to x.size(0)=3" in errors[2]
    assert f"must have {world_size} entries" in errors[3]


def _bad_arguments(rank, world_size):
    errors = []
    from moe_ext.errors import ArgumentError
    for call in (lambda: F.reduce_scatter(torch.ones(3, 2), 0),
                 lambda: F.all_gather(torch.ones(2), 1),
                 lambda: F.all_to_all_single(torch.ones(3, 2), [1] * world_size, [1] * (world_size - 1) + [1]),
                 lambda: F.all_to_all_single(torch.ones(2, 2), [1] * (world_size + 1), [1, 1] + [0] * (world_size - 2)),
                 lambda: F.all_to_all_single(torch.ones(2, 2), [1, -1] + [0] * (world_size - 2), [1, 1] + [0] * (world_size - 2)),
                 lambda: F.all_reduce(torch.ones(2), backward="sum"),
                 lambda: F.split(torch.ones(3), 0)):
        with pytest.raises(ArgumentError) as info:
            call()
        errors.append(str(info.value))
    with pytest.raises(TypeError, match="group must be"):
        F.all_gather(torch.ones(2), 0, group="world")
    with pytest.raises(TypeError, match="dim must be an int"):
        F.all_gather(torch.ones(2), 0.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        F.all_reduce([1.0])
    # Every refusal was local: the group is still in step.
    assert float(F.all_reduce(torch.ones(1))) == world_size
    return errors
