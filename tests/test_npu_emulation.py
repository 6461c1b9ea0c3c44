"""The torch_npu call sites (platform/npu.py, AllGather's NPU path, MC2) against the emulated op contracts.

Every emulated call is bound by the real schemas of the pinned torch-npu
release (tests/test_npu_schemas.py checks that binding itself); this file
checks behaviour against the operators' documentation, not the hardware.
Runs on gloo/CPU whatever MOE_EXT_TEST_BACKEND says (the emulation is
CPU-only). The MC2 cases run in bf16, as the operators require.

CI runs the v2 operators (what torch_npu 2.14 always exposes) at EP 2 and 4,
and checks that the v1 operators bind and are refused there (their documented
EP sizes start at 8 on A3 and 16 on A2). ``MOE_EXT_NPU_FULL_MATRIX=1`` adds the
v1 paths end to end at their smallest documented sizes (8 and 16 ranks:
minutes of CPU on a small machine).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from moe_cases import layer_case
from moe_ext.errors import ArgumentError
from moe_ext.moe import make_moe_groups, select_comm_method, MoEConfig
from moe_ext.testing.distributed import run_distributed
from moe_ext.testing.npu import EmulatedTorchNpu, emulated_runtime
from moe_ext.testing.npu_schemas import CALL_SITE_OPERATORS

FULL_MATRIX = os.environ.get("MOE_EXT_NPU_FULL_MATRIX") == "1"


def test_init_routing_v2_contract():
    ops = EmulatedTorchNpu()
    x = torch.arange(4, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    ids = torch.tensor([[3, 1], [1, 0], [5, 3], [2, 1]], dtype=torch.int32)
    out, row_idx, counts, _ = ops.npu_moe_init_routing_v2(x, ids, active_num=8, expert_num=6,
                                                          expert_tokens_num_type=1, expert_tokens_num_flag=True,
                                                          active_expert_range=[1, 4])
    # flattened ids 3 1 1 0 5 3 2 1; in range [1,4): stable order f=1,2,7 (e1), 6 (e2), 0,5 (e3)
    assert out[:6, 0].tolist() == [0, 1, 3, 3, 0, 2]
    assert torch.isnan(out[6:]).all()  # rows past the valid count are "not written"
    assert row_idx.tolist() == [4, 0, 1, -1, -1, 5, 3, 2]
    assert counts.tolist() == [3, 1, 2]
    good = dict(expert_num=6, expert_tokens_num_type=1, expert_tokens_num_flag=True)
    with pytest.raises(TypeError, match="int32"):
        ops.npu_moe_init_routing_v2(x, ids.long(), **good)
    # torch_npu 7.x documentation: count types 1/2 only, the count flag True only.
    with pytest.raises(ArgumentError, match="expert_tokens_num_type"):
        ops.npu_moe_init_routing_v2(x, ids, **{**good, "expert_tokens_num_type": 0})
    with pytest.raises(ArgumentError, match="expert_tokens_num_flag"):
        ops.npu_moe_init_routing_v2(x, ids, **{**good, "expert_tokens_num_flag": False})
    with pytest.raises(ArgumentError, match="active_expert_range"):
        ops.npu_moe_init_routing_v2(x, ids, **good, active_expert_range=[4, 2])


def test_token_unpermute_refuses_what_the_contract_forbids():
    ops = EmulatedTorchNpu()
    rows = torch.randn(4, 3)
    probs = torch.rand(2, 2)
    out = ops.npu_moe_token_unpermute(rows, torch.tensor([2, 0, 1, 3], dtype=torch.int32), probs)
    torch.testing.assert_close(out[0], probs[0, 0] * rows[2] + probs[0, 1] * rows[0])
    for bad in ([2, -1, 1, 3], [2, 2, 1, 3]):
        with pytest.raises(ArgumentError):
            ops.npu_moe_token_unpermute(rows, torch.tensor(bad, dtype=torch.int32), probs)
    with pytest.raises(TypeError, match="sorted_indices"):
        ops.npu_moe_token_unpermute(rows, torch.tensor([2, 0, 1, 3]), probs)


def test_grouped_matmul_and_swiglu():
    ops = EmulatedTorchNpu()
    x, w = torch.randn(5, 4, dtype=torch.bfloat16), torch.randn(2, 4, 6, dtype=torch.bfloat16)
    y = ops.npu_grouped_matmul([x], [w], group_list=torch.tensor([1, 5]), group_list_type=0, split_item=2,
                               group_type=0)[0]
    torch.testing.assert_close(y[:1], (x[:1].float() @ w[0].float()).bfloat16())
    torch.testing.assert_close(y[1:], (x[1:].float() @ w[1].float()).bfloat16())
    # Documented: the groups must cover x's rows exactly (issue 21, item 5).
    for group_list, kind in (([1, 3], 1), ([1, 4], 0), ([5], 1), ([3, 1], 0)):
        with pytest.raises(ArgumentError, match="group_list"):
            ops.npu_grouped_matmul([x], [w[:len(group_list)]], group_list=torch.tensor(group_list),
                                   group_list_type=kind, split_item=2, group_type=0)
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(ops.npu_swiglu(torch.cat([a, b], 1)), torch.nn.functional.silu(a) * b)


def test_grouped_gated_mlp_keeps_padded_rows_inside_the_groups():
    """The call site hands every row to the groups (padding joins the last one) without a host sync."""
    from moe_ext.platform import npu as adapter
    runtime = emulated_runtime("A3")
    rows = torch.randn(7, 8, dtype=torch.bfloat16)
    rows[5:] = float("nan")  # padding: MC2 / init_routing leave it unwritten
    w13, w2 = torch.randn(3, 8, 6, dtype=torch.bfloat16), torch.randn(3, 3, 8, dtype=torch.bfloat16)
    for counts, kind in (([2, 0, 3], 1), ([2, 2, 5], 0)):
        out = adapter.grouped_gated_mlp(runtime, rows, torch.tensor(counts), kind, w13, w2)
        ends = [0, 2, 2, 5]
        for expert in range(3):
            part = rows[ends[expert]:ends[expert + 1]].float()
            gate, up = (part @ w13[expert].float()).bfloat16().float().chunk(2, dim=-1)
            expected = ((torch.nn.functional.silu(gate) * up).bfloat16().float() @ w2[expert].float()).bfloat16()
            torch.testing.assert_close(out[ends[expert]:ends[expert + 1]], expected)
        assert torch.isnan(out[5:]).all()  # padding stays meaningless, and nobody reads it
    one_expert = adapter.grouped_gated_mlp(runtime, rows[:4], torch.tensor([3]), 1, w13[:1], w2[:1])
    assert one_expert.shape == (4, 8)  # a single local expert: cumsum form (counts may not have length 1)


def _mc2_arguments(soc, v2, **change):
    """A valid single-rank-view dispatch call (checks run before the communicator is looked up)."""
    hidden = 7168 if (soc == "A3" and not v2) else (1024 if soc == "A3" else 64)
    world = (16 if soc == "A2" else 8) if not v2 else 2
    arguments = dict(x=torch.zeros(4, hidden, dtype=torch.bfloat16),
                     expert_ids=torch.tensor([[0, 1]] * 4, dtype=torch.int32), group_ep="not_registered",
                     ep_world_size=world, ep_rank_id=0, moe_expert_num=2 * world)
    if soc == "A2":
        arguments["expert_scales"] = torch.rand(4, 2)
    arguments.update(change)
    return {name: value for name, value in arguments.items() if value is not None}


@pytest.mark.parametrize("soc, v2, change, error, match", [
    ("A3", True, dict(x=torch.zeros(4, 1024)), TypeError, "x must be torch.bfloat16 or torch.float16"),
    ("A2", True, dict(x=torch.zeros(4, 64, dtype=torch.float16)), None, None),
    ("A3", True, dict(expert_ids=torch.tensor([[0, 1]] * 4)), TypeError, "expert_ids must be torch.int32"),
    ("A3", True, dict(expert_ids=torch.tensor([[1, 1]] * 4, dtype=torch.int32)), ArgumentError, "must not repeat"),
    ("A3", True, dict(expert_scales=torch.rand(4, 2)), ArgumentError, "not supported on A3"),
    ("A2", True, dict(expert_scales=torch.rand(4, 2).half()), TypeError, "expert_scales must be torch.float32"),
    ("A3", True, dict(x_active_mask=torch.ones(4, dtype=torch.int32)), TypeError, "x_active_mask must be torch.bool"),
    ("A3", True, dict(x_active_mask=torch.tensor([True, False, True, True])), ArgumentError, "all trues before"),
    ("A3", False, dict(x_active_mask=torch.tensor([True, False, True, True])), None, None),  # v1: reserved
    ("A3", True, dict(group_tp="not_registered"), ArgumentError, "group_tp must differ from group_ep"),
    ("A3", True, dict(tp_world_size=1, tp_rank_id=1), ArgumentError, "tp_rank_id must be 0"),
    ("A2", True, dict(group_tp="other"), ArgumentError, "on A2 group_tp"),
    ("A2", True, dict(x=torch.zeros(257, 64, dtype=torch.bfloat16),
                      expert_ids=torch.tensor([[0, 1]] * 257, dtype=torch.int32),
                      expert_scales=torch.rand(257, 2)), ArgumentError, "BS must be in \\(0, 256\\]"),
    ("A3", True, dict(x=torch.zeros(513, 1024, dtype=torch.bfloat16),
                      expert_ids=torch.tensor([[0, 1]] * 513, dtype=torch.int32)), ArgumentError, "BS must be"),
    ("A2", True, dict(moe_expert_num=50), ArgumentError, "at most 24 experts per rank"),
    ("A2", False, dict(moe_expert_num=16 * 25), ArgumentError, "at most 24 experts per rank"),
    ("A2", True, dict(x=torch.zeros(4, 48, dtype=torch.bfloat16)), ArgumentError, "multiple of 32"),
    ("A3", False, dict(x=torch.zeros(4, 1024, dtype=torch.bfloat16)), ArgumentError, "H must be 7168"),
    ("A3", True, dict(x=torch.zeros(4, 512, dtype=torch.bfloat16)), ArgumentError, "\\[1024, 8192\\]"),
    ("A3", False, dict(expert_ids=torch.tensor([list(range(9))] * 4, dtype=torch.int32)), ArgumentError,
     "K must be in \\(0, 8\\]"),
    ("A3", True, dict(expert_ids=torch.tensor([list(range(13))] * 4, dtype=torch.int32), moe_expert_num=16),
     ArgumentError, "K must be in \\(0, 12\\]"),
    ("A2", False, dict(ep_world_size=8, moe_expert_num=16), ArgumentError, "ep_world_size on A2"),
    ("A3", True, dict(scales=torch.zeros(4, 1024)), NotImplementedError, "quantisation"),
])
def test_mc2_refuses_what_the_documentation_refuses(soc, v2, change, error, match):
    ops = EmulatedTorchNpu(soc, with_v2=v2)
    dispatch = ops.npu_moe_distribute_dispatch_v2 if v2 else ops.npu_moe_distribute_dispatch
    if error is None:  # accepted: it gets as far as the (unregistered) communicator
        with pytest.raises(ArgumentError, match="unknown HCCL communicator"):
            dispatch(**_mc2_arguments(soc, v2, **change))
        return
    with pytest.raises(error, match=match):
        dispatch(**_mc2_arguments(soc, v2, **change))


def _dispatch_layout(rank, world_size):
    """Dispatch rows come grouped by local expert, then source rank, then (t, k) order (A2, v2)."""
    runtime = emulated_runtime("A2", with_v2=True)
    from moe_ext.platform import npu as adapter
    import torch.distributed as dist
    group = dist.group.WORLD
    name = adapter.hccl_comm_name(runtime, group)
    with pytest.raises(ArgumentError, match="global rank"):
        adapter.hccl_comm_name(runtime, group, (rank + 1) % world_size)
    num_experts, batch, top_k = 2 * world_size, 3, 2
    generator = torch.Generator().manual_seed(5)
    all_ids = [torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(batch)])
               for _ in range(world_size)]
    weights = torch.rand(batch, top_k, generator=generator)
    x = (rank * 10 + torch.arange(batch, dtype=torch.float32)).unsqueeze(1).repeat(1, 32).bfloat16()  # exact in bf16
    kwargs = dict(comm_name=name, ep_world_size=world_size, ep_rank_id=rank, moe_expert_num=num_experts)
    rows, counts, state = adapter.distribute_dispatch(runtime, x, all_ids[rank], active_mask=None,
                                                      expert_weights=weights, **kwargs)
    expected = []
    for local in range(2):
        for source in range(world_size):
            flat = all_ids[source].reshape(-1)
            expected += [source * 10 + f // top_k for f in range(flat.numel()) if flat[f] == rank * 2 + local]
    assert rows[:len(expected), 0].float().tolist() == expected
    assert int(counts.sum()) == len(expected)
    assert torch.isnan(rows[len(expected):].float()).all()
    # A2: combine requires the expand_scales its dispatch derived from expert_scales (issue 21, item 4).
    y = adapter.distribute_combine(runtime, rows * 2, weights, state, **kwargs)
    torch.testing.assert_close(y.float(), (x.float() * 2 * weights.sum(1, keepdim=True)).bfloat16().float(),
                               atol=0.5, rtol=1e-2)
    _, _, state = adapter.distribute_dispatch(runtime, x, all_ids[rank], active_mask=None, expert_weights=weights,
                                              **kwargs)
    state.expand_scales = state.expand_scales.clone()  # not the tensor dispatch returned
    with pytest.raises(ArgumentError, match="expand_scales"):
        adapter.distribute_combine(runtime, rows, weights, state, **kwargs)
    return True


def _v1_binds_then_refuses(rank, world_size):
    """The v1 call sites bind to the v1 schemas; at EP 2/4 the operators refuse the EP size, as documented."""
    from moe_ext.platform import npu as adapter
    import torch.distributed as dist
    calls = {}
    for soc, hidden in (("A2", 64), ("A3", 7168)):
        runtime = emulated_runtime(soc, with_v2=False)
        name = adapter.hccl_comm_name(runtime, dist.group.WORLD)
        kwargs = dict(comm_name=name, ep_world_size=world_size, ep_rank_id=rank, moe_expert_num=2 * world_size)
        x = torch.zeros(2, hidden, dtype=torch.bfloat16)
        ids, weights = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), torch.rand(2, 2)
        with pytest.raises(ArgumentError, match="ep_world_size"):
            adapter.distribute_dispatch(runtime, x, ids, active_mask=None, expert_weights=weights, **kwargs)
        # Combine's arguments, as the call site builds them from a dispatch's outputs.
        state = adapter.DispatchState(ids, torch.zeros(4, dtype=torch.int32), torch.zeros(8, dtype=torch.int32),
                                      torch.zeros(0, dtype=torch.int32), torch.zeros(8), None)
        with pytest.raises(ArgumentError, match="ep_world_size"):
            adapter.distribute_combine(runtime, torch.zeros(8, hidden, dtype=torch.bfloat16), weights, state,
                                       **kwargs)
        for key, value in runtime.ops.calls.items():
            calls[key] = calls.get(key, 0) + value
    return calls


def _fused_matmuls(rank, world_size):
    """platform/npu.py's matmul + collective call sites (moe_ext.parallel's), once each, through the binding."""
    import torch.distributed as dist
    from moe_ext.platform import npu as adapter
    runtime = emulated_runtime("A2")
    name = adapter.hccl_comm_name(runtime, dist.group.WORLD)
    generator = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 256, generator=generator).bfloat16() for _ in range(world_size)]
    weight = torch.randn(256, 8, generator=generator).bfloat16()
    total = sum(x.float() @ weight.float() for x in xs)
    reduced = adapter.mm_all_reduce(runtime, xs[rank], weight, name)
    torch.testing.assert_close(reduced.float(), total, atol=0.5, rtol=2e-2)
    scattered = adapter.mm_reduce_scatter(runtime, xs[rank], weight, name, world_size)
    rows = 4 // world_size
    torch.testing.assert_close(scattered.float(), total[rank * rows:(rank + 1) * rows], atol=0.5, rtol=2e-2)
    return runtime.ops.calls


def npu_layer_grid(rank, world_size, layouts):
    """MC2 and AllGather's NPU path through the whole layer, on every chip variant the EP size admits."""
    calls: dict[str, int] = {}
    checks = 0
    for dp_size, tp_size in layouts:
        groups = make_moe_groups(dp_size, tp_size)
        counts = {2: [5, 0], 4: [4, 0, 9, 2]}.get(dp_size, [6])
        # (soc, v2, forced method, expected method): v1 MC2 needs EP >= 8 (A3) / 16 (A2), so "auto" falls
        # back to the all-gather path there.
        for index, (soc, v2, method, chosen) in enumerate([
                ("A2", True, "mc2", "mc2"), ("A3", True, "mc2", "mc2"), ("A3", True, "allgather", "allgather"),
                ("A2", True, "auto", "mc2"), ("A2", False, "auto", "allgather"), ("A3", False, "auto", "allgather")]):
            runtime = emulated_runtime(soc, with_v2=v2)
            hidden = 1024 if soc == "A3" else 64
            got = layer_case(groups, torch.device("cpu"), method, num_experts=8 * world_size // 2, top_k=1 + index,
                             hidden=hidden, inter=16, token_counts=counts, dtype=torch.bfloat16, seed=300 + index,
                             routing=dict(scoring="softmax", renormalize=True), npu=runtime,
                             redundant=world_size * (index % 2))
            assert got == chosen, (soc, v2, method, got)
            for name, number in runtime.ops.calls.items():
                calls[name] = calls.get(name, 0) + number
            checks += 1
    _dispatch_layout(rank, world_size)
    for name, number in itertools.chain(_v1_binds_then_refuses(rank, world_size).items(),
                                        _fused_matmuls(rank, world_size).items()):
        calls[name] = calls.get(name, 0) + number
    return calls, checks


