"""ParallelConfig validation and group_layouts, without torch.distributed.

Three kinds of checks:

1. hand-worked layouts for a documented handful of configs;
2. a grid of configs up to 64 ranks, each compared with an independent
   array-based restatement of the reference engine's layout maths
   (``engine_reference_layouts``, numpy reshapes and transposes as the engine
   does them, quirks included). The grid is two-sided: every config that
   ParallelConfig accepts gives exactly the engine's groups and those groups
   are sane (every family partitions the world into equal groups that stay
   inside the units they must stay in); every config it refuses is one where
   the engine's maths fail or build groups that are not sane;
3. clear ValueErrors for bad configs.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest

from moe_ext.distributed import FAMILIES, ParallelConfig, group_layouts

FINEGRAINED = ("otp", "lmhead_tp", "embed_tp", "mlp_tp")
FINEGRAINED_FIELD = {"otp": "oproj_tensor_parallel_size", "lmhead_tp": "lmhead_tensor_parallel_size",
                     "embed_tp": "embedding_tensor_parallel_size", "mlp_tp": "mlp_tensor_parallel_size"}
DEFAULTS = dict(pipeline_parallel_size=1, prefill_context_parallel_size=1,
                oproj_tensor_parallel_size=0, lmhead_tensor_parallel_size=0,
                embedding_tensor_parallel_size=0, mlp_tensor_parallel_size=0,
                flashcomm2_oproj_tensor_parallel_size=None, layer_sharding=False,
                dsa_cp_layer_shard=False, dynamic_eplb=False, multistream_overlap_gate=False,
                pd_tp_ratio=1, pd_head_ratio=1, num_head_replica=1, kv_producer=False)


# --------------------------------------------------------------------------------------------
# The engine's maths, restated on numpy arrays (the oracle)
# --------------------------------------------------------------------------------------------

def _rows(array: np.ndarray) -> list[list[int]]:
    return [[int(v) for v in row] for row in array]


def engine_reference_layouts(fields: dict, squeeze_single_otp_group: bool = True) -> dict[str, list[list[int]]]:
    """What the reference engine builds for these fields; raises where it would.

    ``squeeze_single_otp_group=False``: the engine's maths without its one bug that
    moe_ext fixes (the squeeze of a single flashcomm2 O-TP group under layer sharding).
    """
    f = SimpleNamespace(**{**DEFAULTS, **fields})
    world, tp, dp, pp, pcp = (f.world_size, f.tensor_parallel_size, f.data_parallel_size,
                              f.pipeline_parallel_size, f.prefill_context_parallel_size)
    instance_rows = np.arange(world).reshape(-1, dp * pcp * tp)  # ExternalDP x (DP*PCP*TP)
    grid = np.arange(world).reshape(-1, dp, pp, pcp, tp)          # ExternalDP x DP x PP x PCP x TP
    out: dict[str, list[list[int]]] = {"tp": _rows(np.arange(world).reshape(-1, tp))}

    if f.pd_head_ratio > 1 and f.kv_producer:
        decode_tp = tp // f.pd_tp_ratio
        if f.num_head_replica <= 1:
            groups = instance_rows.reshape(-1, f.pd_tp_ratio)
        else:
            heads = instance_rows.copy().reshape(dp * pcp, -1, f.num_head_replica)
            heads = heads.transpose(0, 2, 1)
            heads = heads.reshape(-1, heads.shape[-1])     # (rows * replicas, heads per replica)
            group_size = heads.shape[-1] // decode_tp
            if group_size == 0:
                raise ValueError("engine: zero-sized all-to-all group")
            groups = heads[..., None].reshape(dp * pcp, f.num_head_replica, -1, group_size)
            groups = groups.reshape(-1, group_size)
        out["p_tp"] = _rows(groups)

    out["mc2"] = _rows(instance_rows)
    if f.dynamic_eplb:
        out["dynamic_eplb"] = _rows(instance_rows)

    by_size: dict[int, list[list[int]]] = {}
    for name in FINEGRAINED:
        size = getattr(f, FINEGRAINED_FIELD[name])
        if size <= 0:
            continue
        if size not in by_size:
            stage_grid = np.arange(world).reshape(pp, dp, tp)
            by_size[size] = [stage_grid[stage, chunk * size:(chunk + 1) * size, tensor].tolist()
                             for stage in range(pp) for chunk in range(dp // size) for tensor in range(tp)]
        out[name] = by_size[size]

    fc2_otp_groups: list[list[int]] = []
    otp = f.flashcomm2_oproj_tensor_parallel_size
    if otp is not None:
        out["flashcomm2_odp"] = out["tp"]
        if otp > 1:
            per_tp = tp // otp
            odp_groups = []
            for data in range(dp):
                for stage in range(pp):
                    base = (data * pp + stage) * tp  # the engine ignores PCP and ExternalDP here
                    block = base + np.arange(otp * per_tp).reshape(otp, per_tp)
                    fc2_otp_groups += _rows(block.T)
                    odp_groups += _rows(block)
            out["flashcomm2_otp"] = fc2_otp_groups
            out["flashcomm2_odp"] = odp_groups

    def shard(module: Optional[np.ndarray]) -> list[list[int]]:
        stage_columns = np.swapaxes(grid, 2, 4).reshape(-1, pp)
        if module is None:
            return _rows(stage_columns.T)
        by_member = np.swapaxes(module, 0, 1)  # fails on a 1-D module, as the engine's does
        per_chunk = world // (pp * module.shape[1])
        stacked = np.stack([column.reshape(pp, per_chunk) for column in by_member], axis=1)
        return _rows(stacked.reshape(-1, per_chunk))

    if f.layer_sharding:
        if otp is not None:
            module = None
            if fc2_otp_groups:
                module = np.array(fc2_otp_groups)
                if module.shape[0] == 1 and squeeze_single_otp_group:  # the engine's squeeze(0)
                    module = module[0]
            out["shard_weight"] = shard(module)
        elif f.dsa_cp_layer_shard:
            out["shard_weight"] = shard(None)
        else:
            out["shard_weight"] = shard(grid.reshape(-1, tp))

    if f.multistream_overlap_gate:
        out["fc3_quant_x"] = _rows(instance_rows)
    return out


def layout_problem(fields: dict, layouts: dict[str, list[list[int]]]) -> Optional[str]:
    """Why these layouts are not sane for these fields, or None when they are."""
    f = SimpleNamespace(**{**DEFAULTS, **fields})
    world, tp, dp, pp, pcp = (f.world_size, f.tensor_parallel_size, f.data_parallel_size,
                              f.pipeline_parallel_size, f.prefill_context_parallel_size)
    shape = (world // (dp * pp * pcp * tp), dp, pp, pcp, tp)

    def coords(rank: int) -> tuple[int, ...]:
        return tuple(int(v) for v in np.unravel_index(rank, shape))  # (ext, dp, pp, pcp, tp)

    def same(group, key) -> bool:
        return len({key(coords(rank)) for rank in group}) == 1

    for name, groups in layouts.items():
        members = sorted(rank for group in groups for rank in group)
        if members != list(range(world)):
            return f"{name}: does not partition the world"
        if len({len(group) for group in groups}) != 1:
            return f"{name}: groups of unequal sizes"
        # Shard-weight groups may span external DP instances (all modes of the
        # engine do); every other group stays inside one instance.
        unit = (lambda c: c[2]) if name == "shard_weight" else (lambda c: (c[0], c[2]))
        if not all(same(group, unit) for group in groups):
            return f"{name}: a group mixes pipeline stages or model instances"
        tp_group = lambda c: (c[0], c[1], c[2], c[3])  # noqa: E731
        if name in FINEGRAINED and not all(same(group, lambda c: (c[3], c[4])) for group in groups):
            return f"{name}: a group mixes TP or PCP indices"
        if name in ("flashcomm2_otp", "flashcomm2_odp", "p_tp") and not all(
                same(group, tp_group) for group in groups):
            return f"{name}: a group leaves its TP group"
    if "p_tp" in layouts and tp % f.pd_tp_ratio != 0:
        # pd_tp_ratio is prefill TP / decode TP: the engine truncates tp // pd_tp_ratio.
        return "p_tp: the decode TP size tensor_parallel_size / pd_tp_ratio is not whole"
    if "p_tp" in layouts and f.num_head_replica > 1 and world // (dp * pcp) != tp:
        # The engine reads each of its DP*PCP rows as [num_head, num_head_replica] of one TP
        # group; rows holding more than one TP group mix stages or instances.
        return "p_tp: head-replica rows are not TP groups"
    return None


# --------------------------------------------------------------------------------------------
# 1. Hand-worked layouts
# --------------------------------------------------------------------------------------------

def test_sixteen_ranks_tp4_dp4_every_family():
    """The docs/parallel_state.md example: 16 ranks, TP 4, DP 4."""
    config = ParallelConfig(16, 4, 4, oproj_tensor_parallel_size=2, lmhead_tensor_parallel_size=4,
                            embedding_tensor_parallel_size=4, mlp_tensor_parallel_size=2,
                            flashcomm2_oproj_tensor_parallel_size=2, layer_sharding=True,
                            dynamic_eplb=True, multistream_overlap_gate=True,
                            pd_head_ratio=2, kv_producer=True, pd_tp_ratio=2)
    layouts = group_layouts(config)
    assert list(layouts) == ["tp", "p_tp", "mc2", "dynamic_eplb", "otp", "lmhead_tp", "embed_tp",
                             "mlp_tp", "flashcomm2_otp", "flashcomm2_odp", "shard_weight", "fc3_quant_x"]
    assert layouts["tp"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert layouts["mc2"] == [list(range(16))]
    assert layouts["dynamic_eplb"] == layouts["fc3_quant_x"] == layouts["mc2"]
    assert layouts["otp"] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert layouts["mlp_tp"] == layouts["otp"]
    assert layouts["lmhead_tp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert layouts["embed_tp"] == layouts["lmhead_tp"]
    assert layouts["flashcomm2_otp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11],
                                         [12, 14], [13, 15]]
    assert layouts["flashcomm2_odp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11],
                                         [12, 13], [14, 15]]
    # Built over the flashcomm2 O-TP groups: member 0 of every O-TP group, then member 1.
    assert layouts["shard_weight"] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert layouts["p_tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]


def test_sixteen_ranks_tp4_dp4_shard_weight_over_tp():
    layouts = group_layouts(ParallelConfig(16, 4, 4, layer_sharding=True))
    assert set(layouts) == {"tp", "mc2", "shard_weight"}
    assert layouts["shard_weight"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


def test_pipeline_stages_and_context_parallel():
    """8 ranks, TP 2, PCP 2, PP 2 (DP 1): rank = (stage * 2 + context) * 2 + tensor."""
    layouts = group_layouts(ParallelConfig(8, 2, 1, pipeline_parallel_size=2,
                                           prefill_context_parallel_size=2, layer_sharding=True))
    assert layouts["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layouts["mc2"] == [[0, 1, 2, 3], [4, 5, 6, 7]]            # one per stage
    assert layouts["shard_weight"] == [[0, 2], [1, 3], [4, 6], [5, 7]]  # same TP index, one stage


def test_replicated_shard_weight_keeps_the_engine_order():
    """DSA-CP: one group per stage ordered (DP, TP, PCP): not sorted when PCP and TP > 1."""
    layouts = group_layouts(ParallelConfig(8, 2, 1, prefill_context_parallel_size=2,
                                           pipeline_parallel_size=2, layer_sharding=True,
                                           dsa_cp_layer_shard=True))
    assert layouts["shard_weight"] == [[0, 2, 1, 3], [4, 6, 5, 7]]


def test_flashcomm2_oproj_tp_one_uses_tp_groups():
    config = ParallelConfig(8, 4, 2, flashcomm2_oproj_tensor_parallel_size=1, layer_sharding=True)
    layouts = group_layouts(config)
    assert "flashcomm2_otp" not in layouts
    assert layouts["flashcomm2_odp"] == layouts["tp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layouts["shard_weight"] == [list(range(8))]  # replicated: one group for the one stage


def test_layer_sharding_over_a_single_flashcomm2_oproj_tp_group():
    """Refused by the reference (a squeeze of its one O-TP group fails): here each O-TP shard is
    held by one rank, so the shard-weight groups are singletons (moe_ext.parallel runs the op on it)."""
    for world in (2, 4, 8):
        layouts = group_layouts(ParallelConfig(world, world, 1, flashcomm2_oproj_tensor_parallel_size=world,
                                               layer_sharding=True))
        assert layouts["flashcomm2_otp"] == [list(range(world))]
        assert layouts["flashcomm2_odp"] == [[rank] for rank in range(world)]
        assert layouts["shard_weight"] == [[rank] for rank in range(world)]


def test_flashcomm2_oproj_tp_strides_inside_tp_group():
    layouts = group_layouts(ParallelConfig(8, 8, 1, flashcomm2_oproj_tensor_parallel_size=4))
    assert layouts["flashcomm2_otp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layouts["flashcomm2_odp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_prefill_tp_head_replicas():
    """TP 8, 2 head replicas, pd_tp_ratio 4: decode TP 2, replica k holds ranks k, k+2, ...;
    all-to-all groups of (8 / 2) // 2 = 2."""
    config = ParallelConfig(16, 8, 2, pd_head_ratio=2, kv_producer=True, pd_tp_ratio=4,
                            num_head_replica=2)
    assert group_layouts(config)["p_tp"] == [[0, 2], [4, 6], [1, 3], [5, 7],
                                             [8, 10], [12, 14], [9, 11], [13, 15]]
    # Without replicas: consecutive blocks of pd_tp_ratio.
    config = ParallelConfig(16, 8, 2, pd_head_ratio=2, kv_producer=True, pd_tp_ratio=4)
    assert group_layouts(config)["p_tp"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                             [12, 13, 14, 15]]
    # pd_head_ratio > 1 alone (not a KV producer) builds nothing.
    assert "p_tp" not in group_layouts(ParallelConfig(16, 8, 2, pd_head_ratio=2, pd_tp_ratio=4))


