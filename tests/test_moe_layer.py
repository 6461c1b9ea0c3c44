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
    dict(scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2, use_correction_bias=True,
         routed_scaling_factor=2.5),
    dict(scoring="softmax", renormalize=False, num_expert_group=4, topk_group=3),
]


def layer_cases(dp_size, tp_size):
    world = dp_size * tp_size
    cases = []
    for index, (method, routing) in enumerate(itertools.product(DENSE_METHODS + ("auto",), ROUTINGS)):
        top_k = (1, 2, 6, 8)[index % 4]
        cases.append(("layer", dict(method=method, num_experts=16, top_k=top_k, hidden=16, inter=8,
                                    token_counts=_token_counts(dp_size, index), dtype=torch.float32,
                                    seed=100 + index, routing=routing, redundant=world * (index % 2))))
    if tp_size == 1:  # training: gradients of x, gate and local experts
        for index, method in enumerate(DENSE_METHODS):
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