@pytest.mark.parametrize("world_size, layouts", [(2, [(2, 1), (1, 2)]), (4, [(2, 2)])])
def test_npu_paths_under_emulation(world_size, layouts):
    results = run_distributed(npu_layer_grid, world_size, layouts, backend="gloo", timeout=600)
    for calls, checks in results:
        assert checks == 6 * len(layouts)
        # Every torch_npu operator moe_ext calls was bound (by the pinned schema) at least once.
        assert set(CALL_SITE_OPERATORS) <= set(calls), set(CALL_SITE_OPERATORS) - set(calls)


def _v1_end_to_end(rank, world_size):
    """v1 dispatch/combine at their documented sizes: A2 over all 16 ranks; A3 (H 7168) on two EP groups of 8."""
    import torch.distributed as dist
    from moe_ext.platform import npu as adapter
    cases = [("A2", 64, None, list(range(world_size)))]
    groups = [dist.new_group(list(range(start, start + 8))) for start in range(0, world_size, 8)]
    cases.append(("A3", 7168, groups[rank // 8], list(range(rank // 8 * 8, rank // 8 * 8 + 8))))
    for soc, hidden, group, members in cases:
        runtime = emulated_runtime(soc, with_v2=False)
        group = group or dist.group.WORLD
        ep_rank, ep_size = members.index(rank), len(members)
        name = adapter.hccl_comm_name(runtime, group)  # global rank, also on the second group of 8
        generator = torch.Generator().manual_seed(11 + rank)
        ids = torch.stack([torch.randperm(ep_size, generator=generator)[:4] for _ in range(3)]).to(torch.int32)
        weights = torch.rand(3, 4, generator=generator)
        x = torch.randn(3, hidden, generator=generator).bfloat16()
        kwargs = dict(comm_name=name, ep_world_size=ep_size, ep_rank_id=ep_rank, moe_expert_num=ep_size)
        rows, counts, state = adapter.distribute_dispatch(runtime, x, ids, active_mask=None, expert_weights=weights,
                                                          **kwargs)
        # Expert e (one per rank) scales its rows by e + 1.
        scale = float(ep_rank + 1)
        y = adapter.distribute_combine(runtime, rows * scale, weights, state, **kwargs)
        expected = x.float() * (weights * (ids.float() + 1)).sum(1, keepdim=True)
        torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=3e-2)
    return True


@pytest.mark.skipif(not FULL_MATRIX, reason="16 spawned ranks; set MOE_EXT_NPU_FULL_MATRIX=1 to run")
def test_v1_operators_at_their_documented_sizes():
    assert all(run_distributed(_v1_end_to_end, 16, backend="gloo", timeout=900))


def test_select_comm_method_rules():
    config = MoEConfig(num_experts=256, top_k=8, hidden_size=7168, intermediate_size=2048)
    assert select_comm_method(config, 64) == "allgather"
    assert select_comm_method(config, 64, force="alltoall") == "alltoall"
    with pytest.raises(ValueError):
        select_comm_method(config, 64, force="bogus")
