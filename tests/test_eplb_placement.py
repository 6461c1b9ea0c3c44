"""moe_ext.eplb placement: the public contract on random shapes, errors, and the public baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_ext.eplb import placement_imbalance, plan_placement, rebalance_experts
from moe_ext.eplb.public_reference import public_rebalance_experts


def check_contract(weight, phy2log, log2phy, logcnt, num_replicas, sorted_rows=True):
    layers, experts = weight.shape
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (layers, num_replicas)
    assert log2phy.shape == (layers, experts, num_replicas - experts + 1)
    assert logcnt.shape == (layers, experts)
    assert ((phy2log >= 0) & (phy2log < experts)).all()
    counted = torch.zeros(layers, experts, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counted, logcnt)
    assert (logcnt >= 1).all() and (logcnt.sum(1) == num_replicas).all()
    # log2phy is exactly the inverse: the first logcnt entries are the expert's slots, the rest -1.
    for layer in range(layers):
        for expert in range(experts):
            row = log2phy[layer, expert]
            count = int(logcnt[layer, expert])
            assert (row[count:] == -1).all()
            assert (phy2log[layer, row[:count]] == expert).all()
            if sorted_rows:  # ours lists slots in increasing order; the public one by replica rank
                assert sorted(row[:count].tolist()) == row[:count].tolist()


@st.composite
def shapes(draw):
    nodes = draw(st.integers(1, 4))
    gpus = nodes * draw(st.integers(1, 4))
    groups = draw(st.integers(1, 6))
    experts = groups * draw(st.integers(1, 5))
    replicas = gpus * draw(st.integers(1, 6))
    while replicas < experts:
        replicas += gpus
    layers = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["lognormal", "zeros", "one_hot", "ints"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return layers, experts, replicas, groups, nodes, gpus, kind, seed


def make_weight(layers, experts, kind, seed, dtype=torch.float32):
    generator = np.random.default_rng(seed)
    if kind == "lognormal":
        weight = generator.lognormal(0.0, 1.2, size=(layers, experts))
    elif kind == "zeros":
        weight = np.zeros((layers, experts))
    elif kind == "one_hot":
        weight = np.zeros((layers, experts))
        weight[:, generator.integers(experts)] = 1000.0
    else:
        weight = generator.integers(0, 50, size=(layers, experts))
    return torch.tensor(weight).to(dtype)


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_rebalance_contract_on_random_shapes(shape):
    layers, experts, replicas, groups, nodes, gpus, kind, seed = shape
    weight = make_weight(layers, experts, kind, seed)
    phy2log, log2phy, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus)
    check_contract(weight, phy2log, log2phy, logcnt, replicas)
    plan = plan_placement(weight, replicas, groups, nodes, gpus)
    assert torch.equal(plan.phy2log, phy2log)  # deterministic
    assert torch.allclose(plan.imbalance, placement_imbalance(weight, phy2log, gpus), rtol=1e-9)
    assert (plan.imbalance >= plan.lower_bound - 1e-9).all()


@settings(max_examples=30, deadline=None)
@given(shapes(), st.floats(0.0, 0.5), st.integers(0, 8))
def test_plan_from_current_contract_and_budget(shape, drift, max_moves):
    layers, experts, replicas, groups, nodes, gpus, kind, seed = shape
    weight = make_weight(layers, experts, kind, seed, torch.float64)
    current = plan_placement(weight, replicas, groups, nodes, gpus).phy2log
    noise = torch.from_numpy(np.random.default_rng(seed + 1).uniform(1 - drift, 1 + drift, size=weight.shape))
    drifted = weight * noise
    plan = plan_placement(drifted, replicas, groups, nodes, gpus, current=current)
    check_contract(drifted, plan.phy2log, plan.log2phy, plan.logcnt, replicas)
    assert torch.equal(plan.moves, (plan.phy2log != current).sum(1))
    bounded = plan_placement(drifted, replicas, groups, nodes, gpus, current=current, max_moves=max_moves)
    check_contract(drifted, bounded.phy2log, bounded.log2phy, bounded.logcnt, replicas)
    assert (bounded.moves <= max_moves).all()
    assert torch.equal(bounded.moves, (bounded.phy2log != current).sum(1))


def test_any_dtype_and_threads_give_the_same_plan():
    weight = make_weight(7, 32, "ints", 3)
    reference = plan_placement(weight, 48, 4, 2, 8).phy2log
    for dtype in (torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(plan_placement(weight.to(dtype), 48, 4, 2, 8, num_threads=2).phy2log, reference)
    assert torch.equal(plan_placement(weight.numpy(), 48, 4, 2, 8, num_threads=0).phy2log, reference)


@pytest.mark.parametrize("replicas,gpus,nodes,kind", [
    (80, 16, 4, "lognormal"), (96, 32, 8, "lognormal"), (80, 16, 4, "zipf"), (128, 64, 16, "lognormal"),
])
def test_never_worse_than_the_public_algorithm(replicas, gpus, nodes, kind):
    generator = np.random.default_rng(1)
    if kind == "zipf":
        base = 1.0 / np.arange(1, 65) ** 1.2
        weight = np.stack([base[generator.permutation(64)] for _ in range(6)])
    else:
        weight = generator.lognormal(0.0, 0.8, size=(6, 64))
    weight = torch.tensor(weight * 1000)
    public_phy2log, public_log2phy, public_logcnt = public_rebalance_experts(weight, replicas, 8, nodes, gpus)
    check_contract(weight, public_phy2log, public_log2phy, public_logcnt, replicas, sorted_rows=False)  # the baseline is sound too
    public = placement_imbalance(weight, public_phy2log, gpus)
    ours = plan_placement(weight, replicas, 8, nodes, gpus)
    # Both keep the hierarchy here. Per layer, the public planner may put two replicas of one
    # expert on a GPU (we do not where avoidable), which now and then packs a node 0.1% better.
    assert float(ours.imbalance.mean()) <= float(public.mean()) + 1e-9, (ours.imbalance, public)
    assert (ours.imbalance <= public * 1.01).all(), (ours.imbalance, public)
    assert int(ours.same_gpu_duplicates.sum()) == 0
    assert int(ours.cross_node_replicas.sum()) == 0


def test_hot_node_relaxes_the_hierarchy_and_says_so():
    weight = torch.ones(1, 32)
    weight[0, :8] = 20.0  # group 0 of 4 carries most of the load
    confined = plan_placement(weight, 48, 4, 4, 8)  # the default keeps the hierarchy
    relaxed = plan_placement(weight, 48, 4, 4, 8, allow_cross_node=True)
    assert float(confined.imbalance[0]) > 1.5 and int(confined.cross_node_replicas[0]) == 0
    assert not bool(confined.hierarchy_relaxed[0])
    assert float(relaxed.imbalance[0]) < float(confined.imbalance[0])
    assert bool(relaxed.hierarchy_relaxed[0]) and int(relaxed.cross_node_replicas[0]) > 0
    # The strict plan says what relaxing would give, and its node-level bound.
    assert float(confined.relaxed_imbalance[0]) <= float(relaxed.imbalance[0]) * 1.02
    assert float(confined.relax_gain[0]) > 0.02
    assert float(confined.lower_bound[0]) > 1.5 > float(confined.global_lower_bound[0])


@pytest.mark.parametrize("call,match", [
    (lambda w: rebalance_experts(w, 18, 1, 1, 4), "num_replicas"),
    (lambda w: rebalance_experts(w, 18, 2, 2, 3), "num_nodes"),
    (lambda w: rebalance_experts(w, 8, 1, 1, 4), "num_replicas"),
    (lambda w: rebalance_experts(w, 16, 3, 1, 4), "num_groups"),
    (lambda w: rebalance_experts(w[0], 16, 1, 1, 4), "weight"),
    (lambda w: rebalance_experts(-w, 16, 1, 1, 4), "weight"),
    (lambda w: rebalance_experts(w * float("nan"), 16, 1, 1, 4), "weight"),
    (lambda w: plan_placement(w, 16, 1, 1, 4, current=torch.zeros(2, 15, dtype=torch.int64)), "current"),
    (lambda w: plan_placement(w, 16, 1, 1, 4, current=torch.full((2, 16), 16)), "current"),
    (lambda w: plan_placement(w, 16, 1, 1, 4, max_moves=3), "max_moves"),
    (lambda w: plan_placement(w, 16, 1, 1, 4, current=torch.zeros(2, 16, dtype=torch.int64), max_moves=3),
     "max_moves"),
    (lambda w: plan_placement(w, 16, 1, 1, 4, current=torch.arange(16).repeat(2, 1), max_moves=-1), "max_moves"),
])
def test_bad_arguments_name_the_argument(call, match):
    from moe_ext.errors import ArgumentError

    weight = torch.rand(2, 16) + 0.1
    with pytest.raises(ArgumentError, match=match):
        call(weight)


def test_count_moves_never_worse_than_greedy_counts_or_public():
    """Two slots per GPU: count moves (re-pairing) lower the peak and never raise it."""
    from moe_ext.eplb.public_reference import public_rebalance_experts

    loads = torch.from_numpy(np.random.default_rng(4).lognormal(0.0, 0.8, size=(6, 64)) * 100)
    shape = (128, 3, 4, 64)  # 3 groups % 4 nodes != 0: global mode
    refined = plan_placement(loads, *shape)
    greedy = plan_placement(loads, *shape, refine_counts=False)
    public_phy2log, _, _ = public_rebalance_experts(loads, *shape)
    public = placement_imbalance(loads, public_phy2log, 64)
    assert torch.all(refined.imbalance <= greedy.imbalance * (1 + 1e-12))
    # Per layer the public planner may pair an expert with its own twin on one GPU
    # (we refuse twins), so compare the mean over layers with it.
    assert float(refined.imbalance.mean()) <= float(public.mean())
    assert int((refined.imbalance < greedy.imbalance * (1 - 1e-6)).sum()) >= 3
    for layer in range(6):
        assert torch.equal(refined.logcnt[layer], torch.bincount(refined.phy2log[layer], minlength=64))
