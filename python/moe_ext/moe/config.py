"""Static description of one expert-parallel MoE layer: sizes, ranks and groups.

The rank layout follows the inference-engine convention: the world is
``dp_size x tp_size`` ranks, rank ``dp_rank * tp_size + tp_rank``; ranks of one
TP group hold the same tokens, ranks of one DP group hold different tokens,
and the experts are spread over all ``ep_size = dp_size * tp_size`` ranks
(expert parallelism over the flattened DP x TP ranks; expert weights are never
sharded inside an expert).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["CommGroup", "MoEConfig", "make_moe_groups"]


class CommGroup:
    """A process group with its size and this rank's position in it.

    Accepts a ``torch.distributed`` ProcessGroup, a ``moe_ext.distributed``
    ParallelGroup (anything with ``.device_group``), or None for a group of
    one (no communication).
    """

    def __init__(self, group: Any = None):
        self.source = group
        if group is None:
            self.process_group = None
            self.world_size = 1
            self.rank_in_group = 0
        else:
            self.process_group = getattr(group, "device_group", group)
            self.world_size = dist.get_world_size(self.process_group)
            self.rank_in_group = dist.get_rank(self.process_group)

    def __repr__(self) -> str:
        return f"CommGroup(world_size={self.world_size}, rank_in_group={self.rank_in_group})"


def _as_group(group: Any) -> CommGroup:
    return group if isinstance(group, CommGroup) else CommGroup(group)


@dataclass
class MoEConfig:
    """Sizes, dtypes, ranks and groups of an expert-parallel MoE layer.

    ``num_experts`` counts logical experts; ``num_physical_experts`` the expert
    slots (logical experts plus redundant replicas), spread evenly and
    contiguously: slot ``s`` lives on EP rank ``s // num_local_experts``.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int = 0
    dtype: torch.dtype = torch.float32
    router_dtype: torch.dtype = torch.float32
    num_physical_experts: Optional[int] = None
    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    ep_group: Any = None
    dp_group: Any = None
    tp_group: Any = None
    mc2_group: Any = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "dp_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig: {name} must be a positive int, got {value!r}")
        if self.num_physical_experts is None:
            self.num_physical_experts = self.num_experts
        if self.num_physical_experts < self.num_experts:
            raise ValueError(f"MoEConfig: num_physical_experts must be >= num_experts "
                             f"({self.num_experts}), got {self.num_physical_experts}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig: top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"MoEConfig: dp_rank must be in [0, {self.dp_size}), got {self.dp_rank}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"MoEConfig: tp_rank must be in [0, {self.tp_size}), got {self.tp_rank}")
        self.ep_group = _as_group(self.ep_group)
        self.dp_group = _as_group(self.dp_group)
        self.tp_group = _as_group(self.tp_group)
        self.mc2_group = _as_group(self.mc2_group) if self.mc2_group is not None else self.ep_group
        for name, group, size in (("ep_group", self.ep_group, self.ep_size), ("dp_group", self.dp_group, self.dp_size),
                                  ("tp_group", self.tp_group, self.tp_size)):
            if group.world_size != size:
                raise ValueError(f"MoEConfig: {name} must have {size} ranks, got {group.world_size}")
        if self.ep_group.rank_in_group != self.ep_rank:
            raise ValueError(f"MoEConfig: this rank must be EP rank dp_rank * tp_size + tp_rank = {self.ep_rank}, "
                             f"ep_group says {self.ep_group.rank_in_group}")
        if self.num_physical_experts % self.ep_size:
            raise ValueError(f"MoEConfig: num_physical_experts must be a multiple of ep_size ({self.ep_size}), "
                             f"got {self.num_physical_experts}")

    @property
    def ep_size(self) -> int:
        return self.dp_size * self.tp_size

    @property
    def ep_rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank

    @property
    def num_local_experts(self) -> int:
        """Expert slots held by each EP rank."""
        return self.num_physical_experts // self.ep_size

    @property
    def local_expert_range(self) -> tuple[int, int]:
        """[first, last) physical slots held by this rank."""
        first = self.ep_rank * self.num_local_experts
        return first, first + self.num_local_experts


def make_moe_groups(dp_size: int, tp_size: int, *, timeout: Any = None) -> dict[str, Any]:
    """Create the EP, DP and TP groups of the ``dp_size x tp_size`` layout on the default world.

    Every rank must call this (``new_group`` is collective). The groups take
    ``timeout`` (a ``datetime.timedelta``), by default the world's
    (``moe_ext.distributed.world_timeout``). Returns the keyword
    arguments of :class:`MoEConfig` that describe this rank: dp/tp sizes and
    ranks and the three groups.
    """
    world_size = dist.get_world_size()
    if dp_size * tp_size != world_size:
        raise ValueError(f"make_moe_groups: dp_size * tp_size must equal the world size {world_size}, "
                         f"got {dp_size} * {tp_size}")
    from moe_ext.distributed.state import world_timeout
    timeout = timeout if timeout is not None else world_timeout()
    rank = dist.get_rank()
    dp_rank, tp_rank = divmod(rank, tp_size)
    tp_group = dp_group = None
    for d in range(dp_size):
        group = dist.new_group([d * tp_size + t for t in range(tp_size)], timeout=timeout)
        if d == dp_rank:
            tp_group = group
    for t in range(tp_size):
        group = dist.new_group([d * tp_size + t for d in range(dp_size)], timeout=timeout)
        if t == tp_rank:
            dp_group = group
    return dict(dp_size=dp_size, dp_rank=dp_rank, tp_size=tp_size, tp_rank=tp_rank,
                ep_group=dist.group.WORLD, dp_group=dp_group, tp_group=tp_group)
