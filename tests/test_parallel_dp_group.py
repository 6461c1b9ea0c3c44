"""The data-parallel group (``get_dp_group``, ``dp_layout``): layouts against an array oracle, then real groups.

The oracle restates the serving engines' DP group maths on numpy (the rank grid
``ExternalDP x DP x PP x PCP x TP`` with the DP and TP axes swapped, cut into
rows of DP). The multi-process tests build every layout a 2- and a 4-rank world
admits, check this rank's DP group's members and order against the oracle, run
every collective on it (shared with tests/test_parallel_state.py), and build a
``MoEConfig`` from the registry (EP = ``mc2``, DP = ``dp``, TP = ``tp``) whose
all-gather comm method is checked against a one-process computation.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist

from moe_ext.distributed import (
    FAMILIES,
    ParallelConfig,
    destroy_parallel_state,
    dp_layout,
    get_dp_group,
    get_group,
    get_mc2_group,
    get_tp_group,
    group_layouts,
    has_group,
    init_parallel_state,
)
from moe_ext.distributed.state import KEEPS_RANK_ORDER
from moe_ext.testing.distributed import run_distributed

from test_parallel_state import _check_collectives


def oracle_dp_layout(fields: dict) -> list[list[int]]:
    world, tp, dp = fields["world_size"], fields["tensor_parallel_size"], fields["data_parallel_size"]
    pp, pcp = fields.get("pipeline_parallel_size", 1), fields.get("prefill_context_parallel_size", 1)
    grid = np.arange(world).reshape(-1, dp, pp, pcp, tp)
    return [[int(v) for v in row] for row in np.swapaxes(grid, 1, 4).reshape(-1, dp)]


def _accepted_configs(max_world: int = 32):
    for world, tp, dp, pp, pcp in itertools.product(range(1, max_world + 1), (1, 2, 3, 4, 8), (1, 2, 3, 4),
                                                   (1, 2, 3), (1, 2)):
        fields = dict(world_size=world, tensor_parallel_size=tp, data_parallel_size=dp,
                      pipeline_parallel_size=pp, prefill_context_parallel_size=pcp)
        try:
            yield fields, ParallelConfig(**fields)
        except ValueError:
            continue


def test_dp_layout_matches_the_array_oracle_and_partitions_the_world():
    checked = 0
    for fields, config in _accepted_configs():
        layout = dp_layout(config)
        assert layout == oracle_dp_layout(fields), fields
        assert sorted(r for group in layout for r in group) == list(range(config.world_size))
        assert all(len(group) == config.data_parallel_size for group in layout)
        for group in layout:  # one model instance, one stage, one context and TP index: only DP differs
            coords = [np.unravel_index(r, (config.external_data_parallel_size, config.data_parallel_size,
                                           config.pipeline_parallel_size, config.prefill_context_parallel_size,
                                           config.tensor_parallel_size)) for r in group]
            assert [int(c[1]) for c in coords] == list(range(config.data_parallel_size))
            assert len({(c[0], c[2], c[3], c[4]) for c in coords}) == 1
        checked += 1
    assert checked > 100
    # a hand-worked case: 8 ranks, TP 2, DP 2, 2 external instances
    assert dp_layout(ParallelConfig(8, 2, 2)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # DP is not an engine family: group_layouts is unchanged by it
    assert "dp" not in group_layouts(ParallelConfig(8, 2, 2)) and "dp" not in FAMILIES


# Every layout a world of 2 / 4 ranks admits (TP, DP, PP, PCP and external DP, each where it fits).
CONFIGS = {
    2: [dict(tensor_parallel_size=1, data_parallel_size=2), dict(tensor_parallel_size=2, data_parallel_size=1),
        dict(tensor_parallel_size=1, data_parallel_size=1),  # external DP 2
        dict(tensor_parallel_size=1, data_parallel_size=1, pipeline_parallel_size=2),
        dict(tensor_parallel_size=1, data_parallel_size=1, prefill_context_parallel_size=2)],
    4: [dict(tensor_parallel_size=2, data_parallel_size=2), dict(tensor_parallel_size=1, data_parallel_size=4),
        dict(tensor_parallel_size=4, data_parallel_size=1), dict(tensor_parallel_size=1, data_parallel_size=2),
        dict(tensor_parallel_size=2, data_parallel_size=1, pipeline_parallel_size=2),
        dict(tensor_parallel_size=1, data_parallel_size=2, prefill_context_parallel_size=2),
        dict(tensor_parallel_size=1, data_parallel_size=1, pipeline_parallel_size=2,
             prefill_context_parallel_size=2),
        dict(tensor_parallel_size=2, data_parallel_size=2, dynamic_eplb=True, oproj_tensor_parallel_size=2)],
}


def _moe_allgather_check(rank: int) -> None:
    """MoEConfig from the registry's groups; the all-gather method against one process over all DP tokens."""
    from moe_ext.moe import MoEConfig, MoELayer
    from moe_ext.testing.dense_moe import dense_moe

    tp, dp, ep = get_tp_group(), get_dp_group(), get_mc2_group()
    config = MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, dp_size=dp.world_size,
                       dp_rank=dp.rank_in_group, tp_size=tp.world_size, tp_rank=tp.rank_in_group, ep_group=ep,
                       dp_group=dp, tp_group=tp)
    generator = torch.Generator().manual_seed(5)
    gate, w13, w2 = torch.randn(4, 8, generator=generator), torch.randn(4, 8, 8, generator=generator) / 3, \
        torch.randn(4, 4, 8, generator=generator) / 2
    layer = MoELayer(config, comm_method="allgather")
    layer.load_logical_weights(gate, w13, w2)
    tokens = [torch.randn(d + 1, 8, generator=generator) for d in range(dp.world_size)]  # uneven per DP rank
    out = layer(tokens[dp.rank_in_group])
    expected = dense_moe(tokens[dp.rank_in_group], gate, w13, w2, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _build_and_check(rank: int, world_size: int) -> list[list[int]]:
    seen = []
    for extra in CONFIGS[world_size]:
        fields = dict(world_size=world_size, **extra)
        config = ParallelConfig(**fields)
        init_parallel_state(config)
        try:
            group = get_dp_group()
            assert get_group("dp") is group and has_group("dp")
            [mine] = [ranks for ranks in oracle_dp_layout(fields) if rank in ranks]
            expected = mine if KEEPS_RANK_ORDER else sorted(mine)
            assert list(group.ranks) == expected and group.world_size == config.data_parallel_size
            assert group.rank_in_group == expected.index(rank) == dist.get_rank(group.device_group)
            # its own communicator, even where the ranks equal another family's
            for name in group_layouts(config):
                assert get_group(name).device_group is not group.device_group
            _check_collectives(group, torch.device("cpu"))
            if config.prefill_context_parallel_size == 1 and config.pipeline_parallel_size == 1:
                _moe_allgather_check(rank)
            seen.append(list(group.ranks))
        finally:
            destroy_parallel_state()
    assert not has_group("dp")
    with pytest.raises(RuntimeError, match="not initialised"):
        get_dp_group()
    return seen


@pytest.mark.parametrize("world_size", [2, 4])
def test_dp_group_on_gloo_every_layout(world_size):
    results = run_distributed(_build_and_check, world_size, timeout=120)
    for index, extra in enumerate(CONFIGS[world_size]):
        groups = {tuple(per_rank[index]) for per_rank in results}
        layout = oracle_dp_layout(dict(world_size=world_size, **extra))
        assert sorted(groups) == sorted(tuple(g if KEEPS_RANK_ORDER else sorted(g)) for g in layout)


def test_dp_group_getter_errors():
    with pytest.raises(RuntimeError, match="not initialised"):
        get_dp_group()
    with pytest.raises(ValueError, match="'dq'"):
        get_group("dq")
