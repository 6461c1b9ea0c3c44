"""MoELayer backward on every rank (issue 12): the failing inputs of the issue and a seeded matrix.

Every case compares the forward and the gradients of x, the router weight and
the local expert weights with a single-process dense reference, fp32, tight
tolerance, with a short timeout so a rank left waiting in a collective fails
the test in seconds instead of hanging.

The matrix (EP 2 and 4, TP 1 and 2, EP on a subgroup, skewed routing with
empty ranks and experts, every backward-capable method) runs a seeded sample
in CI; ``MOE_EXT_FULL_MATRIX=1`` runs all of it (about 4x the cases).
"""

from __future__ import annotations

import os

import pytest
import torch

from moe_backward_cases import check_forward_only_methods, issue_cases, matrix_cases, run_cases
from moe_ext.testing.distributed import run_distributed

FULL = os.environ.get("MOE_EXT_FULL_MATRIX") == "1"
TIMEOUT = 120  # generous for a loaded 2-core machine; a hang used to wait out gloo's 30 minutes


@pytest.mark.parametrize("world_size", [2, 4])
def test_issue_inputs_and_matrix_on_gloo(world_size, monkeypatch):
    monkeypatch.setenv("MOE_EXT_TEST_BACKEND", "gloo")  # CPU tensors in the ranks, whatever the run sets
    cases = issue_cases(world_size) + matrix_cases(world_size, sample=None if FULL else 6)
    checks = run_distributed(run_cases, world_size, cases, timeout=TIMEOUT * (4 if FULL else 1))
    assert checks == [len(cases)] * world_size


def test_forward_only_methods_refuse_backward_by_name(monkeypatch):
    monkeypatch.setenv("MOE_EXT_TEST_BACKEND", "gloo")
    messages = run_distributed(check_forward_only_methods, 2, timeout=TIMEOUT)
    for rank_messages in messages:
        mc2, dummy = rank_messages
        assert "MoE comm method 'mc2' is forward-only" in mc2 and "'alltoall'" in mc2
        assert "MoE comm method 'dummy' is forward-only" in dummy


@pytest.mark.cuda
def test_two_rank_issue_inputs_on_nccl(monkeypatch):
    """EP 2 with experts that get no rows, a rank with no tokens, and DP 1 x TP 2, on two GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs for nccl")
    monkeypatch.setenv("MOE_EXT_TEST_BACKEND", "nccl")  # inherited by the spawned ranks: tensors on cuda:<rank>
    cases = issue_cases(2) + matrix_cases(2, sample=None)
    checks = run_distributed(run_cases, 2, cases, backend="nccl", timeout=TIMEOUT)
    assert checks == [len(cases)] * 2
