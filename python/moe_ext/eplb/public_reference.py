"""DeepSeek's public greedy EPLB algorithm, rewritten from its published description.

This is the baseline moe_ext's planner is measured against (bench/bench_eplb.py)
and compared with in tests. It is not used for planning. The public package is
not installable from a registry, so this is our own implementation of the
algorithm as described:

1. Replication: every logical expert gets one replica; each further physical
   slot goes to the expert with the largest load per replica.
2. Packing: items are packed largest-first, each into the lightest pack that
   still has room, every pack receiving the same number of items.
3. Hierarchical mode (num_groups % num_nodes == 0): expert groups are packed
   onto nodes (2.), each node replicates its own experts into its own slots
   (1.), and each node's replicas are packed onto its GPUs (2.).
   Global mode (otherwise): the same with one group and one node.

The loops are plain Python over torch tensors, as in the original, so its
running time is representative of what engines pay today.
"""

from __future__ import annotations

import torch

__all__ = ["public_rebalance_experts"]


def _pack_largest_first(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the items of each row [rows, items] into num_packs equal-count packs.

    Returns (pack_of_item, position_in_pack), both [rows, items] int64.
    """
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        order = torch.arange(items, dtype=torch.int64).expand(rows, items).clone()
        return order, torch.zeros_like(order)
    pack_of_item = torch.full((rows, items), -1, dtype=torch.int64)
    position = torch.full((rows, items), -1, dtype=torch.int64)
    order = weight.float().sort(dim=-1, descending=True).indices
    for row in range(rows):
        pack_load = [0.0] * num_packs
        pack_fill = [0] * num_packs
        for item in order[row].tolist():
            open_packs = [p for p in range(num_packs) if pack_fill[p] < per_pack]
            target = min(open_packs, key=pack_load.__getitem__)
            pack_of_item[row, item] = target
            position[row, item] = pack_fill[target]
            pack_load[target] += float(weight[row, item])
            pack_fill[target] += 1
    return pack_of_item, position


def _replicate(weight: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy replication of [rows, experts] into num_slots replicas.

    Returns (slot_expert [rows, slots], replica_rank [rows, slots], count [rows, experts]).
    """
    rows, experts = weight.shape
    slot_expert = torch.arange(num_slots, dtype=torch.int64).repeat(rows, 1)
    replica_rank = torch.zeros(rows, num_slots, dtype=torch.int64)
    count = torch.ones(rows, experts, dtype=torch.int64)
    row_index = torch.arange(rows)
    for slot in range(experts, num_slots):
        chosen = (weight / count).max(dim=-1).indices
        slot_expert[:, slot] = chosen
        replica_rank[:, slot] = count[row_index, chosen]
        count[row_index, chosen] += 1
    return slot_expert, replica_rank, count


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(permutation)
    inverse.scatter_(1, permutation, torch.arange(permutation.size(1), dtype=torch.int64).expand_as(permutation))
    return inverse


def _hierarchical(weight: torch.Tensor, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int):
    layers, experts = weight.shape
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_slots // num_gpus
    experts_per_node = experts // num_nodes

    # 1. groups onto nodes; "node-major" expert order (mlog) puts each node's experts together.
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    node_of_group, position_of_group = _pack_largest_first(group_load, num_nodes)
    log_to_mlog = (((node_of_group * groups_per_node + position_of_group) * group_size).unsqueeze(-1)
                   + torch.arange(group_size, dtype=torch.int64)).flatten(-2)
    mlog_to_log = _inverse(log_to_mlog)

    # 2. each node replicates its own experts into its own slots.
    node_expert_load = weight.gather(-1, mlog_to_log).view(-1, experts_per_node)
    slot_to_mlog, slot_rank, mlog_count = _replicate(node_expert_load, num_slots // num_nodes)

    # 3. each node's replicas onto its GPUs.
    replica_load = (node_expert_load / mlog_count).gather(-1, slot_to_mlog)
    gpu_of_slot, position_in_gpu = _pack_largest_first(replica_load, num_gpus // num_nodes)
    slot_to_physical = gpu_of_slot * slots_per_gpu + position_in_gpu
    physical_to_slot = _inverse(slot_to_physical)
    physical_to_mlog = slot_to_mlog.gather(-1, physical_to_slot)
    node_offset = torch.arange(0, experts, experts_per_node, dtype=torch.int64).view(1, -1, 1)
    physical_to_mlog = (physical_to_mlog.view(layers, num_nodes, -1) + node_offset).flatten(-2)
    phy2log = mlog_to_log.gather(-1, physical_to_mlog)
    phy_rank = slot_rank.gather(-1, physical_to_slot).view(layers, -1)
    logcnt = mlog_count.view(layers, -1).gather(-1, log_to_mlog)
    return phy2log, phy_rank, logcnt


def public_rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                             num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The public algorithm: (phy2log, log2phy, logcnt), same contract as moe_ext.eplb.rebalance_experts."""
    layers, experts = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, phy_rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phy_rank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_replicas = num_replicas - experts + 1
    log2phy = torch.full((layers, experts * max_replicas), -1, dtype=torch.int64)
    log2phy.scatter_(-1, phy2log * max_replicas + phy_rank,
                     torch.arange(num_replicas, dtype=torch.int64).expand(layers, -1).contiguous())
    return phy2log, log2phy.view(layers, experts, max_replicas), logcnt