def test_external_data_parallel():
    """16 ranks as 2 independent instances of TP 2 x DP 4."""
    config = ParallelConfig(16, 2, 4, dynamic_eplb=True)
    assert config.external_data_parallel_size == 2
    layouts = group_layouts(config)
    assert layouts["mc2"] == [list(range(8)), list(range(8, 16))]
    assert layouts["dynamic_eplb"] == layouts["mc2"]


def test_single_rank():
    layouts = group_layouts(ParallelConfig(1, 1, 1, layer_sharding=True, mlp_tensor_parallel_size=1))
    assert layouts == {"tp": [[0]], "mc2": [[0]], "mlp_tp": [[0]], "shard_weight": [[0]]}


def test_group_layouts_needs_no_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert group_layouts(ParallelConfig(4, 2, 2))["tp"] == [[0, 1], [2, 3]]


# --------------------------------------------------------------------------------------------
# 2. The grid, against the engine's maths
# --------------------------------------------------------------------------------------------

def _grid() -> list[dict]:
    """Config fields up to 64 ranks: every base shape with each option family swept."""
    cases = []
    for tp, dp, pp, pcp, external in itertools.product((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4),
                                                       (1, 2), (1, 2)):
        world = tp * dp * pp * pcp * external
        if world > 64:
            continue
        base = dict(world_size=world, tensor_parallel_size=tp, data_parallel_size=dp,
                    pipeline_parallel_size=pp, prefill_context_parallel_size=pcp)
        cases.append(dict(base, dynamic_eplb=True, multistream_overlap_gate=True))
        for size in (1, 2, 3, 4, 8):
            cases.append(dict(base, oproj_tensor_parallel_size=size))
        cases.append(dict(base, oproj_tensor_parallel_size=2, lmhead_tensor_parallel_size=4,
                          embedding_tensor_parallel_size=2, mlp_tensor_parallel_size=1))
        for otp, sharding in itertools.product((None, 1, 2, 3, 4, 8), (False, True)):
            cases.append(dict(base, flashcomm2_oproj_tensor_parallel_size=otp, layer_sharding=sharding))
        cases.append(dict(base, layer_sharding=True, dsa_cp_layer_shard=True))
        for ratio, replicas in itertools.product((1, 2, 3, 4, 8), (1, 2, 4)):
            cases.append(dict(base, pd_head_ratio=2, kv_producer=True, pd_tp_ratio=ratio,
                              num_head_replica=replicas))
    # World sizes that are not a multiple of the model size.
    cases += [dict(world_size=6, tensor_parallel_size=4, data_parallel_size=1),
              dict(world_size=12, tensor_parallel_size=2, data_parallel_size=4)]
    return cases


