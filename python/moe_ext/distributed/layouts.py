"""Group layouts: which ranks form each process group, as pure functions of a config.

``group_layouts(config)`` returns, for every family the config turns on, the
rank lists of all of its groups, in the order the reference engine creates
them and with each group's ranks in the engine's order (that order is the
group-local rank order). Nothing here needs torch or ``torch.distributed``.

The world is ``ExternalDP x DP x PP x PCP x TP`` with TP fastest (see
:mod:`moe_ext.distributed.config`). The families:

==================  ==========================================================
``tp``              consecutive blocks of TP ranks
``mc2``             consecutive blocks of DP * PCP * TP ranks: the expert-
                    parallel group of one model instance (and stage when DP = 1)
``dynamic_eplb``    same ranks as ``mc2``; its own communicator
``fc3_quant_x``     same ranks as ``mc2``; its own communicator
``otp``,            fine-grained TP of size s, built across DP: for each stage
``lmhead_tp``,      and each TP index, the DP replicas cut into blocks of s.
``embed_tp``,       Families of equal size have the same layout (the engine
``mlp_tp``          builds one group per size and shares it)
``flashcomm2_otp``  inside each TP group, O-TP groups of stride TP / O-TP
                    (only when O-TP > 1)
``flashcomm2_odp``  inside each TP group, blocks of TP / O-TP ranks with the
                    same O-TP index; the TP groups when O-TP == 1
``shard_weight``    ranks of one stage holding the same module-TP shard
``p_tp``            prefill all-to-all groups of disaggregated prefill
==================  ==========================================================

Outside the families (so ``group_layouts`` stays the engine-family map) is the
data-parallel group of the serving engines, :func:`dp_layout`: the ranks that
differ only in their DP index (vLLM's ``get_dp_group()``).
"""

from __future__ import annotations

from moe_ext.distributed.config import ParallelConfig

__all__ = [
    "FAMILIES",
    "group_layouts",
    "tp_layout",
    "dp_layout",
    "mc2_layout",
    "finegrained_tp_layout",
    "flashcomm2_layouts",
    "shard_weight_layout",
    "prefill_tp_layout",
]

Layout = list[list[int]]

# Every family name, in the order groups are created (the same on every rank).
FAMILIES: tuple[str, ...] = (
    "tp", "p_tp", "mc2", "dynamic_eplb", "otp", "lmhead_tp", "embed_tp", "mlp_tp",
    "flashcomm2_otp", "flashcomm2_odp", "shard_weight", "fc3_quant_x",
)


def _blocks(world_size: int, block_size: int) -> Layout:
    return [list(range(start, start + block_size)) for start in range(0, world_size, block_size)]


def _rank(config: ParallelConfig, external: int, data: int, stage: int, context: int,
          tensor: int) -> int:
    """Global rank of a coordinate of the ExternalDP x DP x PP x PCP x TP grid."""
    c = config
    return ((((external * c.data_parallel_size + data) * c.pipeline_parallel_size + stage)
             * c.prefill_context_parallel_size + context) * c.tensor_parallel_size + tensor)


def tp_layout(config: ParallelConfig) -> Layout:
    """Tensor-parallel groups: consecutive blocks of ``tensor_parallel_size`` ranks."""
    return _blocks(config.world_size, config.tensor_parallel_size)


def dp_layout(config: ParallelConfig) -> Layout:
    """Data-parallel groups: the ``data_parallel_size`` ranks that share every other coordinate.

    Group of (external, tensor, stage, context) holds ``rank(external, d,
    stage, context, tensor)`` for ``d = 0 .. DP-1``, in DP order; groups are
    ordered external, TP index, stage, context index. This is vLLM's DP
    group (``get_dp_group()``: the rank grid with the DP and TP axes swapped,
    cut into rows of DP), built even when DP is 1 (groups of one rank), as
    there. The MoE layer's ``MoEConfig.dp_group`` is this group (with PCP 1,
    the ranks of one EP group with this rank's TP index).
    """
    c = config
    return [[_rank(c, external, data, stage, context, tensor) for data in range(c.data_parallel_size)]
            for external in range(c.external_data_parallel_size)
            for tensor in range(c.tensor_parallel_size)
            for stage in range(c.pipeline_parallel_size)
            for context in range(c.prefill_context_parallel_size)]


