"""ParallelGroup: one process group of a family, with the collectives the layers use.

Conventions (the same as inference engines' group coordinators, so layers
port over unchanged):

- ``all_gather(x, dim)`` concatenates every member's ``x`` along ``dim`` in
  group-rank order;
- ``reduce_scatter(x, dim)`` sums ``x`` over the members and returns this
  rank's slice along ``dim`` (``x.size(dim)`` must divide evenly);
- ``all_reduce(x)`` sums over the members; it may reuse ``x``'s storage
  (treat ``x`` as consumed and use the return value);
- a group of one member returns its input unchanged, with no communication.

Group-rank order is the order of ``ranks``, which is the order
:func:`moe_ext.distributed.group_layouts` gives (groups are created with
``sort_ranks=False``), so ``rank_in_group`` always indexes ``ranks``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from moe_ext.distributed.health import check_group_usable

__all__ = ["ParallelGroup"]

# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ParallelGroup:
    """The group of one family that this rank belongs to.

    Attributes:
        name: family name (``"mc2"``, ``"tp"``, ...).
        ranks: global ranks of the members, in group-rank order.
        rank: this process's global rank.
        rank_in_group: this process's index in ``ranks``.
        world_size: number of members.
        device_group: the process group on the run's backend (gloo, nccl, hccl).
        cpu_group: a gloo group with the same members, for CPU-side
            coordination; the device group itself when that is gloo.
    """

    def __init__(self, name: str, ranks: Sequence[int], device_group: dist.ProcessGroup,
                 cpu_group: Optional[dist.ProcessGroup] = None) -> None:
        self.name = name
        self.ranks: tuple[int, ...] = tuple(int(r) for r in ranks)
        self.rank = dist.get_rank()
        if self.rank not in self.ranks:
            raise ValueError(f"ParallelGroup {name!r}: rank {self.rank} is not a member of {list(self.ranks)}")
        self.rank_in_group = self.ranks.index(self.rank)
        self.world_size = len(self.ranks)
        self.device_group = device_group
        self.cpu_group = cpu_group if cpu_group is not None else device_group
        self.backend = str(dist.get_backend(device_group))

    def __repr__(self) -> str:
        return (f"ParallelGroup(name={self.name!r}, ranks={list(self.ranks)}, "
                f"rank_in_group={self.rank_in_group}, backend={self.backend!r})")

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    # --------------------------------------------------------------- collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the members (same shape). May reuse ``x``'s storage."""
        check_group_usable(self.device_group, "ParallelGroup.all_reduce", self.name)
        if self.world_size == 1:
            return x
        if not x.is_contiguous():
            x = x.contiguous()
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Members' ``x`` concatenated along ``dim`` in group-rank order."""
        check_group_usable(self.device_group, "ParallelGroup.all_gather", self.name)
        if self.world_size == 1:
            return x
        dim = self._normalise_dim(x, dim, "all_gather")
        x = x.contiguous()
        # Backends gather into a tensor concatenated along dim 0: (world * d0, d1, ...).
        gathered = torch.empty((self.world_size * x.shape[0],) + tuple(x.shape[1:]),
                               dtype=x.dtype, device=x.device)
        _all_gather_single(gathered, x, group=self.device_group)
        # (world, ..., x_dim, ...) -> (..., world, x_dim, ...) -> merge world into dim.
        gathered = gathered.view((self.world_size,) + tuple(x.shape)).movedim(0, dim)
        shape = list(x.shape)
        shape[dim] *= self.world_size
        return gathered.reshape(shape)

    def reduce_scatter(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This rank's slice along ``dim`` of the sum of ``x`` over the members.

        ``x.size(dim)`` must be a multiple of ``world_size``; rank i gets slice i.
        """
        check_group_usable(self.device_group, "ParallelGroup.reduce_scatter", self.name)
        if self.world_size == 1:
            return x
        dim = self._normalise_dim(x, dim, "reduce_scatter")
        if x.shape[dim] % self.world_size != 0:
            raise ValueError(f"ParallelGroup({self.name!r}).reduce_scatter: x.size({dim}) must be a "
                             f"multiple of the group size {self.world_size}, got {x.shape[dim]}")
        stacked = x.movedim(dim, 0).contiguous()
        output = torch.empty((stacked.shape[0] // self.world_size,) + tuple(stacked.shape[1:]),
                             dtype=x.dtype, device=x.device)
        _reduce_scatter_single(output, stacked, group=self.device_group)
        return output.movedim(0, dim).contiguous()

    def all_to_all_single(self, x: torch.Tensor, output_split_sizes: Optional[Sequence[int]] = None,
                          input_split_sizes: Optional[Sequence[int]] = None,
                          output: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``torch.distributed.all_to_all_single`` on this group, along dim 0.

        Without split sizes, ``x.size(0)`` is divided evenly: member i receives
        block i. With them, ``input_split_sizes[i]`` rows go to member i and
        ``output_split_sizes[i]`` rows come from member i. ``output`` is
        allocated when not given. Returns the received tensor.
        """
        check_group_usable(self.device_group, "ParallelGroup.all_to_all_single", self.name)
        for label, splits in (("input_split_sizes", input_split_sizes),
                              ("output_split_sizes", output_split_sizes)):
            if splits is not None and len(splits) != self.world_size:
                raise ValueError(f"ParallelGroup({self.name!r}).all_to_all_single: {label} must have "
                                 f"{self.world_size} entries, got {len(splits)}")
        if input_split_sizes is None and x.shape[0] % self.world_size != 0:
            raise ValueError(f"ParallelGroup({self.name!r}).all_to_all_single: x.size(0) must be a "
                             f"multiple of the group size {self.world_size} without input_split_sizes,"
                             f" got {x.shape[0]}")
        if input_split_sizes is not None and sum(input_split_sizes) != x.shape[0]:
            raise ValueError(f"ParallelGroup({self.name!r}).all_to_all_single: input_split_sizes must "
                             f"sum to x.size(0)={x.shape[0]}, got {list(input_split_sizes)}")
        rows = sum(output_split_sizes) if output_split_sizes is not None else x.shape[0]
        if output is None:
            output = torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        elif output.shape[0] != rows:
            raise ValueError(f"ParallelGroup({self.name!r}).all_to_all_single: output.size(0) must be "
                             f"{rows}, got {output.shape[0]}")
        if self.world_size == 1:
            output.copy_(x)
            return output
        dist.all_to_all_single(output, x.contiguous(),
                               list(output_split_sizes) if output_split_sizes is not None else None,
                               list(input_split_sizes) if input_split_sizes is not None else None,
                               group=self.device_group)
        return output

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Member ``src``'s (a group rank) ``x`` on every member, in place."""
        check_group_usable(self.device_group, "ParallelGroup.broadcast", self.name)
        if not 0 <= src < self.world_size:
            raise ValueError(f"ParallelGroup({self.name!r}).broadcast: src must be a group rank in "
                             f"[0, {self.world_size}), got {src}")
        if self.world_size > 1:
            dist.broadcast(x, src=self.ranks[src], group=self.device_group)
        return x

    def barrier(self) -> None:
        """Wait for every member (on the CPU group)."""
        check_group_usable(self.device_group, "ParallelGroup.barrier", self.name)
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    # ----------------------------------------------------------------------- NPU

    def hccl_comm_name(self, rank: Optional[int] = None) -> str:
        """The HCCL communicator name of this group, as MC2 and fused matmul ops take it.

        A straight call of ``device_group._get_backend(torch.device("npu"))
        .get_hccl_comm_name(rank)``. ``rank`` is a *global* rank and defaults
        to this process's (``self.rank``), as Ascend's documentation of that
        method requires ("The input is a global rank ID") for subgroups too;
        see ``moe_ext.platform.npu.hccl_comm_name`` for the evidence. Needs an
        HCCL group (torch_npu) with the current NPU device set.
        """
        if self.backend != "hccl":
            raise RuntimeError(f"ParallelGroup({self.name!r}).hccl_comm_name: needs an HCCL process "
                               f"group on an Ascend NPU (torch_npu); this group's backend is "
                               f"{self.backend!r}")
        key_rank = self.rank if rank is None else rank
        return self.device_group._get_backend(torch.device("npu")).get_hccl_comm_name(key_rank)

    # ---------------------------------------------------------------------------

    def _normalise_dim(self, x: torch.Tensor, dim: int, op: str) -> int:
        if not -x.dim() <= dim < x.dim() or x.dim() == 0:
            raise ValueError(f"ParallelGroup({self.name!r}).{op}: dim must be in "
                             f"[{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, got {dim}")
        return dim % x.dim()