def _single_flashcomm2_otp_group_sharded(fields: dict) -> bool:
    otp = fields.get("flashcomm2_oproj_tensor_parallel_size")
    return bool(fields.get("layer_sharding")) and otp is not None and otp > 1 and fields["world_size"] == otp


def test_grid_matches_engine_and_rejects_exactly_the_broken_configs():
    accepted = rejected = 0
    for fields in _grid():
        try:
            reference = engine_reference_layouts(fields)
            engine_problem = layout_problem(fields, reference)
        except (ValueError, IndexError, ZeroDivisionError, AssertionError) as error:
            reference, engine_problem = None, f"engine fails: {error}"
            if _single_flashcomm2_otp_group_sharded(fields):  # moe_ext does better: no squeeze
                reference = engine_reference_layouts(fields, squeeze_single_otp_group=False)
                engine_problem = layout_problem(fields, reference)
                assert engine_problem is None, (fields, engine_problem)
        try:
            config = ParallelConfig(**fields)
        except ValueError as error:
            rejected += 1
            assert engine_problem is not None, f"refused a config the engine handles: {fields}: {error}"
            continue
        accepted += 1
        assert engine_problem is None, f"accepted a config the engine breaks on: {fields}: {engine_problem}"
        assert group_layouts(config) == reference, fields
    # The grid must exercise both sides.
    assert accepted > 800 and rejected > 800, (accepted, rejected)