def mc2_layout(config: ParallelConfig) -> Layout:
    """MC2 / expert-parallel groups: consecutive blocks of DP * PCP * TP ranks.

    Also the layout of ``dynamic_eplb`` and ``fc3_quant_x``.
    """
    c = config
    return _blocks(c.world_size,
                   c.data_parallel_size * c.prefill_context_parallel_size * c.tensor_parallel_size)


def finegrained_tp_layout(config: ParallelConfig, group_size: int) -> Layout:
    """Fine-grained TP groups of ``group_size`` ranks, built across the DP dimension.

    The world is read as a (PP, DP, TP) grid; for each stage, each block of
    ``group_size`` DP replicas and each TP index, one group of the ranks with
    that TP index in those replicas. Ordered stage, block, TP index.
    """
    c = config
    if group_size < 1 or c.data_parallel_size % group_size != 0:
        raise ValueError("finegrained_tp_layout: group_size must be >= 1 and divide "
                         f"data_parallel_size={c.data_parallel_size}, got {group_size}")
    tp, dp = c.tensor_parallel_size, c.data_parallel_size
    layout: Layout = []
    for stage in range(c.pipeline_parallel_size):
        for block in range(dp // group_size):
            for tensor in range(tp):
                layout.append([(stage * dp + data) * tp + tensor
                               for data in range(block * group_size, (block + 1) * group_size)])
    return layout


def flashcomm2_layouts(config: ParallelConfig) -> tuple[Layout, Layout]:
    """(O-TP groups, O-DP groups) of flashcomm2; O-TP is empty when its size is 1.

    With O-TP size o > 1 and n = TP / o, inside the TP group whose first rank
    is b: O-TP group i is ``b + i, b + i + n, ..., b + i + (o-1) n`` and O-DP
    group j is ``b + j n, ..., b + j n + n - 1``. TP groups are taken in
    (DP, PP) order. With o == 1 the O-DP groups are the TP groups.
    """
    c = config
    otp = c.flashcomm2_oproj_tensor_parallel_size
    if otp is None:
        raise ValueError("flashcomm2_layouts: flashcomm2 is off "
                         "(flashcomm2_oproj_tensor_parallel_size=None)")
    if otp == 1:
        return [], tp_layout(c)
    tp = c.tensor_parallel_size
    groups_per_tp = tp // otp
    otp_layout: Layout = []
    odp_layout: Layout = []
    for data in range(c.data_parallel_size):
        for stage in range(c.pipeline_parallel_size):
            base = (data * c.pipeline_parallel_size + stage) * tp
            for i in range(groups_per_tp):
                otp_layout.append([base + i + j * groups_per_tp for j in range(otp)])
            for j in range(otp):
                odp_layout.append([base + j * groups_per_tp + i for i in range(groups_per_tp)])
    return otp_layout, odp_layout


def _replicated_shard_weight_layout(config: ParallelConfig) -> Layout:
    """One group per pipeline stage, ranks ordered (ExternalDP, DP, TP, PCP).

    Note the order: TP before PCP, so with PCP > 1 and TP > 1 the list is not
    sorted; it is kept as the engine orders it (it fixes rank_in_group).
    """
    c = config
    return [[_rank(c, external, data, stage, context, tensor)
             for external in range(c.external_data_parallel_size)
             for data in range(c.data_parallel_size)
             for tensor in range(c.tensor_parallel_size)
             for context in range(c.prefill_context_parallel_size)]
            for stage in range(c.pipeline_parallel_size)]


def _module_shard_weight_layout(config: ParallelConfig, module_layout: Layout) -> Layout:
    """Combine a module's TP groups into shard-weight groups.

    The module groups (all of size m) are cut into PP consecutive chunks of G;
    within chunk p, group j holds the j-th member of each of the chunk's module
    groups. Ordered chunk, j.
    """
    m = len(module_layout[0])
    per_chunk = config.world_size // (config.pipeline_parallel_size * m)
    return [[module_layout[chunk * per_chunk + g][j] for g in range(per_chunk)]
            for chunk in range(config.pipeline_parallel_size)
            for j in range(m)]


def shard_weight_layout(config: ParallelConfig) -> Layout:
    """Shard-weight groups (``layer_sharding``).

    - flashcomm2 with O-TP > 1: built over the flashcomm2 O-TP groups;
    - flashcomm2 with O-TP 1, or ``dsa_cp_layer_shard``: replicated layers, one
      group per pipeline stage;
    - otherwise: built over the TP groups (ranks with the same TP index in one
      stage).
    """
    mode = config.shard_weight_mode
    if mode is None:
        raise ValueError("shard_weight_layout: layer_sharding is off (layer_sharding=False)")
    if mode == "replicated":
        return _replicated_shard_weight_layout(config)
    if mode == "flashcomm2":
        return _module_shard_weight_layout(config, flashcomm2_layouts(config)[0])
    return _module_shard_weight_layout(config, tp_layout(config))


def prefill_tp_layout(config: ParallelConfig) -> Layout:
    """Prefill all-to-all groups of disaggregated prefill (``p_tp``).

    With ``num_head_replica == 1``: consecutive blocks of ``pd_tp_ratio`` ranks.
    With r > 1 replicas, inside each TP group (first rank b, size T): replica k
    holds ranks ``b + k, b + k + r, ...`` (T / r of them), cut into consecutive
    all-to-all groups of (T / r) // (T / pd_tp_ratio) ranks. Ordered TP group,
    replica, group.
    """
    c = config
    if not c.prefill_tp_enabled:
        raise ValueError("prefill_tp_layout: the prefill TP group is off (needs pd_head_ratio > 1 "
                         f"and kv_producer; got pd_head_ratio={c.pd_head_ratio}, "
                         f"kv_producer={c.kv_producer})")
    if c.num_head_replica == 1:
        return _blocks(c.world_size, c.pd_tp_ratio)
    tp, replicas = c.tensor_parallel_size, c.num_head_replica
    heads_per_replica = tp // replicas
    group_size = heads_per_replica // (tp // c.pd_tp_ratio)
    layout: Layout = []
    for base in range(0, c.world_size, tp):
        for replica in range(replicas):
            heads = [base + head * replicas + replica for head in range(heads_per_replica)]
            layout.extend(heads[start:start + group_size]
                          for start in range(0, heads_per_replica, group_size))
    return layout


def group_layouts(config: ParallelConfig) -> dict[str, Layout]:
    """Rank lists of every group of every family ``config`` turns on.

    Keys appear in :data:`FAMILIES` order (the creation order). ``tp`` and
    ``mc2`` are always present; a fine-grained family is present when its size
    is > 0; ``flashcomm2_otp`` only with an O-TP size > 1. Pure Python: no
    torch, no process group.
    """
    if not isinstance(config, ParallelConfig):
        raise ValueError(f"group_layouts: config must be a ParallelConfig, got {type(config).__name__}")
    layouts: dict[str, Layout] = {"tp": tp_layout(config)}
    if config.prefill_tp_enabled:
        layouts["p_tp"] = prefill_tp_layout(config)
    layouts["mc2"] = mc2_layout(config)
    if config.dynamic_eplb:
        layouts["dynamic_eplb"] = mc2_layout(config)
    for name, size in config.finegrained_tp_sizes.items():
        layouts[name] = finegrained_tp_layout(config, size)
    if config.flashcomm2_enabled:
        otp_layout, odp_layout = flashcomm2_layouts(config)
        if otp_layout:
            layouts["flashcomm2_otp"] = otp_layout
        layouts["flashcomm2_odp"] = odp_layout
    if config.layer_sharding:
        layouts["shard_weight"] = shard_weight_layout(config)
    if config.multistream_overlap_gate:
        layouts["fc3_quant_x"] = mc2_layout(config)
    return layouts
