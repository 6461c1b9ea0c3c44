"""The expert transfer plan: who copies, sends and receives which expert row.

:func:`plan_expert_transfer` calls the C++ planner (``csrc/core/transfer``) for
every layer at once and returns a :class:`TransferPlan`, a read-only view of
its columns with per-(layer, rank) accessors and totals for logging and tests.
Every rank computes the same plan from the same maps, with no communication.

Meaning of the lists, for one (layer, rank), rows being local rows of that rank:

- ``unchanged``: rows whose expert stays; nothing to do.
- ``local copies`` (src_row, dst_row, buffer_row, stage): the rank held the
  expert in the old map. Stage ``COPY_BEFORE_EXCHANGE``: straight into place
  before the exchange (the exchange does not read dst_row);
  ``COPY_THROUGH_BUFFER``: into buffer row ``buffer_row`` before the exchange,
  into place after it; ``COPY_AFTER_EXCHANGE``: straight into place after the
  exchange, from a row that keeps the expert.
- ``receives`` (expert, dst_row, src_rank, src_row, buffer_row): the expert
  arrives from ``src_rank`` (its row ``src_row``) into the buffer row, then goes
  to ``dst_row``; or straight into ``dst_row`` (``buffer_row == -1``) when the
  exchange does not read that row. One per (rank, expert) the rank lacks: the
  fewest possible.

With ``write_before_commit=False`` nothing is written in place before the
exchange has completed (every write goes through the buffer), so the old
weights stay readable while a layer is in flight (layer-by-layer serving).
- ``sends`` (expert, src_row, dst_rank, dst_row): the matching side. The sends
  of h to r and the receives of r from h list the same experts in the same order.
- ``duplicate fills`` (src_row, dst_row): further replicas of an expert that a
  buffered copy or a receive placed on the rank, copied last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from moe_ext.errors import check_bool, check_int

__all__ = ["COPY_AFTER_EXCHANGE", "COPY_BEFORE_EXCHANGE", "COPY_THROUGH_BUFFER", "LayerRankPlan",
           "TransferPlan", "plan_expert_transfer"]

# Stages of a local copy (the values of core::LocalCopyStage).
COPY_BEFORE_EXCHANGE = 0
COPY_THROUGH_BUFFER = 1
COPY_AFTER_EXCHANGE = 2


def _as_map(name: str, value: Any) -> np.ndarray:
    """A 2-D int64 numpy copy of a phy2log map given as a tensor, array or nested list."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        if value.dtype.is_floating_point or value.dtype.is_complex:
            raise ValueError(f"{name} must hold integer expert ids, got dtype {value.dtype}")
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer expert ids, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_layers, num_physical_slots), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.int64)


@dataclass(frozen=True)
class LayerRankPlan:
    """What one rank does for one layer (a slice of :class:`TransferPlan`)."""

    layer: int
    rank: int
    unchanged_rows: np.ndarray
    local_copy_src_rows: np.ndarray
    local_copy_dst_rows: np.ndarray
    local_copy_buffer_rows: np.ndarray
    local_copy_stages: np.ndarray
    send_experts: np.ndarray
    send_src_rows: np.ndarray
    send_dst_ranks: np.ndarray
    recv_experts: np.ndarray
    recv_dst_rows: np.ndarray
    recv_src_ranks: np.ndarray
    recv_buffer_rows: np.ndarray
    duplicate_fill_src_rows: np.ndarray
    duplicate_fill_dst_rows: np.ndarray
    buffer_rows: int

    @property
    def is_idle(self) -> bool:
        """True when the rank has nothing to do for this layer."""
        return (self.local_copy_dst_rows.size + self.send_experts.size + self.recv_experts.size
                + self.duplicate_fill_dst_rows.size) == 0


