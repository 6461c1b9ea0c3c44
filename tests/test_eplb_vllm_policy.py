"""moe_ext.eplb.vllm_policy: vLLM's EPLB policy interface and rearrangement call shape.

vLLM is not a dependency. The policy is checked (1) against vLLM's own AbstractEplbPolicy when
its source file can be found without importing vLLM's package (vLLM installed, even with
--no-deps, or MOE_EXT_VLLM_SOURCE pointing at a vLLM source tree; skipped otherwise) and (2)
always, against the signature recorded from vLLM 0.33.0's policy/abstract.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_ext.eplb import placement_imbalance
from moe_ext.eplb.vllm_policy import MoeExtEplbPolicy, rearrange_expert_weights_vllm, vllm_policy_class
from moe_ext.errors import ArgumentError
from moe_ext.testing.distributed import run_distributed

# vLLM 0.33.0, vllm/distributed/eplb/policy/abstract.py: AbstractEplbPolicy.rebalance_experts
VLLM_POLICY_PARAMETERS = [("weight", inspect.Parameter.empty), ("num_replicas", inspect.Parameter.empty),
                          ("num_groups", inspect.Parameter.empty), ("num_nodes", inspect.Parameter.empty),
                          ("num_ranks", inspect.Parameter.empty), ("old_global_expert_indices", None)]
# vLLM 0.33.0, vllm/distributed/eplb/rebalance_execute.py: rearrange_expert_weights_inplace
VLLM_REARRANGE_PARAMETERS = ["old_global_expert_indices", "new_global_expert_indices", "expert_weights",
                             "expert_buffer", "ep_group", "communicator", "is_profile", "rank_mapping"]


def _vllm_abstract_source():
    root = os.environ.get("MOE_EXT_VLLM_SOURCE")
    if root:
        return Path(root) / "vllm" / "distributed" / "eplb" / "policy" / "abstract.py"
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "distributed" / "eplb" / "policy" / "abstract.py"


def test_signature_matches_vllm_0_33():
    signature = inspect.signature(MoeExtEplbPolicy.rebalance_experts)
    assert [(p.name, p.default) for p in signature.parameters.values()] == VLLM_POLICY_PARAMETERS
    assert isinstance(inspect.getattr_static(MoeExtEplbPolicy, "rebalance_experts"), classmethod)
    assert list(inspect.signature(rearrange_expert_weights_vllm).parameters) == VLLM_REARRANGE_PARAMETERS


def test_against_vllms_own_abstract_class():
    path = _vllm_abstract_source()
    if path is None or not path.exists():
        pytest.skip("vLLM's policy/abstract.py not found (pip install --no-deps vllm, or set MOE_EXT_VLLM_SOURCE)")
    spec = importlib.util.spec_from_file_location("vllm_eplb_policy_abstract", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the file imports only abc and torch
    abstract = module.AbstractEplbPolicy
    policy = vllm_policy_class(abstract, max_moves=4)
    assert issubclass(policy, abstract) and not inspect.isabstract(policy)
    ours = inspect.signature(policy.rebalance_experts).parameters
    theirs = inspect.signature(abstract.rebalance_experts).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]
    weight = torch.from_numpy(np.random.default_rng(0).lognormal(0, 1, size=(3, 16)) * 100)
    old = policy.rebalance_experts(weight, 24, 4, 2, 8)
    drifted = weight * torch.from_numpy(np.random.default_rng(1).uniform(0.5, 1.5, size=(3, 16)))
    new = policy.rebalance_experts(drifted, 24, 4, 2, 8, old)
    assert ((new != old).sum(1) <= 4).all()
    assert (placement_imbalance(drifted, new, 8) <= placement_imbalance(drifted, old, 8) + 1e-12).all()


def test_policy_behaviour():
    weight = torch.from_numpy(np.random.default_rng(2).lognormal(0, 1, size=(4, 32)) * 100).float()
    new = MoeExtEplbPolicy.rebalance_experts(weight, 48, 8, 2, 8)
    assert new.shape == (4, 48) and new.dtype == torch.int64
    # hierarchy kept like vLLM's default: every group's replicas on one node
    for layer in range(4):
        for group in range(8):
            slots = [s for s in range(48) if int(new[layer, s]) // 4 == group]
            assert len({s // 24 for s in slots}) == 1
    bounded = MoeExtEplbPolicy.configured(max_moves=2)
    old = torch.arange(48).remainder(32).repeat(4, 1)
    moved = bounded.rebalance_experts(weight, 48, 8, 2, 8, old)
    assert ((moved != old).sum(1) <= 2).all()
    # an old map from another shape or with -1 (elastic scaling) is ignored: a plan from scratch
    scratch = bounded.rebalance_experts(weight, 48, 8, 2, 8, torch.full((4, 48), -1))
    assert torch.equal(scratch, new)
    with pytest.raises(AssertionError):  # vLLM's policy asserts on bad values
        MoeExtEplbPolicy.rebalance_experts(weight, 50, 8, 2, 8)
    with pytest.raises(ArgumentError):
        MoeExtEplbPolicy.configured(max_moves=-1)
    with pytest.raises(TypeError):
        MoeExtEplbPolicy.configured(allow_cross_node="yes")


def _rearrange_rank(rank, world_size):
    per_rank, layers = 3, 2
    old = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    new = np.array([[5, 1, 2, 3, 4, 0], [0, 4, 3, 2, 1, 5]])
    weights = [[torch.tensor([[float(old[layer, rank * per_rank + row])] * 4 for row in range(per_rank)])]
               for layer in range(layers)]
    buffer = [torch.empty(per_rank, 4)]
    with pytest.raises(TypeError, match="communicator"):
        rearrange_expert_weights_vllm(torch.tensor(old), torch.tensor(new), weights, buffer, None, None)
    rearrange_expert_weights_vllm(torch.tensor(old), torch.tensor(new), weights, buffer, None, object())
    return [[w[0][:, 0].tolist()] for w in weights]


def test_rearrangement_call_shape_runs_moe_exts_executor():
    results = run_distributed(_rearrange_rank, 2, timeout=120)
    new = [[5, 1, 2, 3, 4, 0], [0, 4, 3, 2, 1, 5]]
    for rank, per_layer in enumerate(results):
        for layer in range(2):
            assert per_layer[layer][0] == [float(x) for x in new[layer][rank * 3:(rank + 1) * 3]]