def test_grid_invariants_and_sizes():
    """Sizes per family, and the fine-grained cache: equal sizes, equal layouts."""
    checked = set()
    for fields in _grid():
        try:
            config = ParallelConfig(**fields)
        except ValueError:
            continue
        layouts = group_layouts(config)
        assert layout_problem(fields, layouts) is None
        assert set(layouts) <= set(FAMILIES)
        tp, dp, pcp = (config.tensor_parallel_size, config.data_parallel_size,
                       config.prefill_context_parallel_size)
        expected_sizes = {"tp": tp, "mc2": dp * pcp * tp, "dynamic_eplb": dp * pcp * tp,
                          "fc3_quant_x": dp * pcp * tp}
        expected_sizes.update(config.finegrained_tp_sizes)
        otp = config.flashcomm2_oproj_tensor_parallel_size
        if otp is not None:
            expected_sizes["flashcomm2_odp"] = tp // otp
            if otp > 1:
                expected_sizes["flashcomm2_otp"] = otp
        world, pp = config.world_size, config.pipeline_parallel_size
        mode = config.shard_weight_mode
        if mode is not None:
            expected_sizes["shard_weight"] = {"tp": world // (pp * tp), "replicated": world // pp,
                                              "flashcomm2": world // (pp * (otp or 1))}[mode]
        for name, groups in layouts.items():
            if name == "p_tp":
                continue
            assert {len(group) for group in groups} == {expected_sizes[name]}, (name, fields)
            checked.add(name)
        sizes = config.finegrained_tp_sizes
        for first, second in itertools.combinations(sizes, 2):
            if sizes[first] == sizes[second]:
                assert layouts[first] == layouts[second]
    assert checked == set(FAMILIES) - {"p_tp"}


# --------------------------------------------------------------------------------------------
# 3. Clear errors
# --------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(world_size=0, tensor_parallel_size=1, data_parallel_size=1), ["world_size=0"]),
    (dict(world_size=8, tensor_parallel_size=0, data_parallel_size=1), ["tensor_parallel_size=0"]),
    (dict(world_size=8, tensor_parallel_size=2.0, data_parallel_size=1), ["tensor_parallel_size=2.0"]),
    (dict(world_size=8, tensor_parallel_size=True, data_parallel_size=1), ["tensor_parallel_size=True"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=1, layer_sharding=1),
     ["layer_sharding=1"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=4, mlp_tensor_parallel_size=-1),
     ["mlp_tensor_parallel_size=-1"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=4,
          flashcomm2_oproj_tensor_parallel_size=0), ["flashcomm2_oproj_tensor_parallel_size=0"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=1, num_head_replica=0),
     ["num_head_replica=0"]),
    (dict(world_size=12, tensor_parallel_size=8, data_parallel_size=1),
     ["world_size=12", "tensor_parallel_size=8"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=2, pipeline_parallel_size=2),
     ["pipeline_parallel_size=2", "data_parallel_size=2"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=4, oproj_tensor_parallel_size=3),
     ["oproj_tensor_parallel_size=3", "data_parallel_size=4"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=2, prefill_context_parallel_size=2,
          lmhead_tensor_parallel_size=2), ["lmhead_tensor_parallel_size=2",
                                           "prefill_context_parallel_size=2"]),
    (dict(world_size=16, tensor_parallel_size=2, data_parallel_size=4, embedding_tensor_parallel_size=2),
     ["embedding_tensor_parallel_size=2", "world_size=16"]),
    (dict(world_size=8, tensor_parallel_size=4, data_parallel_size=2,
          flashcomm2_oproj_tensor_parallel_size=3), ["flashcomm2_oproj_tensor_parallel_size=3",
                                                     "tensor_parallel_size=4"]),
    (dict(world_size=16, tensor_parallel_size=4, data_parallel_size=2,
          flashcomm2_oproj_tensor_parallel_size=2), ["flashcomm2_oproj_tensor_parallel_size=2",
                                                     "world_size=16"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=1, pipeline_parallel_size=2,
          layer_sharding=True), ["layer_sharding=True", "pipeline_parallel_size=2", "world_size=8"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=4, dsa_cp_layer_shard=True),
     ["dsa_cp_layer_shard=True", "layer_sharding=False"]),
    (dict(world_size=8, tensor_parallel_size=2, data_parallel_size=4, pd_head_ratio=2,
          kv_producer=True, pd_tp_ratio=4), ["pd_tp_ratio=4", "tensor_parallel_size=2"]),
    (dict(world_size=8, tensor_parallel_size=4, data_parallel_size=1, pipeline_parallel_size=2,
          pd_head_ratio=2, kv_producer=True, pd_tp_ratio=2, num_head_replica=2),
     ["num_head_replica=2", "pipeline_parallel_size=2"]),
    (dict(world_size=8, tensor_parallel_size=8, data_parallel_size=1, pd_head_ratio=2,
          kv_producer=True, pd_tp_ratio=2, num_head_replica=3), ["num_head_replica=3"]),
    (dict(world_size=8, tensor_parallel_size=8, data_parallel_size=1, pd_head_ratio=2,
          kv_producer=True, pd_tp_ratio=2, num_head_replica=4),
     ["num_head_replica=4", "pd_tp_ratio=2"]),
]


