"""The group registry on real process groups: 4 and 8 spawned ranks.

Each world size runs once (spawning costs ~3 s per rank) and, inside that one
run, builds several configs that together turn on every family, checks every
group's members against group_layouts and every collective's numbers on every
group, then destroys and re-initialises. The backend comes from
$MOE_EXT_TEST_BACKEND (gloo by default; with nccl tensors live on cuda:<rank>).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ext.distributed import (
    FAMILIES,
    ParallelConfig,
    destroy_parallel_state,
    get_dynamic_eplb_group,
    get_embed_tp_group,
    get_fc3_quant_x_group,
    get_flashcomm2_odp_group,
    get_flashcomm2_otp_group,
    get_group,
    get_lmhead_tp_group,
    get_mc2_group,
    get_mlp_tp_group,
    get_otp_group,
    get_p_tp_group,
    get_parallel_config,
    get_shard_weight_group,
    get_tp_group,
    group_layouts,
    has_group,
    init_parallel_state,
    is_initialized,
)
from moe_ext.distributed.state import KEEPS_RANK_ORDER
from moe_ext.testing.distributed import run_distributed
from moe_ext.testing.distributed import test_backend as selected_backend

NAMED_GETTERS = {
    "tp": get_tp_group, "mc2": get_mc2_group, "dynamic_eplb": get_dynamic_eplb_group,
    "otp": get_otp_group, "lmhead_tp": get_lmhead_tp_group, "embed_tp": get_embed_tp_group,
    "mlp_tp": get_mlp_tp_group, "flashcomm2_otp": get_flashcomm2_otp_group,
    "flashcomm2_odp": get_flashcomm2_odp_group, "shard_weight": get_shard_weight_group,
    "p_tp": get_p_tp_group, "fc3_quant_x": get_fc3_quant_x_group,
}

# Together, per world size, these turn on every family (checked in the parent).
CONFIGS = {
    4: [
        dict(world_size=4, tensor_parallel_size=2, data_parallel_size=2, oproj_tensor_parallel_size=2,
             lmhead_tensor_parallel_size=2, embedding_tensor_parallel_size=1, mlp_tensor_parallel_size=1,
             flashcomm2_oproj_tensor_parallel_size=2, layer_sharding=True, dynamic_eplb=True,
             multistream_overlap_gate=True, pd_head_ratio=2, kv_producer=True, pd_tp_ratio=2),
        dict(world_size=4, tensor_parallel_size=4, data_parallel_size=1,
             flashcomm2_oproj_tensor_parallel_size=1, layer_sharding=True, pd_head_ratio=2,
             kv_producer=True, pd_tp_ratio=4, num_head_replica=2),
    ],
    8: [
        dict(world_size=8, tensor_parallel_size=2, data_parallel_size=4, oproj_tensor_parallel_size=4,
             lmhead_tensor_parallel_size=2, embedding_tensor_parallel_size=2, mlp_tensor_parallel_size=4,
             flashcomm2_oproj_tensor_parallel_size=2, layer_sharding=True, dynamic_eplb=True,
             multistream_overlap_gate=True, pd_head_ratio=2, kv_producer=True, pd_tp_ratio=2,
             num_head_replica=2),
        # 2 external DP instances; shard-weight over TP groups
        dict(world_size=8, tensor_parallel_size=2, data_parallel_size=2, layer_sharding=True),
        # shard-weight groups in the engine's unsorted order: [0, 2, 1, 3], [4, 6, 5, 7]
        dict(world_size=8, tensor_parallel_size=2, data_parallel_size=1, pipeline_parallel_size=2,
             prefill_context_parallel_size=2, layer_sharding=True, dsa_cp_layer_shard=True),
    ],
}


def _device(rank: int) -> torch.device:
    return torch.device("cuda", rank) if selected_backend() == "nccl" else torch.device("cpu")


def _check_collectives(group, device: torch.device) -> None:
    """Every collective of one group, against numbers computed from its member list."""
    size, me, ranks, rank = group.world_size, group.rank_in_group, group.ranks, group.rank

    def values(of_rank: int, shape) -> torch.Tensor:
        count = 1
        for extent in shape:
            count *= extent
        return (torch.arange(count, dtype=torch.float32) + 1000.0 * of_rank).reshape(shape).to(device)

    # all_reduce
    x = values(rank, (3, 2))
    reduced = group.all_reduce(x.clone())
    expected = sum(values(r, (3, 2)) for r in ranks)
    torch.testing.assert_close(reduced, expected, rtol=0, atol=0)
    if size == 1:
        assert group.all_reduce(x) is x  # no communication, input returned

    # all_gather along every dim, negative included
    x = values(rank, (2, 3, 2))
    for dim in (0, 1, 2, -1, -3):
        gathered = group.all_gather(x, dim)
        torch.testing.assert_close(gathered, torch.cat([values(r, (2, 3, 2)) for r in ranks], dim),
                                   rtol=0, atol=0)

    # reduce_scatter along every dim
    shape = (2 * size, 3 * size, 2 * size)
    x = values(rank, shape)
    total = sum(values(r, shape) for r in ranks)
    for dim in (0, 1, 2, -2):
        scattered = group.reduce_scatter(x.clone(), dim)
        torch.testing.assert_close(scattered, total.chunk(size, dim)[me], rtol=0, atol=0)
    if size > 1:
        with pytest.raises(ValueError, match="multiple of the group size"):
            group.reduce_scatter(values(rank, (size + 1, 2)), 0)

    # all_to_all_single, even: block j of rank r holds 1000 r + j
    blocks = [torch.full((2, 3), 1000.0 * rank + j, device=device) for j in range(size)]
    received = group.all_to_all_single(torch.cat(blocks))
    expected = torch.cat([torch.full((2, 3), 1000.0 * r + me, device=device) for r in ranks])
    torch.testing.assert_close(received, expected, rtol=0, atol=0)
    # uneven: member i sends (i + j + 1) rows to member j, into a given output buffer
    send_splits = [me + j + 1 for j in range(size)]
    recv_splits = [i + me + 1 for i in range(size)]
    send = torch.cat([torch.full((count, 2), 1000.0 * rank + j, device=device)
                      for j, count in enumerate(send_splits)])
    buffer = torch.empty((sum(recv_splits), 2), device=device)
    received = group.all_to_all_single(send, recv_splits, send_splits, output=buffer)
    assert received is buffer
    expected = torch.cat([torch.full((count, 2), 1000.0 * ranks[i] + me, device=device)
                          for i, count in enumerate(recv_splits)])
    torch.testing.assert_close(received, expected, rtol=0, atol=0)

    # broadcast from the last member
    x = values(rank, (4,))
    torch.testing.assert_close(group.broadcast(x, src=size - 1), values(ranks[-1], (4,)), rtol=0, atol=0)
    group.barrier()

    with pytest.raises(RuntimeError, match="HCCL"):
        group.hccl_comm_name()


def _build_and_check(rank: int, world_size: int, configs: list[dict]) -> list[list[str]]:
    device = _device(rank)
    backend = selected_backend()
    built = []
    assert not is_initialized()
    with pytest.raises(ValueError, match="world_size"):
        init_parallel_state(ParallelConfig(world_size * 2, 1, 1))
    for round_index, fields in enumerate(configs + configs[:1]):  # the last round re-inits config 0
        config = ParallelConfig(**fields)
        layouts = group_layouts(config)
        init_parallel_state(config)
        assert is_initialized() and get_parallel_config() == config
        init_parallel_state(config)  # same config again: no-op
        other = configs[(round_index + 1) % len(configs)]
        if other != fields:
            with pytest.raises(RuntimeError, match="destroy_parallel_state"):
                init_parallel_state(ParallelConfig(**other))

        for name in FAMILIES:
            if name not in layouts:
                assert not has_group(name)
                if name == "flashcomm2_otp" and config.flashcomm2_oproj_tensor_parallel_size == 1:
                    assert get_flashcomm2_otp_group() is None  # as the engine: O-TP 1 has no group
                else:
                    with pytest.raises(RuntimeError, match="not built by the current ParallelConfig"):
                        get_group(name)
                continue
            group = get_group(name)
            assert NAMED_GETTERS[name]() is group
            [mine] = [ranks for ranks in layouts[name] if rank in ranks]
            if not KEEPS_RANK_ORDER:  # torch < 2.12: new_group sorts (the layout's members still match)
                mine = sorted(mine)
            assert list(group.ranks) == mine and group.world_size == len(mine)
            assert group.rank_in_group == mine.index(rank) == dist.get_rank(group.device_group)
            assert dist.get_process_group_ranks(group.device_group) == mine  # engine order kept
            assert dist.get_backend(group.device_group) == backend
            assert dist.get_backend(group.cpu_group) == "gloo"
            _check_collectives(group, device)

        # Sharing: fine-grained TP by size; O-DP is the TP group when O-TP is 1; the MC2-shaped
        # families each have their own communicator.
        sizes = config.finegrained_tp_sizes
        for first in sizes:
            for second in sizes:
                assert (get_group(first) is get_group(second)) == (sizes[first] == sizes[second])
        if config.flashcomm2_oproj_tensor_parallel_size == 1:
            assert get_flashcomm2_odp_group() is get_tp_group()
        mc2_like = [get_group(name).device_group for name in ("mc2", "dynamic_eplb", "fc3_quant_x")
                    if name in layouts]
        assert len({id(group) for group in mc2_like}) == len(mc2_like)

        destroy_parallel_state()
        assert not is_initialized()
        with pytest.raises(RuntimeError, match="not initialised"):
            get_mc2_group()
        built.append(sorted(layouts))
    destroy_parallel_state()  # a second destroy is harmless
    return built


@pytest.mark.parametrize("world_size", [4, 8])
def test_registry_builds_every_family_with_working_collectives(world_size):
    if selected_backend() == "nccl" and torch.cuda.device_count() < world_size:
        pytest.skip(f"nccl with {world_size} ranks needs {world_size} GPUs, "
                    f"found {torch.cuda.device_count()}")
    results = run_distributed(_build_and_check, world_size, CONFIGS[world_size],
                              backend=selected_backend(), timeout=240)
    for per_rank in results:
        assert per_rank == results[0]
    families = {name for built in results[0] for name in built}
    assert families == set(FAMILIES), set(FAMILIES) - families


def test_registry_errors_without_process_group():
    assert not dist.is_initialized()
    config = ParallelConfig(4, 2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        init_parallel_state(config)
    with pytest.raises(ValueError, match="ParallelConfig"):
        init_parallel_state({"world_size": 4})
    assert not is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        get_group("mc2")
    with pytest.raises(ValueError, match="'bogus'"):
        get_group("bogus")
    destroy_parallel_state()  # nothing to destroy: no error
