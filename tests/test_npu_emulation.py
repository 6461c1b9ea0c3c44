"""The torch_npu call sites (platform/npu.py, AllGather's NPU path, MC2) against the emulated op contracts.

This checks moe_ext's wiring against the documented contracts, not the
hardware. Runs on gloo/CPU whatever MOE_EXT_TEST_BACKEND says (the emulation
is CPU-only).
"""

from __future__ import annotations

import pytest
import torch

from moe_cases import layer_case
from moe_ext.moe import make_moe_groups, select_comm_method, MoEConfig
from moe_ext.testing.distributed import run_distributed
from moe_ext.testing.npu import EmulatedTorchNpu, emulated_runtime

NPU_CALL_SITES = {"npu_moe_init_routing_v2", "npu_moe_token_unpermute", "npu_grouped_matmul", "npu_swiglu"}


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
    with pytest.raises(ValueError):
        ops.npu_moe_init_routing_v2(x, ids.long(), expert_num=6)


def test_token_unpermute_refuses_what_the_contract_forbids():
    ops = EmulatedTorchNpu()
    rows = torch.randn(4, 3)
    probs = torch.rand(2, 2)
    out = ops.npu_moe_token_unpermute(rows, torch.tensor([2, 0, 1, 3], dtype=torch.int32), probs)
    torch.testing.assert_close(out[0], probs[0, 0] * rows[2] + probs[0, 1] * rows[0])
    for bad in ([2, -1, 1, 3], [2, 2, 1, 3]):
        with pytest.raises(ValueError):
            ops.npu_moe_token_unpermute(rows, torch.tensor(bad, dtype=torch.int32), probs)


def test_grouped_matmul_and_swiglu():
    ops = EmulatedTorchNpu()
    x, w = torch.randn(5, 4), torch.randn(2, 4, 6)
    y = ops.npu_grouped_matmul(x=[x], weight=[w], group_list=torch.tensor([1, 3]), group_list_type=1,
                               split_item=2, group_type=0)[0]
    torch.testing.assert_close(y[:1], x[:1] @ w[0])
    torch.testing.assert_close(y[1:4], x[1:4] @ w[1])
    assert torch.isnan(y[4:]).all()  # past the last group: undefined on the NPU
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(ops.npu_swiglu(torch.cat([a, b], 1)), torch.nn.functional.silu(a) * b)


def _dispatch_layout(rank, world_size):
    """Dispatch rows must come grouped by local expert, then source rank, then (t, k) order."""
    runtime = emulated_runtime("A2", with_v2=False)
    from moe_ext.platform import npu as adapter
    import torch.distributed as dist
    group = dist.group.WORLD
    name = adapter.hccl_comm_name(runtime, group, rank)
    num_experts, batch, top_k = 2 * world_size, 3, 2
    generator = torch.Generator().manual_seed(5)
    all_ids = [torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(batch)])
               for _ in range(world_size)]
    x = (rank * 100 + torch.arange(batch, dtype=torch.float32)).unsqueeze(1).repeat(1, 32)
    rows, counts, state = adapter.distribute_dispatch(runtime, x, all_ids[rank], comm_name=name,
                                                      ep_world_size=world_size, ep_rank_id=rank,
                                                      moe_expert_num=num_experts, active_mask=None)
    expected = []
    for local in range(2):
        for source in range(world_size):
            flat = all_ids[source].reshape(-1)
            expected += [source * 100 + f // top_k for f in range(flat.numel()) if flat[f] == rank * 2 + local]
    assert rows[:len(expected), 0].tolist() == expected
    assert int(counts.sum()) == len(expected)
    return True


def npu_layer_grid(rank, world_size, layouts):
    """MC2 and AllGather's NPU path through the whole layer, on every documented chip variant."""
    calls: dict[str, int] = {}
    checks = 0
    for dp_size, tp_size in layouts:
        groups = make_moe_groups(dp_size, tp_size)
        counts = {2: [5, 0], 4: [4, 0, 9, 2]}.get(dp_size, [6])
        for index, (soc, v2, method) in enumerate([("A2", False, "mc2"), ("A2", True, "mc2"), ("A3", False, "mc2"),
                                                   ("A3", True, "mc2"), ("A3", True, "allgather"),
                                                   ("A2", False, "auto")]):
            runtime = emulated_runtime(soc, with_v2=v2)
            hidden = 1024 if soc == "A3" else 64
            chosen = layer_case(groups, torch.device("cpu"), method, num_experts=8 * world_size // 2, top_k=1 + index,
                                hidden=hidden, inter=16, token_counts=counts, dtype=torch.float32, seed=300 + index,
                                routing=dict(scoring="softmax", renormalize=True), npu=runtime,
                                redundant=world_size * (index % 2))
            assert chosen == ("mc2" if method == "auto" else method)
            for name, number in runtime.ops.calls.items():
                calls[name] = calls.get(name, 0) + number
            checks += 1
    _dispatch_layout(rank, world_size)
    return calls, checks


@pytest.mark.parametrize("world_size, layouts", [(2, [(2, 1), (1, 2)]), (4, [(2, 2)])])
def test_npu_paths_under_emulation(world_size, layouts):
    results = run_distributed(npu_layer_grid, world_size, layouts, backend="gloo", timeout=600)
    for calls, checks in results:
        assert checks == 6 * len(layouts)
        called = set(calls)
        assert NPU_CALL_SITES <= called
        assert {"npu_moe_distribute_dispatch", "npu_moe_distribute_combine", "npu_moe_distribute_dispatch_v2",
                "npu_moe_distribute_combine_v2"} <= called


def test_select_comm_method_rules():
    config = MoEConfig(num_experts=256, top_k=8, hidden_size=7168, intermediate_size=2048)
    assert select_comm_method(config, 64) == "allgather"
    assert select_comm_method(config, 64, force="alltoall") == "alltoall"
    with pytest.raises(ValueError):
        select_comm_method(config, 64, force="bogus")
