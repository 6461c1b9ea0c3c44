"""EPLB planner properties (issue 14): the hierarchy kept, never worse than current,
no avoidable twins, argument errors, and safe arithmetic on extreme loads.

Hypothesis draws small and mid-sized shapes, hierarchical and global; a few larger
seeded cases run as plain tests. Every input quoted in the issue is a test here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_ext.eplb import placement_imbalance, plan_placement, rebalance_experts
from moe_ext.errors import ArgumentError


def replicas_outside_their_node(phy2log, num_groups, num_nodes, num_gpus):
    """Per layer, replicas outside their group's node under the best group->node assignment,
    or -1 when no assignment with num_groups / num_nodes groups per node keeps them all home."""
    layers, slots = phy2log.shape
    experts = int(phy2log.max()) + 1
    slots_per_node = slots // num_nodes
    out = []
    for layer in range(layers):
        node_sets = {}
        for slot, expert in enumerate(phy2log[layer].tolist()):
            node_sets.setdefault(expert * num_groups // max(experts, 1), set()).add(slot // slots_per_node)
        spread = any(len(nodes) > 1 for nodes in node_sets.values())
        per_node = np.bincount([next(iter(n)) for n in node_sets.values()], minlength=num_nodes)
        out.append(-1 if spread or (per_node > num_groups // num_nodes).any() else 0)
    return out


def twins(phy2log, num_gpus):
    """Per layer: replicas sharing a GPU with another replica of their expert."""
    layers, slots = phy2log.shape
    per_gpu = phy2log.view(layers, num_gpus, slots // num_gpus)
    return [sum(row.numel() - torch.unique(row).numel() for row in per_gpu[layer]) for layer in range(layers)]


@st.composite
def cases(draw, hierarchical=None):
    nodes = draw(st.integers(1, 4))
    gpus_per_node = draw(st.integers(1, 4))
    gpus = nodes * gpus_per_node
    is_hier = draw(st.booleans()) if hierarchical is None else hierarchical
    if is_hier:
        groups = nodes * draw(st.integers(1, 3))
    else:
        groups = draw(st.integers(1, 7))
        if groups % nodes == 0:
            groups = nodes + 1 if nodes > 1 else 1
            if groups % nodes == 0:  # nodes == 1: every case is hierarchical; keep it
                pass
    experts = groups * draw(st.integers(1, 4))
    per_gpu = draw(st.integers(1, 5))
    replicas = gpus * per_gpu
    while replicas < experts:
        replicas += gpus
    layers = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["lognormal", "zipf", "one_hot", "ints", "zeros"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return layers, experts, replicas, groups, nodes, gpus, kind, seed


def loads_of(layers, experts, kind, seed):
    generator = np.random.default_rng(seed)
    if kind == "lognormal":
        weight = generator.lognormal(0.0, 1.5, size=(layers, experts))
    elif kind == "zipf":
        base = 1.0 / np.arange(1, experts + 1) ** 1.2
        weight = np.stack([base[generator.permutation(experts)] for _ in range(layers)])
    elif kind == "one_hot":
        weight = np.full((layers, experts), 1.0)
        weight[:, generator.integers(experts)] = 1000.0
    elif kind == "ints":
        weight = generator.integers(0, 100, size=(layers, experts)).astype(float)
    else:
        weight = np.zeros((layers, experts))
    return torch.tensor(weight * 100)


def random_placement(layers, experts, replicas, seed):
    """A random phy2log holding every expert at least once."""
    generator = np.random.default_rng(seed)
    rows = []
    for _ in range(layers):
        row = np.concatenate([np.arange(experts), generator.integers(0, experts, replicas - experts)])
        rows.append(generator.permutation(row))
    return torch.tensor(np.stack(rows), dtype=torch.int64)


# 1. Hierarchy semantics ----------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(cases(hierarchical=True))
def test_hierarchical_plans_keep_every_replica_on_its_node(case):
    layers, experts, replicas, groups, nodes, gpus, kind, seed = case
    weight = loads_of(layers, experts, kind, seed)
    phy2log, _, _ = rebalance_experts(weight, replicas, groups, nodes, gpus)
    assert replicas_outside_their_node(phy2log, groups, nodes, gpus) == [0] * layers
    plan = plan_placement(weight, replicas, groups, nodes, gpus)  # default: strict too
    assert replicas_outside_their_node(plan.phy2log, groups, nodes, gpus) == [0] * layers
    assert int(plan.cross_node_replicas.sum()) == 0 and not bool(plan.hierarchy_relaxed.any())
    # imbalance >= strict bound >= global bound; relaxing can only help.
    assert (plan.imbalance >= plan.lower_bound - 1e-9).all()
    assert (plan.lower_bound >= plan.global_lower_bound - 1e-9).all()
    assert (plan.relaxed_imbalance <= plan.imbalance + 1e-12).all()
    assert (plan.relaxed_imbalance >= plan.global_lower_bound - 1e-9).all()


def test_strict_is_the_default_and_relaxing_is_reported():
    # The issue's setting: 288 slots, 32 GPUs, 4 nodes, 8 groups, skewed loads.
    generator = np.random.default_rng(3)
    base = 1.0 / np.arange(1, 257) ** 1.2
    weight = torch.tensor(np.stack([base[generator.permutation(256)] for _ in range(4)]) * 1e4)
    strict = plan_placement(weight, 288, 8, 4, 32)
    assert int(strict.cross_node_replicas.sum()) == 0
    assert replicas_outside_their_node(strict.phy2log, 8, 4, 32) == [0] * 4
    relaxed = plan_placement(weight, 288, 8, 4, 32, allow_cross_node=True)
    helped = strict.relax_gain > 0.02
    # relax_gain is the relative reduction 1 - relaxed / imbalance: in [0, 1), never "> 100%".
    assert ((strict.relax_gain >= 0) & (strict.relax_gain < 1)).all()
    assert torch.allclose(strict.relax_gain, (1 - strict.relaxed_imbalance / strict.imbalance).clamp_min(0))
    assert float(strict.relax_gain.max()) > 0.3  # Zipf 1.2, 8 groups on 4 nodes: strict is far off (old formula: > 0.9)
    # Layers where relaxing helps by > 2% are relaxed on request, and the strict plan says by how much.
    assert bool(helped.any())
    assert bool(relaxed.hierarchy_relaxed[helped].all())
    assert (relaxed.imbalance[helped] < strict.imbalance[helped]).all()
    # The strict plan's report (the global-mode plan) is within 2% of what relaxing then gives.
    assert (strict.relaxed_imbalance[helped] <= relaxed.imbalance[helped] * 1.02).all()
    assert not bool(relaxed.hierarchy_relaxed[~helped].any())


# 2. Never worse than current ------------------------------------------------------------------

def test_the_issues_move_bounded_case_is_not_worse_than_current():
    weight = torch.tensor([[23.0, 94.0, 86.0, 41.0]])
    current = torch.tensor([[2, 3, 0, 3, 0, 1]])
    before = placement_imbalance(weight, current, 2)
    plan = plan_placement(weight, 6, 1, 1, 2, current=current, max_moves=1)
    assert float(plan.imbalance[0]) <= float(before[0])
    assert int(plan.moves[0]) == int((plan.phy2log != current).sum()) <= 1
    assert int(plan.same_gpu_duplicates[0]) == 0


@settings(max_examples=80, deadline=None)
@given(cases(), st.one_of(st.none(), st.integers(0, 12)), st.booleans(), st.floats(0.0, 0.3))
def test_never_worse_than_current_for_any_budget(case, max_moves, cross, tolerance):
    layers, experts, replicas, groups, nodes, gpus, kind, seed = case
    if groups % nodes == 0 and gpus % nodes:
        return
    weight = loads_of(layers, experts, kind, seed)
    current = random_placement(layers, experts, replicas, seed + 1)
    before = placement_imbalance(weight, current, gpus)
    plan = plan_placement(weight, replicas, groups, nodes, gpus, current=current, max_moves=max_moves,
                          allow_cross_node=cross, tolerance=tolerance)
    assert (plan.imbalance <= before * (1 + 1e-12)).all(), (plan.imbalance, before)
    assert torch.equal(plan.moves, (plan.phy2log != current).sum(1))  # exact
    if max_moves is not None:
        assert (plan.moves <= max_moves).all()
    assert torch.allclose(plan.imbalance, placement_imbalance(weight, plan.phy2log, gpus), rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(cases(), st.booleans(), st.sampled_from([0.0, 0.02, 0.1]))
def test_more_moves_allowed_is_never_worse(case, cross, tolerance):
    # A plan allowed more moves is never worse than one allowed fewer (same inputs), up to the
    # tolerance the planner stops at: once within (1 + tolerance) of the from-scratch plan it
    # prefers fewer moves. So for B1 < B2: imbalance(B2) <= max(imbalance(B1), limit).
    layers, experts, replicas, groups, nodes, gpus, kind, seed = case
    if groups % nodes == 0 and gpus % nodes:
        return
    weight = loads_of(layers, experts, kind, seed)
    current = random_placement(layers, experts, replicas, seed + 1)
    scratch = plan_placement(weight, replicas, groups, nodes, gpus, allow_cross_node=cross)
    limit = scratch.imbalance * (1 + tolerance)
    budgets = [*range(0, min(replicas, 10) + 1), None]
    results = [plan_placement(weight, replicas, groups, nodes, gpus, current=current, max_moves=budget,
                              allow_cross_node=cross, tolerance=tolerance).imbalance for budget in budgets]
    for i in range(len(budgets)):
        for j in range(i + 1, len(budgets)):
            assert (results[j] <= torch.maximum(results[i], limit) * (1 + 1e-9)).all(), (budgets[i], budgets[j])


def test_the_demos_window_is_monotone_in_max_moves():
    # Last round: 2 moves -> 1.24, 3 moves -> 1.30 (the repair spent the third move on a replica
    # grant that needed swaps it could no longer pay for, and fell back to not moving).
    load = torch.tensor([[184., 525., 135., 3041., 1394., 803., 622., 629., 346., 316., 344., 289., 466.,
                          316., 346., 484.]])
    current = (torch.arange(20) % 16).unsqueeze(0)
    found = [float(plan_placement(load, 20, 1, 1, 4, current=current, max_moves=m).imbalance[0])
             for m in range(0, 13)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(found, found[1:])), found
    assert found[2] < 1.25 and found[3] <= found[2] and found[5] < 1.1 and found[8] < 1.02


@pytest.mark.parametrize("experts,replicas,groups,nodes,gpus", [
    (64, 80, 8, 4, 16),    # the issue's hierarchical case
    (64, 80, 3, 4, 16),    # global
    (256, 288, 8, 4, 32),  # DeepSeek-V3-like, hierarchical
    (256, 512, 8, 32, 256),
])
def test_never_worse_than_current_large(experts, replicas, groups, nodes, gpus):
    for seed in range(2):
        weight = loads_of(3, experts, "lognormal", seed)
        for current in (random_placement(3, experts, replicas, seed),
                        plan_placement(weight * torch.rand(3, experts, dtype=torch.float64).add(0.5),
                                       replicas, groups, nodes, gpus).phy2log):
            before = placement_imbalance(weight, current, gpus)
            for max_moves in (0, 1, 4, 16, None):
                plan = plan_placement(weight, replicas, groups, nodes, gpus, current=current,
                                      max_moves=max_moves)
                assert (plan.imbalance <= before * (1 + 1e-12)).all()
                assert torch.equal(plan.moves, (plan.phy2log != current).sum(1))
                if max_moves == 0:
                    assert torch.equal(plan.phy2log, current)


# 3. Counts that can be placed -----------------------------------------------------------------

def test_the_issues_twin_cases():
    plan = plan_placement(torch.tensor([[1000.0, 1.0]]), 4, 1, 1, 2)
    assert plan.logcnt.tolist() == [[2, 2]] and int(plan.same_gpu_duplicates[0]) == 0
    assert float(plan.imbalance[0]) == pytest.approx(1.0, abs=1e-3)
    weight = torch.ones(1, 16)
    weight[0, 0] = 1e5
    plan = plan_placement(weight, 32, 1, 1, 16)
    assert int(plan.logcnt.max()) <= 16 and int(plan.same_gpu_duplicates[0]) == 0
    assert float(plan.imbalance[0]) < 1.01


@settings(max_examples=80, deadline=None)
@given(cases())
def test_no_twins_whenever_a_twin_free_placement_exists(case):
    layers, experts, replicas, groups, nodes, gpus, kind, seed = case
    if groups % nodes == 0 and gpus % nodes:
        return
    weight = loads_of(layers, experts, kind, seed)
    plan = plan_placement(weight, replicas, groups, nodes, gpus)
    per_gpu = replicas // gpus
    hierarchical = groups % nodes == 0
    # Counting: a domain (a node in strict mode, else all GPUs) can be twin-free iff it has at
    # least as many experts as each of its GPUs has slots.
    domain_experts = experts // nodes if hierarchical else experts
    found = twins(plan.phy2log, gpus)
    assert plan.same_gpu_duplicates.tolist() == found  # reported exactly
    if domain_experts >= per_gpu:
        assert found == [0] * layers, (plan.phy2log, plan.logcnt)
    else:  # forced by the slot arithmetic: at least per_gpu - domain_experts per GPU, reported
        assert all(t >= gpus * (per_gpu - domain_experts) for t in found)


# 4. Arguments and arithmetic ------------------------------------------------------------------

def test_global_mode_ignores_num_nodes_like_the_public_algorithm():
    weight = torch.rand(2, 12) + 0.1
    a = rebalance_experts(weight, 18, 5, 4, 6)  # 5 % 4 != 0: global; 6 % 4 != 0 is fine there
    b = rebalance_experts(weight, 18, 1, 2, 6)  # global too: groups and nodes play no part
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("call,error,match", [
    (lambda w: rebalance_experts(w, 16.0, 1, 1, 4), TypeError, "num_replicas"),
    (lambda w: rebalance_experts(w, 16, "1", 1, 4), TypeError, "num_groups"),
    (lambda w: rebalance_experts(w, 16, 1, True, 4), TypeError, "num_nodes"),
    (lambda w: rebalance_experts([[1.0]], 16, 1, 1, 4), TypeError, "weight"),
    (lambda w: rebalance_experts(w.to(torch.complex64), 16, 1, 1, 4), TypeError, "weight"),
    (lambda w: rebalance_experts(w > 0.5, 16, 1, 1, 4), TypeError, "weight"),
    (lambda w: rebalance_experts(w, 16, 1, 0, 4), ArgumentError, "num_nodes"),
    (lambda w: rebalance_experts(w, 16, 1, 1, 0), ArgumentError, "num_gpus"),
    (lambda w: rebalance_experts(w * float("inf"), 16, 1, 1, 4), ArgumentError, "weight"),
    (lambda w: plan_placement(w, 16, 1, 1, 4, allow_cross_node=1), TypeError, "allow_cross_node"),
    (lambda w: plan_placement(w, 16, 1, 1, 4, tolerance=float("nan")), ArgumentError, "tolerance"),
    (lambda w: plan_placement(w, 16, 1, 1, 4, current=torch.zeros(2, 16)), TypeError, "current"),
    (lambda w: placement_imbalance(w * float("nan"), torch.zeros(2, 16, dtype=torch.int64), 4),
     ArgumentError, "weight"),
    (lambda w: plan_placement(w.unsqueeze(0), 16, 1, 1, 4, window_weights=[1.0, 2.0]), ArgumentError,
     "window_weights"),
])
def test_argument_errors(call, error, match):
    weight = torch.rand(2, 16) + 0.1
    with pytest.raises(error, match=match):
        call(weight)
    if error is ArgumentError:  # both, as the public implementations assert
        with pytest.raises(ValueError):
            call(weight)
        with pytest.raises(AssertionError):
            call(weight)


@pytest.mark.parametrize("scale", [1e308, 1e300, 1e-300, 5e-324])
def test_extreme_loads_give_finite_metrics(scale):
    weight = torch.tensor([[1.0, 0.5, 0.25, 1.0, 0.0, 0.75]], dtype=torch.float64) * scale
    plan = plan_placement(weight, 8, 1, 1, 4)
    reference = plan_placement(weight / scale, 8, 1, 1, 4)
    for value in (plan.imbalance, plan.lower_bound, plan.global_lower_bound, plan.relaxed_imbalance,
                  placement_imbalance(weight, plan.phy2log, 4)):
        assert torch.isfinite(value).all() and (value >= 1.0).all()
    if scale >= 1e-300:  # (5e-324 is the smallest denormal: the fractions round away)
        assert torch.allclose(plan.imbalance, reference.imbalance, rtol=1e-9)
    # A balanced-looking answer is never given for garbage: non-finite loads are refused.
    with pytest.raises(ArgumentError):
        placement_imbalance(torch.full((1, 6), float("nan")), plan.phy2log, 4)


# 7. History planning --------------------------------------------------------------------------

@pytest.mark.parametrize("groups,nodes", [(1, 1), (4, 2), (3, 2)])
def test_history_plan_never_worse_than_point_plan_or_current(groups, nodes):
    generator = np.random.default_rng(5)
    history = torch.from_numpy(generator.lognormal(0.0, 1.0, size=(5, 3, 32)) * 100)
    weights = torch.tensor([1.0, 1.0, 2.0, 2.0, 4.0])
    plan = plan_placement(history, 48, groups, nodes, 8, window_weights=weights)
    normalised = weights / weights.sum()

    def objective(phy2log):
        per_window = torch.stack([placement_imbalance(w, phy2log, 8) for w in history])
        return (normalised[:, None] * per_window).sum(0), per_window

    mean, per_window = objective(plan.phy2log)
    assert torch.allclose(plan.imbalance, mean) and torch.allclose(plan.window_imbalance, per_window)
    assert torch.allclose(plan.worst_window_imbalance, per_window.max(0).values)
    point = plan_placement(history.sum(0), 48, groups, nodes, 8)
    assert (plan.imbalance <= objective(point.phy2log)[0] + 1e-12).all()
    current = random_placement(3, 32, 48, 1)
    migrated = plan_placement(history, 48, groups, nodes, 8, current=current, max_moves=3, window_weights=weights)
    assert (migrated.imbalance <= objective(current)[0] + 1e-12).all()
    assert (migrated.moves <= 3).all() and torch.equal(migrated.moves, (migrated.phy2log != current).sum(1))


def test_a_move_budget_that_pays_off_is_used_even_if_it_adds_a_twin():
    # The default demo's first window (16 experts, 20 slots on 4 GPUs, a quarter of the slots may
    # move): every twin-free plan within 5 moves is no better than not moving, one with a twin
    # takes the imbalance from 1.30 to about 1.06. Refusing it froze the demo's placement.
    load = torch.tensor([[184., 525., 135., 3041., 1394., 803., 622., 629., 346., 316., 344., 289., 466.,
                          316., 346., 484.]])
    current = (torch.arange(20) % 16).unsqueeze(0)
    before = float(placement_imbalance(load, current, 4)[0])
    plan = plan_placement(load, 20, 4, 1, 4, current=current, max_moves=5)
    assert before > 1.29 and float(plan.imbalance[0]) < 1.1
    assert 0 < int(plan.moves[0]) <= 5
    assert plan.same_gpu_duplicates.tolist() == twins(plan.phy2log, 4)  # the twin is reported