@dataclass(frozen=True)
class TransferPlan:
    """The global transfer plan of every layer and rank (columns of the C++ plan).

    Each list is grouped by (layer, rank): the entries of (l, r) are
    ``[offsets[l * ep_size + r], offsets[l * ep_size + r + 1])``.
    """

    num_layers: int
    ep_size: int
    slots_per_rank: int
    columns: dict

    def _group(self, layer: int, rank: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank must be in [0, {self.ep_size}), got {rank}")
        return layer * self.ep_size + rank

    def _slice(self, prefix: str, names: tuple, group: int) -> list:
        offsets = self.columns[prefix + "offsets"]
        begin, end = int(offsets[group]), int(offsets[group + 1])
        return [self.columns[prefix + name][begin:end] for name in names]

    def for_rank(self, layer: int, rank: int) -> LayerRankPlan:
        """The part of the plan that ``rank`` executes for ``layer``."""
        g = self._group(layer, rank)
        (unchanged,) = self._slice("unchanged_", ("rows",), g)
        lc = self._slice("local_copy_", ("src_rows", "dst_rows", "buffer_rows", "stages"), g)
        sends = self._slice("send_", ("experts", "src_rows", "dst_ranks"), g)
        recvs = self._slice("recv_", ("experts", "dst_rows", "src_ranks", "buffer_rows"), g)
        fills = self._slice("duplicate_fill_", ("src_rows", "dst_rows"), g)
        return LayerRankPlan(layer, rank, unchanged, *lc, *sends, *recvs, *fills,
                             buffer_rows=int(self.columns["buffer_rows"][g]))

    def _per_group(self, prefix: str) -> np.ndarray:
        """Entries per (layer, rank), shape (num_layers, ep_size)."""
        return np.diff(self.columns[prefix + "offsets"]).reshape(self.num_layers, self.ep_size)

    @property
    def rows_received(self) -> np.ndarray:
        """Rows each rank receives per layer, shape (num_layers, ep_size)."""
        return self._per_group("recv_")

    @property
    def rows_sent(self) -> np.ndarray:
        """Rows each rank sends per layer, shape (num_layers, ep_size)."""
        return self._per_group("send_")

    @property
    def rows_copied_locally(self) -> np.ndarray:
        """Local copies plus duplicate fills per (layer, rank)."""
        return self._per_group("local_copy_") + self._per_group("duplicate_fill_")

    @property
    def buffer_rows(self) -> np.ndarray:
        """Rows of the one-layer buffer each rank uses per layer, shape (num_layers, ep_size)."""
        return self.columns["buffer_rows"].reshape(self.num_layers, self.ep_size)

    @property
    def total_rows_moved(self) -> int:
        """Rows that cross ranks, over all layers (each is one expert's weights)."""
        return int(self.columns["recv_experts"].size)

    def bytes_per_rank(self, bytes_per_row: int) -> dict:
        """Bytes each rank sends and receives over all layers, given one row's size."""
        return {"sent": self.rows_sent.sum(axis=0) * bytes_per_row,
                "received": self.rows_received.sum(axis=0) * bytes_per_row}

    def summary(self) -> dict:
        """Totals for logging: rows moved, copied, unchanged, and the busiest sender."""
        sent = self.rows_sent
        return {
            "layers": self.num_layers,
            "ep_size": self.ep_size,
            "rows_moved": self.total_rows_moved,
            "rows_copied_locally": int(self.rows_copied_locally.sum()),
            "rows_unchanged": int(self.columns["unchanged_rows"].size),
            "max_rows_sent_by_one_rank_in_a_layer": int(sent.max()) if sent.size else 0,
        }


def plan_expert_transfer(old_phy2log: Any, new_phy2log: Any, ep_size: int, *,
                         ranks_per_node: int = 0,
                         num_logical_experts: Optional[int] = None,
                         write_before_commit: bool = True) -> TransferPlan:
    """Plan the rearrangement of every layer from the old to the new placement.

    Args:
        old_phy2log: (num_layers, ep_size * slots_per_rank) logical expert per
            physical slot now (-1 = empty); a tensor, numpy array or nested list.
        new_phy2log: the same shape, the placement wanted.
        ep_size: number of expert-parallel ranks; slot s is on rank s // slots_per_rank.
        ranks_per_node: ranks per node, to prefer senders on the receiver's node (0: none).
        num_logical_experts: if given, ids must be below it.
        write_before_commit: let rows that the exchange does not read be
            written before and during it (saves buffer and copies); False
            keeps every weight row untouched until the exchange is complete.

    Raises ValueError (naming layer and slot) for a bad shape or id, or for an
    expert that the new map places but that no rank holds in the old map;
    TypeError for an int or bool argument of another type (bool is not an int).
    """
    from moe_ext import _native

    old = _as_map("old_phy2log", old_phy2log)
    new = _as_map("new_phy2log", new_phy2log)
    if old.shape != new.shape:
        raise ValueError(f"old_phy2log and new_phy2log must have the same shape, got {old.shape} "
                         f"and {new.shape}")
    ep_size = check_int("ep_size", ep_size, minimum=1)
    ranks_per_node = check_int("ranks_per_node", ranks_per_node, minimum=0)
    if num_logical_experts is not None:
        num_logical_experts = check_int("num_logical_experts", num_logical_experts, minimum=0)
    write_before_commit = check_bool("write_before_commit", write_before_commit)
    if old.shape[1] == 0 or old.shape[1] % ep_size:
        raise ValueError(f"the number of physical slots ({old.shape[1]}) must be a positive "
                         f"multiple of ep_size ({ep_size})")
    slots_per_rank = old.shape[1] // ep_size
    columns = _native.plan_expert_transfer(
        old, new, int(ep_size), slots_per_rank, int(ranks_per_node),
        -1 if num_logical_experts is None else int(num_logical_experts), bool(write_before_commit))
    return TransferPlan(num_layers=int(columns.pop("num_layers")), ep_size=int(columns.pop("ep_size")),
                        slots_per_rank=int(columns.pop("slots_per_rank")), columns=columns)