@pytest.mark.parametrize("fields, mentioned", BAD_CONFIGS)
def test_bad_configs_raise_naming_fields(fields, mentioned):
    with pytest.raises(ValueError, match="ParallelConfig") as caught:
        ParallelConfig(**fields)
    for text in mentioned:
        assert text in str(caught.value), (text, str(caught.value))


def test_config_is_immutable_and_group_layouts_checks_its_argument():
    config = ParallelConfig(4, 2, 2)
    with pytest.raises(AttributeError):
        config.tensor_parallel_size = 4  # frozen: a validated config stays valid
    with pytest.raises(ValueError, match="ParallelConfig"):
        group_layouts({"world_size": 4})


def test_docs_rank_table_matches_group_layouts():
    """docs/parallel_state.md's 16-rank table is what group_layouts builds."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "parallel_state.md").read_text()
    table = text.split("<!-- layout-table")[1].split("<!-- end layout-table")[0]
    rows = [[cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
            for line in table.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header, body = rows[0], rows[1:]
    config = ParallelConfig(16, 4, 4, oproj_tensor_parallel_size=2, lmhead_tensor_parallel_size=4,
                            flashcomm2_oproj_tensor_parallel_size=2, layer_sharding=True,
                            dynamic_eplb=True, pd_head_ratio=2, kv_producer=True, pd_tp_ratio=2)
    layouts = group_layouts(config)
    assert header[3:] == list(layouts) and len(body) == 16
    for row in body:
        rank = int(row[0])
        assert (int(row[1]), int(row[2])) == (rank // 4, rank % 4)
        for name, cell in zip(header[3:], row[3:]):
            group_index, rank_in_group = (int(part) for part in cell.split("."))
            assert layouts[name][group_index][rank_in_group] == rank, (name, rank)
