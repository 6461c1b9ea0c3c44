"""MoELayer input checks across ranks and group timeouts (issue 15, items 11-13), on gloo.

A rank whose input differs from its peers' (dtype, hidden size, comm method,
grad mode) or is bad on its own makes *every* rank raise at once, through the
all-reduce that building the forward context already does; nobody is left
waiting in a collective (the short process-group timeout would turn a wait
into a failure). After each refusal the group is still in step: a correct
forward follows.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from moe_ext.errors import ArgumentError
from moe_ext.testing.distributed import run_distributed

HIDDEN = 8


def _layer(groups, method="allgather", dtype=torch.float32):
    from moe_ext.moe import MoEConfig, MoELayer
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=HIDDEN, intermediate_size=4, dtype=dtype, **groups)
    layer = MoELayer(config, comm_method=method)
    generator = torch.Generator().manual_seed(0)
    layer.load_logical_weights(torch.randn(4, HIDDEN, generator=generator),
                               torch.randn(4, HIDDEN, 8, generator=generator).to(dtype),
                               torch.randn(4, 4, HIDDEN, generator=generator).to(dtype))
    return layer


def _expect_error(call):
    try:
        call()
    except (ArgumentError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    raise AssertionError("no error raised")


def _mismatches(rank, world_size):
    from moe_ext.moe import build_forward_context, make_moe_groups
    groups = make_moe_groups(world_size, 1)
    assert all(g is None or g is dist.group.WORLD or
               g._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(seconds=45)
               for g in (groups["dp_group"], groups["tp_group"]))
    layer = _layer(groups)
    x = torch.randn(3, HIDDEN)
    results = {}
    # 11: float64 on rank 1 only; hidden size wrong on rank 1 only; different comm methods; grad mode.
    results["dtype"] = _expect_error(lambda: layer(x.double() if rank == 1 else x))
    results["hidden"] = _expect_error(lambda: layer(torch.randn(3, HIDDEN + 1) if rank == 1 else x))
    other = _layer(groups, "alltoall" if rank == 1 else "allgather")
    results["method"] = _expect_error(lambda: other(x))
    def grad_mismatch():
        with torch.set_grad_enabled(rank == 0):
            layer(x)
    results["grad"] = _expect_error(grad_mismatch)
    # 13: the same bad dtype on every rank: each refuses its own input, with the expected dtype.
    results["int64"] = _expect_error(lambda: layer(torch.ones(3, HIDDEN, dtype=torch.int64)))
    results["bf16"] = _expect_error(lambda: layer(x.bfloat16()))
    results["list"] = _expect_error(lambda: layer([[0.0] * HIDDEN]))
    # max_tokens_across_dp supplied: no all-reduce, so the check is opt-in (check_call=True).
    facts = {"hidden size": HIDDEN + rank}
    results["opt_in"] = _expect_error(lambda: build_forward_context(layer.config, 3, max_tokens_across_dp=3,
                                                                    call_facts=facts, check_call=True))
    built = build_forward_context(layer.config, 3, max_tokens_across_dp=3, call_facts=facts)  # not checked
    assert built.max_tokens_across_dp == 3
    # Still in step: a correct forward on every rank.
    y = layer(x)
    assert y.shape == x.shape
    return results


def test_per_rank_mismatches_raise_on_every_rank_at_once():
    results = run_distributed(_mismatches, 2, timeout=45)
    rank0, rank1 = results
    assert "disagree on hidden_states dtype" in rank0["dtype"] and "torch.float64" in rank0["dtype"]
    assert "must have dtype torch.float32 (the expert weights' dtype), got torch.float64" in rank1["dtype"]
    assert "disagree on hidden size" in rank0["hidden"]
    assert f"must have shape [T, {HIDDEN}], got [3, {HIDDEN + 1}]" in rank1["hidden"]
    for result in (rank0, rank1):
        assert "disagree on comm method" in result["method"] and "'alltoall'" in result["method"]
        assert "disagree on grad mode" in result["grad"]
        assert "must have dtype torch.float32" in result["int64"] and "got torch.int64" in result["int64"]
        assert "got torch.bfloat16" in result["bf16"]
        assert result["list"].startswith("TypeError: MoELayer: hidden_states must be a torch.Tensor")
        assert "disagree on hidden size" in result["opt_in"]


def test_single_rank_layer_refuses_bad_dtype_with_the_expected_one():
    from moe_ext.moe import MoEConfig, MoELayer
    layer = _layer(dict())
    with pytest.raises(ArgumentError, match=r"dtype torch.float32 \(the expert weights' dtype\), got torch.int64"):
        layer(torch.ones(2, HIDDEN, dtype=torch.int64))
    with pytest.raises(ArgumentError, match="got torch.float64"):
        layer(torch.ones(2, HIDDEN, dtype=torch.float64))
    assert MoEConfig and MoELayer


def _registry_timeout(rank, world_size):
    from moe_ext.distributed import ParallelConfig, destroy_parallel_state, get_tp_group, init_parallel_state
    from moe_ext.distributed import world_timeout
    assert world_timeout() == datetime.timedelta(seconds=173)
    init_parallel_state(ParallelConfig(world_size=world_size, tensor_parallel_size=world_size, data_parallel_size=1))
    group = get_tp_group()
    inherited = group.device_group._get_backend(torch.device("cpu")).options._timeout
    destroy_parallel_state()
    init_parallel_state(ParallelConfig(world_size=world_size, tensor_parallel_size=world_size, data_parallel_size=1),
                        timeout=datetime.timedelta(seconds=12))
    told = get_tp_group().device_group._get_backend(torch.device("cpu")).options._timeout
    destroy_parallel_state()
    return inherited.total_seconds(), told.total_seconds()


def test_groups_inherit_the_world_timeout():
    # a distinctive world timeout that is also long enough for a busy 2-core machine to spawn two ranks
    assert run_distributed(_registry_timeout, 2, timeout=173) == [(173.0, 12.0)] * 2
