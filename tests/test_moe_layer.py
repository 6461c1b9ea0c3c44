"""Multi-process checks of every MoE comm method and of MoELayer against the dense reference.

One spawned group per world size runs the whole grid (spawning costs seconds
per process). MOE_EXT_TEST_BACKEND=nccl runs the same grid on GPUs (the
torch_npu emulation cases are CPU-only and run on gloo).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_cases import run_grid
from moe_ext.testing.distributed import run_distributed
from moe_ext.testing.distributed import test_backend as backend_under_test

DENSE_METHODS = ("allgather", "native_allgather", "alltoall")


def _token_counts(dp_size, variant):
    patterns = {2: [[5, 0], [3, 7], [1, 1]], 4: [[4, 0, 9, 2], [0, 3, 1, 6], [2, 2, 2, 2]]}
    return patterns[dp_size][variant % 3] if dp_size > 1 else [[6], [0], [9]][variant % 3]


def comm_cases(dp_size, tp_size):
    world = dp_size * tp_size
    num_slots = 8 * world if world == 2 else 4 * world
    cases = []
    for index, (method, pattern, top_k) in enumerate(itertools.product(
            DENSE_METHODS, ("random", "local", "remote"), (1, 3, 8))):
        cases.append(("comm", dict(method=method, num_slots=num_slots, top_k=top_k, hidden=16, inter=8,
                                   token_counts=_token_counts(dp_size, index), pattern=pattern,
                                   dtype=torch.float32, seed=index)))
    for method in DENSE_METHODS:  # bf16, grouped-matmul-friendly sizes
        cases.append(("comm", dict(method=method, num_slots=num_slots, top_k=4, hidden=32, inter=16,
                                   token_counts=_token_counts(dp_size, 1), pattern="random",
                                   dtype=torch.bfloat16, seed=99)))
    return cases


ROUTINGS = [
    dict(scoring="softmax", renormalize=True),
    dict(scoring="softmax", renormalize=False),
    dict(scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2, group_score="top2_sum",
         use_correction_bias=True, routed_scaling_factor=2.5),
    dict(scoring="softmax", renormalize=False, num_expert_group=4, topk_group=3, group_score="max"),
    dict(scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2, group_score="top2_sum"),
]


def layer_cases(dp_size, tp_size):
    world = dp_size * tp_size
    cases = []
    for index, (method, routing) in enumerate(itertools.product(DENSE_METHODS + ("auto",), ROUTINGS)):
        top_k = (1, 2, 6, 8)[index % 4]
        cases.append(("layer", dict(method=method, num_experts=16, top_k=top_k, hidden=16, inter=8,
                                    token_counts=_token_counts(dp_size, index), dtype=torch.float32,
                                    seed=100 + index, routing=routing, redundant=world * (index % 2))))
    for index, method in enumerate(DENSE_METHODS):  # training: gradients of x, gate and local experts
        cases.append(("layer", dict(method=method, num_experts=8, top_k=2 + index, hidden=16, inter=8,
                                    token_counts=_token_counts(dp_size, index), dtype=torch.float32,
                                    seed=200 + index, routing=ROUTINGS[0], backward=True)))
    return cases


def all_cases(dp_size, tp_size):
    return comm_cases(dp_size, tp_size) + layer_cases(dp_size, tp_size)


@pytest.mark.parametrize("world_size, layouts", [(2, [(2, 1), (1, 2)]), (4, [(4, 1), (2, 2)])])
def test_every_comm_method_matches_dense_reference(world_size, layouts):
    if backend_under_test() == "nccl" and torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs for nccl")
    checks = run_distributed(run_grid, world_size, layouts, all_cases, backend=backend_under_test(), timeout=600)
    expected = sum(len(all_cases(dp, tp)) for dp, tp in layouts)
    assert checks == [expected] * world_size


def test_single_rank_layer_feeds_eplb_load_recorder_and_replicas():
    from moe_ext.eplb import LoadRecorder
    from moe_ext.moe import MoEConfig, MoELayer
    from moe_ext.testing.dense_moe import dense_moe

    torch.manual_seed(3)
    num_experts, slots, top_k, hidden = 6, 9, 2, 16
    placement = torch.tensor([2, 0, 1, 5, 4, 3, 0, 0, 4])  # expert 0 has three replicas, 4 has two
    config = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=hidden, intermediate_size=8,
                       num_physical_experts=slots)
    recorder = LoadRecorder(num_layers=2, num_experts=num_experts, window=4)  # logical experts
    layer = MoELayer(config, placement=placement, load_recorder=recorder, layer_index=1)
    gate, w13, w2 = torch.randn(num_experts, hidden), torch.randn(num_experts, hidden, 16), torch.randn(num_experts, 8, hidden)
    layer.load_logical_weights(gate, w13, w2)
    x = torch.randn(12, hidden)
    torch.testing.assert_close(layer(x), dense_moe(x, gate, w13, w2, top_k), atol=1e-4, rtol=1e-4)
    _, chosen = layer.route(x)
    from moe_ext.testing.dense_moe import dense_routing
    logical = [sorted(experts) for experts, _ in dense_routing(x @ gate.t(), top_k)]
    assert [sorted(row) for row in placement[chosen.long()].tolist()] == logical  # each slot holds the chosen expert
    recorder.step()
    load = recorder.load()
    assert int(load[1].sum()) == 12 * top_k and int(load[0].sum()) == 0
    assert torch.equal(load[1], torch.bincount(placement[chosen.reshape(-1).long()], minlength=num_experts))
    assert torch.equal(layer.last_slot_load, torch.bincount(chosen.reshape(-1).long(), minlength=slots))
    # the replica of expert e is t % replicas[e]: recompute it per token
    replicas_of = {0: [1, 6, 7], 4: [4, 8]}
    for t, row in enumerate(chosen.tolist()):
        for slot in row:
            expert = int(placement[slot])
            if expert in replicas_of:
                assert slot == replicas_of[expert][t % len(replicas_of[expert])]
