"""Move expert weights in place to a new placement, over torch.distributed P2P.

:func:`rearrange_expert_weights_inplace` (blocking) and
:func:`rearrange_expert_weights_async` (layer by layer, for serving) execute the
plan of :func:`moe_ext.eplb.transfer.plan_expert_transfer` on the calling rank:
per layer, local copies (straight into place where the exchange does not read
the row, else into a one-layer buffer), the sends and receives of the layer
posted as one ``torch.distributed.batch_isend_irecv`` batch (gloo, NCCL, HCCL:
whatever backend the group has; receives land in place where they can; one
message per run of adjacent rows and tensor, not one per row), then the
buffered rows copied into place, then the remaining local copies and
duplicate fills. The blocking form posts layer l + 1's exchange before
committing layer l, so commits overlap transfers. The asynchronous form
writes nothing in place before a layer's commit.

Everything is checked before any weight is touched, and the ranks agree on the
outcome through one small all-reduce: when one rank refuses the call, every
rank raises (TypeError for a wrong type, :class:`~moe_ext.errors.ArgumentError`
for a bad value) and no weight changes anywhere. A new map that drops a
logical expert the old map holds is refused the same way unless
``allow_dropping_experts=True``.

Failure while moving (issue 15): ranks cannot agree through a group that has
lost a member, and staging every layer before writing it would break the
one-layer peak-memory bound, so a rearrangement ends with one final outcome
all-reduce and a rank returns success only when every rank got there. Any
failure on the way (a peer that died, a transfer error) raises
:class:`RearrangementError` on every surviving rank, saying for each layer
whether it was ``applied``, ``untouched`` or ``partial`` on that rank. The
remaining window: a rank that dies *after* it contributed to the final
all-reduce leaves its peers returning success (their weights, and the dead
rank's at its death, are all in the new placement; the group has lost a
member, which its next collective reports).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from moe_ext.distributed.health import check_group_usable, mark_unusable
from moe_ext.errors import ArgumentError, check_bool, check_int
from moe_ext.eplb.transfer import (
    COPY_AFTER_EXCHANGE,
    COPY_BEFORE_EXCHANGE,
    COPY_THROUGH_BUFFER,
    TransferPlan,
    _as_map,
    plan_expert_transfer,
)

__all__ = ["RearrangementError", "RearrangementHandle", "rearrange_expert_weights_async",
           "rearrange_expert_weights_inplace"]

APPLIED, UNTOUCHED, PARTIAL = "applied", "untouched", "partial"


class RearrangementError(RuntimeError):
    """A rearrangement that failed while moving weights (after every check passed).

    Attributes:
        rank: this rank in the expert-parallel group.
        layer_status: per layer, on this rank: ``"applied"`` (the rank's rows
            hold the new placement), ``"untouched"`` (they hold the old one,
            exactly) or ``"partial"`` (some rows may have been written; reload
            or re-run that layer).
    """

    def __init__(self, message: str, rank: int, layer_status: Sequence[str]):
        self.rank = rank
        self.layer_status = list(layer_status)
        super().__init__(f"{message}\n{describe_layer_status(rank, self.layer_status)}")


def describe_layer_status(rank: int, layer_status: Sequence[str]) -> str:
    groups: dict = {}
    for layer, status in enumerate(layer_status):
        groups.setdefault(status, []).append(layer)
    parts = [f"{status}: layers {layers}" for status, layers in groups.items()]
    return f"on rank {rank}, per layer: " + "; ".join(parts) + f" (all {len(layer_status)}: {layer_status})"

_BUFFER_ALIGNMENT = 256  # bytes: each tensor's region of the buffer starts aligned for any dtype


# --------------------------------------------------------------------- rank mapping


def _check_rank_mapping(rank_mapping: Mapping[int, int], ep_size: int) -> tuple[int, int, list[int]]:
    """Returns (old_ep_size, new_ep_size, new rank of each old rank or -1).

    ``len(rank_mapping) == ep_size``: scale down, the group is the old one and
    ``new_ep_size`` is the number of old ranks kept. Otherwise scale up: the
    group is the new one, ``len(rank_mapping)`` old ranks map into it.
    """
    if not isinstance(rank_mapping, Mapping):
        raise TypeError(f"rank_mapping must be a dict old rank -> new rank, got {type(rank_mapping).__name__}")
    old_ep_size = len(rank_mapping)
    keys = sorted(rank_mapping)
    if not all(isinstance(k, (int, np.integer)) for k in keys) or keys != list(range(old_ep_size)):
        raise ValueError(f"rank_mapping must have the keys 0..{old_ep_size - 1} (every old rank), got {keys}")
    values = [rank_mapping[k] for k in keys]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise TypeError(f"rank_mapping values must be ints (new rank, or -1 for a removed rank), got {values}")
    kept = [int(v) for v in values if v != -1]
    if len(set(kept)) != len(kept):
        raise ValueError(f"rank_mapping maps two old ranks to the same new rank: {dict(rank_mapping)}")
    if old_ep_size == ep_size:  # scale down (or a renumbering)
        new_ep_size = len(kept)
        if new_ep_size == 0:
            raise ValueError("rank_mapping removes every rank: no rank would hold the experts")
    else:
        if old_ep_size > ep_size:
            raise ValueError(
                f"rank_mapping has {old_ep_size} old ranks but the group has {ep_size}: for a scale "
                f"down, call with the old group (one entry per member); for a scale up, with the new one")
        new_ep_size = ep_size
    bad = [v for v in values if v != -1 and not 0 <= v < new_ep_size]
    if bad:
        raise ValueError(f"rank_mapping values must be -1 or in [0, {new_ep_size}), got {bad} in "
                         f"{dict(rank_mapping)}")
    return old_ep_size, new_ep_size, [int(v) for v in values]


def _remap_columns(maps: np.ndarray, from_ranks: list[int], to_ranks: list[int], num_ranks: int,
                   slots_per_rank: int) -> np.ndarray:
    """Move each rank's block of slots from rank from_ranks[i] to to_ranks[i]; the rest is -1."""
    out = np.full((maps.shape[0], num_ranks * slots_per_rank), -1, dtype=np.int64)
    for source, target in zip(from_ranks, to_ranks):
        out[:, target * slots_per_rank:(target + 1) * slots_per_rank] = \
            maps[:, source * slots_per_rank:(source + 1) * slots_per_rank]
    return out


def _apply_rank_mapping(old: np.ndarray, new: np.ndarray, rank_mapping: Optional[Mapping[int, int]],
                        ep_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Both maps in the group's rank space (the seed engine's convention)."""
    if rank_mapping is None:
        return old, new
    old_ep_size, new_ep_size, new_rank_of = _check_rank_mapping(rank_mapping, ep_size)
    if old_ep_size == ep_size:  # scale down: new map's ranks -> old (group) ranks
        if new.shape[1] % new_ep_size:
            raise ValueError(f"new_global_expert_indices has {new.shape[1]} slots, not a multiple of the "
                             f"{new_ep_size} ranks rank_mapping keeps")
        slots_per_rank = new.shape[1] // new_ep_size
        kept = [old_rank for old_rank, new_rank in enumerate(new_rank_of) if new_rank != -1]
        new = _remap_columns(new, [new_rank_of[r] for r in kept], kept, ep_size, slots_per_rank)
    else:  # scale up: old map's ranks -> new (group) ranks
        if old.shape[1] % old_ep_size:
            raise ValueError(f"old_global_expert_indices has {old.shape[1]} slots, not a multiple of the "
                             f"{old_ep_size} old ranks of rank_mapping")
        slots_per_rank = old.shape[1] // old_ep_size
        kept = [old_rank for old_rank, new_rank in enumerate(new_rank_of) if new_rank != -1]
        old = _remap_columns(old, kept, [new_rank_of[r] for r in kept], ep_size, slots_per_rank)
    return old, new


# --------------------------------------------------------------------- validation


@dataclass
class _Prepared:
    plan: TransferPlan
    group: Any
    ep_rank: int
    global_ranks: list
    layers: list  # per layer: list of weight tensors [slots_per_rank, ...]
    device: torch.device


def _row_is_contiguous(tensor: torch.Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(tensor.shape[1:]), reversed(tensor.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _check_weights(expert_weights: Any, num_layers: int, slots_per_rank: int) -> list:
    if isinstance(expert_weights, torch.Tensor) or not isinstance(expert_weights, Iterable):
        raise ValueError("expert_weights must be a sequence (per layer) of sequences of tensors "
                         f"[slots_per_rank, ...], got {type(expert_weights).__name__}")
    layers = [list(layer) if not isinstance(layer, torch.Tensor) else None for layer in expert_weights]
    if len(layers) != num_layers:
        raise ValueError(f"expert_weights must have one entry per layer of the maps ({num_layers}), "
                         f"got {len(layers)}")
    device = None
    seen: dict = {}
    for index, tensors in enumerate(layers):
        if tensors is None or not tensors:
            raise ValueError(f"expert_weights[{index}] must be a non-empty sequence of tensors, got "
                             f"{'a tensor' if tensors is None else 'an empty sequence'}")
        for position, tensor in enumerate(tensors):
            name = f"expert_weights[{index}][{position}]"
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() < 1 or tensor.shape[0] != slots_per_rank:
                raise ValueError(f"{name} must have a first dimension of slots_per_rank = "
                                 f"{slots_per_rank} (physical slots / ranks), got shape {tuple(tensor.shape)}")
            if device is None:
                device = tensor.device
            elif tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device} but expert_weights[0][0] is on {device}; "
                                 "all expert weights must be on one device")
            if not _row_is_contiguous(tensor):
                raise ValueError(f"{name} must have contiguous rows (stride {tensor.stride()} for shape "
                                 f"{tuple(tensor.shape)}); P2P sends whole rows")
            if tensor.numel():
                if tensor.data_ptr() in seen:
                    raise ValueError(f"{name} is the same memory as {seen[tensor.data_ptr()]}; each "
                                     "expert weight must be its own tensor")
                seen[tensor.data_ptr()] = name
    return layers


def _collective_device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "hccl" in backend:
        return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
    return torch.device("cpu")


def _signature(old: np.ndarray, new: np.ndarray, layers: list, extra: tuple) -> int:
    """63-bit digest of everything the ranks must agree on."""
    digest = hashlib.blake2b(digest_size=7)
    digest.update(old.tobytes())
    digest.update(new.tobytes())
    digest.update(repr(extra).encode())
    for tensors in layers:
        digest.update(repr([(tuple(t.shape[1:]), str(t.dtype)) for t in tensors]).encode())
    return int.from_bytes(digest.digest(), "little")


def _check_no_expert_dropped(old: np.ndarray, new: np.ndarray) -> None:
    """Refuse a new map that no longer holds a logical expert the old map holds (its weights would be
    overwritten everywhere)."""
    for layer in range(old.shape[0]):
        lost = np.setdiff1d(old[layer][old[layer] >= 0], new[layer][new[layer] >= 0])
        if lost.size:
            shown = lost[:8].tolist()
            raise ArgumentError(
                f"new_global_expert_indices drops logical expert(s) {shown}{' ...' if lost.size > 8 else ''} "
                f"({lost.size} in all) of layer {layer} that old_global_expert_indices holds: their weights "
                "would be lost on every rank. Place every expert the old map holds, or pass "
                "allow_dropping_experts=True to drop them deliberately")


def _prepare(old_global_expert_indices: Any, new_global_expert_indices: Any, expert_weights: Any,
             ep_group: Any, is_profile: Any, rank_mapping: Optional[Mapping[int, int]],
             ranks_per_node: Any, write_before_commit: bool, allow_dropping_experts: Any,
             what: str) -> _Prepared:
    if not dist.is_available() or not dist.is_initialized():
        raise ArgumentError("rearranging expert weights needs an initialised torch.distributed process group")
    if ep_group is not None and not isinstance(ep_group, dist.ProcessGroup) and isinstance(
            getattr(ep_group, "device_group", None), dist.ProcessGroup):
        ep_group = ep_group.device_group  # a moe_ext.distributed.ParallelGroup
    if ep_group is not None and not isinstance(ep_group, dist.ProcessGroup):
        # Checked before the group is used: nothing below can agree through a non-group.
        raise TypeError(f"{what}: ep_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(ep_group).__name__} ({ep_group!r})")
    group = ep_group if ep_group is not None else dist.group.WORLD
    check_group_usable(group, what)
    ep_size = dist.get_world_size(group)
    ep_rank = dist.get_rank(group)
    error: Optional[str] = None
    error_type: type = ArgumentError
    signature = 0
    prepared = None
    try:
        is_profile = check_bool("is_profile", is_profile)
        allow_dropping_experts = check_bool("allow_dropping_experts", allow_dropping_experts)
        ranks_per_node = check_int("ranks_per_node", ranks_per_node, minimum=0)
        old = _as_map("old_global_expert_indices", old_global_expert_indices)
        new = _as_map("new_global_expert_indices", new_global_expert_indices)
        held, wanted = old, new
        old, new = _apply_rank_mapping(old, new, rank_mapping, ep_size)
        if old.shape != new.shape:
            raise ValueError("old_global_expert_indices and new_global_expert_indices must have the same "
                             f"shape (after rank_mapping), got {old.shape} and {new.shape}")
        if old.shape[1] == 0 or old.shape[1] % ep_size:
            raise ValueError(f"the maps have {old.shape[1]} physical slots per layer, which must be a "
                             f"positive multiple of the group size {ep_size}")
        slots_per_rank = old.shape[1] // ep_size
        layers = _check_weights(expert_weights, old.shape[0], slots_per_rank)
        plan = plan_expert_transfer(old, new, ep_size, ranks_per_node=ranks_per_node,
                                    write_before_commit=write_before_commit)
        if not allow_dropping_experts:
            _check_no_expert_dropped(held, wanted)
        global_ranks = [dist.get_global_rank(group, r) if group is not dist.group.WORLD else r
                        for r in range(ep_size)]
        device = layers[0][0].device if layers else torch.device("cpu")
        prepared = _Prepared(plan, group, ep_rank, global_ranks, layers, device)
        signature = _signature(old, new, layers, (ep_size, ranks_per_node, is_profile, allow_dropping_experts))
    except Exception as refused:  # noqa: BLE001  every rank must reach the all-reduce below
        if isinstance(refused, (TypeError, ValueError)):
            error, error_type = str(refused), (TypeError if isinstance(refused, TypeError) else ArgumentError)
        else:
            error = f"{type(refused).__name__}: {refused}"
    # One all-reduce: every rank learns whether some rank refused, and whether
    # all ranks were given the same maps and weight shapes.
    verdict = torch.tensor([0 if error else 1, signature, -signature], dtype=torch.int64,
                           device=_collective_device(group))
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    ok, low, negative_high = verdict.tolist()
    if error:
        raise error_type(f"{what} (rank {ep_rank}): {error}; no weight was changed")
    if not ok:
        raise ArgumentError(f"{what}: another rank of the group refused the call "
                            "(see its error); no weight was changed")
    if low != -negative_high:
        raise ArgumentError(f"{what}: the ranks were given different maps, rank_mapping, ranks_per_node, "
                            "is_profile, allow_dropping_experts or weight shapes; no weight was changed")
    assert prepared is not None
    return prepared


# --------------------------------------------------------------------- execution


def _row_bytes(tensor: torch.Tensor) -> int:
    return tensor[0].numel() * tensor.element_size()


def _align(value: int) -> int:
    return (value + _BUFFER_ALIGNMENT - 1) // _BUFFER_ALIGNMENT * _BUFFER_ALIGNMENT


def _buffer_bytes(tensors: list, rows: int) -> int:
    return sum(_align(rows * _row_bytes(t)) for t in tensors)


def _buffer_views(buffer: torch.Tensor, tensors: list, rows: int) -> list:
    """Views of the flat byte buffer: one [rows, *row_shape] tensor per weight."""
    views, offset = [], 0
    for tensor in tensors:
        size = rows * _row_bytes(tensor)
        views.append(buffer[offset:offset + size].view(tensor.dtype).view(rows, *tensor.shape[1:]))
        offset += _align(size)
    return views


def _runs(src_rows: np.ndarray, in_buffer: np.ndarray, targets: np.ndarray) -> list:
    """Cut a pair's row sequence into messages: (src_row, in_buffer, target_row, rows).

    Consecutive entries merge when the source rows and the target rows (both in
    the buffer or both in place) are consecutive, so adjacent rows travel as one
    slice. Sender and receiver cut the same sequence, so the messages pair up.
    """
    runs: list = []
    for src, buffered, target in zip(src_rows.tolist(), in_buffer.tolist(), targets.tolist()):
        if runs:
            last_src, last_buffered, last_target, count = runs[-1]
            if src == last_src + count and buffered == last_buffered and target == last_target + count:
                runs[-1] = (last_src, last_buffered, last_target, count + 1)
                continue
        runs.append((src, buffered, target, 1))
    return runs


def _pair_runs(plan: TransferPlan, layer: int, src_rank: int, dst_rank: int) -> list:
    """The messages from src_rank to dst_rank in a layer, from the receiver's part of the plan."""
    group = layer * plan.ep_size + dst_rank
    offsets = plan.columns["recv_offsets"]
    begin, end = int(offsets[group]), int(offsets[group + 1])
    columns = plan.columns
    mine = columns["recv_src_ranks"][begin:end] == src_rank
    buffer_rows = columns["recv_buffer_rows"][begin:end][mine]
    in_buffer = buffer_rows >= 0
    targets = np.where(in_buffer, buffer_rows, columns["recv_dst_rows"][begin:end][mine])
    return _runs(columns["recv_src_rows"][begin:end][mine], in_buffer, targets)


def _in_order(ranks: np.ndarray) -> list:
    """Distinct ranks in order of first appearance."""
    return list(dict.fromkeys(ranks.tolist()))


class _LayerTransfer:
    """One layer in flight: steps 1 (local copies) and 2 (P2P) posted; step 3 in commit()."""

    def __init__(self, prepared: _Prepared, layer: int, buffer: torch.Tensor):
        self.plan = prepared.plan.for_rank(layer, prepared.ep_rank)
        self.weights = prepared.layers[layer]
        self.views = _buffer_views(buffer, self.weights, self.plan.buffer_rows)
        self.works: list = []
        plan, weights, views = self.plan, self.weights, self.views
        with torch.no_grad():
            # Sources are old rows that nothing writes before the exchange completes.
            for src, dst, buffer_row, stage in zip(plan.local_copy_src_rows.tolist(), plan.local_copy_dst_rows.tolist(),
                                                   plan.local_copy_buffer_rows.tolist(), plan.local_copy_stages.tolist()):
                if stage == COPY_BEFORE_EXCHANGE:
                    for weight in weights:
                        weight[dst].copy_(weight[src], non_blocking=True)
                elif stage == COPY_THROUGH_BUFFER:
                    for weight, view in zip(weights, views):
                        view[buffer_row].copy_(weight[src], non_blocking=True)
            # One message per run of adjacent rows and tensor: a run of rows is a
            # contiguous slice of the tensor (rows are contiguous, checked), and
            # fewer, larger P2P ops are much faster on NCCL than one op per row.
            ops = []
            moving = [i for i, w in enumerate(weights) if w[0].numel()]  # empty rows carry nothing
            me, whole = prepared.ep_rank, prepared.plan
            for dst_rank in _in_order(plan.send_dst_ranks):
                peer = prepared.global_ranks[dst_rank]
                for src, _, _, count in _pair_runs(whole, layer, me, dst_rank):
                    ops += [dist.P2POp(dist.isend, weights[i][src:src + count], peer, prepared.group)
                            for i in moving]
            for src_rank in _in_order(plan.recv_src_ranks):
                peer = prepared.global_ranks[src_rank]
                for _, buffered, target, count in _pair_runs(whole, layer, src_rank, me):
                    targets = views if buffered else weights
                    ops += [dist.P2POp(dist.irecv, targets[i][target:target + count], peer, prepared.group)
                            for i in moving]
            if ops:
                self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []

    def commit(self) -> None:
        """Step 3 on the current stream; the P2P must have been waited for."""
        plan, weights, views = self.plan, self.weights, self.views
        with torch.no_grad():
            for dst, buffer_row in zip(plan.local_copy_dst_rows.tolist(), plan.local_copy_buffer_rows.tolist()):
                if buffer_row >= 0:
                    for weight, view in zip(weights, views):
                        weight[dst].copy_(view[buffer_row], non_blocking=True)
            for dst, buffer_row in zip(plan.recv_dst_rows.tolist(), plan.recv_buffer_rows.tolist()):
                if buffer_row >= 0:
                    for weight, view in zip(weights, views):
                        weight[dst].copy_(view[buffer_row], non_blocking=True)
            # Sources below are rows that keep their expert or rows already in place.
            for src, dst, stage in zip(plan.local_copy_src_rows.tolist(), plan.local_copy_dst_rows.tolist(),
                                       plan.local_copy_stages.tolist()):
                if stage == COPY_AFTER_EXCHANGE:
                    for weight in weights:
                        weight[dst].copy_(weight[src], non_blocking=True)
            for src, dst in zip(plan.duplicate_fill_src_rows.tolist(), plan.duplicate_fill_dst_rows.tolist()):
                for weight in weights:
                    weight[dst].copy_(weight[src], non_blocking=True)


def _allocate_buffer(prepared: _Prepared, full_layer: bool) -> torch.Tensor:
    """One flat byte buffer, big enough for the largest layer's buffered rows on this rank."""
    rows = prepared.plan.buffer_rows[:, prepared.ep_rank] if prepared.plan.num_layers else []
    size = 0
    for layer, tensors in enumerate(prepared.layers):
        needed = prepared.plan.slots_per_rank if full_layer else int(rows[layer])
        size = max(size, _buffer_bytes(tensors, needed))
    return torch.empty(size, dtype=torch.uint8, device=prepared.device)


def _allocate_buffers(prepared: _Prepared) -> list:
    """Two buffers (alternating layers) when both fit in one layer of this rank's
    weights, which is what ``is_profile`` reserves; else one."""
    first = _allocate_buffer(prepared, full_layer=False)
    full_layer = max((_buffer_bytes(tensors, prepared.plan.slots_per_rank) for tensors in prepared.layers),
                     default=0)
    if prepared.plan.num_layers > 1 and 0 < 2 * first.numel() <= full_layer:
        return [first, torch.empty_like(first)]
    return [first]


def _reserve_for_profile(prepared: _Prepared) -> None:
    """Allocate the worst-case buffer and exchange with the ring neighbours, moving nothing.

    The caching allocator keeps the buffer's memory reserved afterwards and the
    backend sets up its P2P channels, so a memory profile run sees both.
    """
    buffer = _allocate_buffer(prepared, full_layer=True)
    ep_size = len(prepared.global_ranks)
    half = buffer.numel() // 2
    if ep_size > 1 and half > 0:
        after = prepared.global_ranks[(prepared.ep_rank + 1) % ep_size]
        before = prepared.global_ranks[(prepared.ep_rank - 1) % ep_size]
        ops = [dist.P2POp(dist.isend, buffer[:half], after, prepared.group),
               dist.P2POp(dist.irecv, buffer[half:2 * half], before, prepared.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    del buffer


def _layer_writes_before_commit(prepared: _Prepared, layer: int) -> bool:
    """Whether posting ``layer``'s transfer on this rank may write weights in place (local copies
    straight into place, or receives landing in place) before its commit."""
    part = prepared.plan.for_rank(layer, prepared.ep_rank)
    return bool((part.local_copy_stages == COPY_BEFORE_EXCHANGE).any() or (part.recv_buffer_rows < 0).any())


def _agree_on_outcome(prepared: _Prepared, succeeded: bool) -> bool:
    """The final outcome collective: True only if every rank of the group succeeded.

    Raises whatever the backend raises when a member is gone (gloo: at once;
    NCCL: at the process-group timeout).
    """
    verdict = torch.tensor([1 if succeeded else 0], dtype=torch.int64, device=_collective_device(prepared.group))
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=prepared.group)
    return bool(verdict.item() == 1)


def _finish_with_outcome(prepared: _Prepared, what: str, status: list, failure: Optional[BaseException]) -> None:
    """Run the final outcome collective and raise RearrangementError unless every rank succeeded."""
    try:
        everyone = _agree_on_outcome(prepared, failure is None)
    except Exception as outcome_error:  # noqa: BLE001  a member is gone: the group cannot agree
        if failure is None:
            failure = outcome_error
        raise RearrangementError(
            f"{what} failed: {type(failure).__name__}: {failure}. The ranks could not agree on the outcome "
            "(a member of the group failed or is gone), so this rank does not report success",
            prepared.ep_rank, status) from failure
    if failure is not None:
        raise RearrangementError(f"{what} failed on this rank: {type(failure).__name__}: {failure}",
                                 prepared.ep_rank, status) from failure
    if not everyone:
        raise RearrangementError(f"{what} failed on another rank of the group (see its error); this rank "
                                 "completed its part", prepared.ep_rank, status)


def rearrange_expert_weights_inplace(old_global_expert_indices: Any, new_global_expert_indices: Any,
                                     expert_weights: Sequence[Iterable[torch.Tensor]], ep_group: Any = None,
                                     is_profile: bool = False, rank_mapping: Optional[Mapping[int, int]] = None,
                                     *, ranks_per_node: int = 0,
                                     allow_dropping_experts: bool = False) -> TransferPlan:
    """Rearrange the expert weights of every layer in place, one layer at a time.

    Collective over ``ep_group``: every rank calls it with the same maps.

    Args:
        old_global_expert_indices: (num_layers, num_physical_slots) logical
            expert held by each physical slot now (-1 = empty).
        new_global_expert_indices: (num_layers, num_physical_slots) the
            placement wanted. Slot s is on group rank s // slots_per_rank.
        expert_weights: per layer, the local weight tensors of that layer, each
            of shape [slots_per_rank, ...] (any row shape and dtype, rows contiguous).
        ep_group: the expert-parallel process group (default: the world).
        is_profile: check everything and reserve the one-layer buffer (with a
            dummy P2P exchange) but move nothing.
        rank_mapping: old rank -> new rank (-1: removed) for elastic scaling.
            With one entry per member of ``ep_group`` it is a scale down: the
            group is the old one and the new map (of the kept ranks) is moved
            to the old ranks. Otherwise it is a scale up: the group is the new
            one and the old map (of ``len(rank_mapping)`` ranks) is moved to
            the new ranks; ranks that join hold nothing yet.
        ranks_per_node: ranks per node (0: unknown), to prefer senders on the
            receiver's node.
        allow_dropping_experts: let the new map leave out logical experts that
            the old map holds (their weights are overwritten everywhere).
            False (the default) refuses such a map on every rank before any
            write: a map that loses an expert is almost always a bug.

    ``is_profile`` and ``allow_dropping_experts`` must be bools and
    ``ranks_per_node`` an int (bool excluded): a shifted positional call
    (vLLM's ``(old, new, weights, ep_group, communicator)``) raises TypeError on
    every rank instead of silently profiling.

    Returns the plan executed (for logging). Raises, on every rank and with no
    weight changed, TypeError for an argument of the wrong type and
    :class:`~moe_ext.errors.ArgumentError` (a ValueError) when any rank finds a
    bad value (shape, id, rank_mapping, an expert the new map places that no
    rank holds now, an expert the new map drops, weights whose first dimension
    is not slots_per_rank, different maps on different ranks).

    Raises :class:`RearrangementError` when moving fails after the checks
    (a peer died, a transfer failed): on every surviving rank, with each
    layer's status on that rank (applied / untouched / partial). A rank
    returns only after the final outcome all-reduce has shown that every rank
    completed; see the module docstring for the remaining window. A rank that
    fails locally while its peers are alive leaves them waiting until the
    process-group timeout, after which they raise the same error.

    Peak extra memory: at most one layer of this rank's weights (what
    ``is_profile`` reserves). A buffer holds the largest layer's rows that must
    go through it on this rank (rows that the exchange itself reads; every
    other row is copied or received straight into place). When two such
    buffers fit in one layer of weights, two are used, alternating layers, so
    that a layer's copies out of the buffer overlap the next layer's
    transfer; otherwise one (peak = one buffer).
    """
    what = "rearrange_expert_weights_inplace"
    prepared = _prepare(old_global_expert_indices, new_global_expert_indices, expert_weights, ep_group,
                        is_profile, rank_mapping, ranks_per_node, write_before_commit=True,
                        allow_dropping_experts=allow_dropping_experts, what=what)
    if is_profile:
        _reserve_for_profile(prepared)
        return prepared.plan
    status = [UNTOUCHED] * prepared.plan.num_layers
    failure: Optional[BaseException] = None
    try:
        _run_inplace(prepared, status)
    except Exception as error:  # noqa: BLE001  reported through RearrangementError below
        failure = error
    _finish_with_outcome(prepared, what, status, failure)
    return prepared.plan


def _run_inplace(prepared: _Prepared, status: list) -> None:
    """The layer loop of rearrange_expert_weights_inplace; keeps ``status`` current."""
    buffers = _allocate_buffers(prepared)
    buffer_rows = prepared.plan.buffer_rows[:, prepared.ep_rank] if prepared.plan.num_layers else []
    # Layer l + 1's exchange is posted before layer l is committed, so layer l's
    # copies out of its buffer (current stream) overlap layer l + 1's transfer
    # (the backend's stream). Layer l + 2 is posted after layer l's commit is
    # enqueued, so a buffer is never written while a commit still reads it.
    pending: Optional[_LayerTransfer] = None

    def complete(transfer: _LayerTransfer) -> None:
        transfer.wait()
        status[transfer.plan.layer] = PARTIAL  # the commit writes in place
        transfer.commit()
        status[transfer.plan.layer] = APPLIED

    for layer in range(prepared.plan.num_layers):
        if (pending is not None and len(buffers) == 1 and buffer_rows[layer] > 0
                and buffer_rows[layer - 1] > 0):
            complete(pending)  # one buffer, used by both layers: no overlap
            pending = None
        if _layer_writes_before_commit(prepared, layer):
            status[layer] = PARTIAL  # straight-into-place copies and receives start now
        transfer = _LayerTransfer(prepared, layer, buffers[layer % len(buffers)])
        if pending is not None:
            complete(pending)
        pending = transfer
    if pending is not None:
        complete(pending)


class RearrangementHandle:
    """A rearrangement in progress, one layer in flight at a time.

    Ordering guarantees (all ranks of the group must drive their handles the
    same way, since each step is a collective P2P exchange):

    - Layers are committed in order 0, 1, ..., num_layers - 1. Layer l's
      transfer is posted when layer l - 1 is committed (layer 0's at creation).
    - A transfer in flight only reads weights: every layer not yet committed
      keeps its old weights exactly, so the model may keep running with the
      old placement for those layers.
    - :meth:`commit_next_layer` writes layer l's weights on the current stream
      (CUDA/NPU: no host synchronisation; the copies wait for the transfer on
      the device). Work enqueued on the current stream before the call sees the
      old weights of layer l, work enqueued after it the new ones: switch the
      layer's placement maps right after the call returns.
    - Committing the last layer ends with the final outcome all-reduce (one
      int64, a host synchronisation): it returns only if every rank committed
      every layer, else raises :class:`RearrangementError`.
    - The caller must not write expert weights of uncommitted layers, nor run
      another rearrangement on the same group, until :attr:`done` or
      :meth:`close`.

    Ending early: :meth:`close` (or leaving a ``with`` block) waits for the
    layer in flight, commits nothing more and releases the buffer; every rank
    must close at the same layer (the wait completes the P2P exchange the ranks
    posted together). Layers not committed keep their old weights. A handle
    dropped while a transfer is in flight cannot do that from a finaliser (it
    would run at different times on different ranks): it warns loudly
    (RuntimeWarning) and marks the group unusable on this rank, so the next
    moe_ext collective on the group raises
    :class:`moe_ext.distributed.health.GroupUnusableError` instead of blocking
    until the process-group timeout.

    A failure while committing (a peer died, a transfer failed) raises
    :class:`RearrangementError` with each layer's status on this rank and
    closes the handle: committed layers are applied, the others untouched
    (the asynchronous form writes a layer only in its commit), except a layer
    whose commit itself failed (partial).
    """

    def __init__(self, prepared: _Prepared):
        self._prepared = prepared
        self._closed = False
        self._in_flight: Optional[_LayerTransfer] = None
        self._status = [UNTOUCHED] * prepared.plan.num_layers
        self._buffer = _allocate_buffer(prepared, full_layer=False)
        self._next_layer = 0
        device = prepared.device
        self._module = torch.get_device_module(device.type) if device.type not in ("cpu", "meta") else None
        self._side_stream = self._module.Stream(device=device) if self._module is not None else None
        self._start(0)

    @property
    def plan(self) -> TransferPlan:
        return self._prepared.plan

    @property
    def num_layers(self) -> int:
        return self._prepared.plan.num_layers

    @property
    def layers_committed(self) -> int:
        return self._next_layer

    @property
    def done(self) -> bool:
        return self._next_layer >= self.num_layers

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran, the last layer was committed, or a commit failed."""
        return self._closed

    @property
    def layer_status(self) -> list:
        """Per layer on this rank: ``"applied"``, ``"untouched"`` or ``"partial"``."""
        return list(self._status)

    def _start(self, layer: int) -> None:
        if layer >= self.num_layers:
            return
        if self._side_stream is None:
            self._in_flight = _LayerTransfer(self._prepared, layer, self._buffer)
            return
        # The side stream starts after everything enqueued so far on the current
        # stream: the last commit's reads of the buffer, any earlier weight writes.
        self._side_stream.wait_stream(self._module.current_stream(self._prepared.device))
        with self._module.stream(self._side_stream):
            self._in_flight = _LayerTransfer(self._prepared, layer, self._buffer)

    def _wait_in_flight(self, transfer: _LayerTransfer) -> None:
        if self._side_stream is None:
            transfer.wait()
        else:
            with self._module.stream(self._side_stream):
                transfer.wait()  # device-side wait: the side stream waits for the P2P
            self._module.current_stream(self._prepared.device).wait_stream(self._side_stream)

    def commit_next_layer(self) -> int:
        """Complete the layer in flight, put it in place, post the next; returns its index.

        Raises ArgumentError when every layer is committed or the handle is
        closed, :class:`RearrangementError` when the transfer or the final
        outcome fails.
        """
        if self.done:
            raise ArgumentError(f"all {self.num_layers} layers are already committed")
        if self._closed:
            raise ArgumentError(f"this rearrangement handle is closed ({self._next_layer} of "
                                f"{self.num_layers} layers committed)")
        what = "rearrange_expert_weights_async: commit_next_layer"
        transfer = self._in_flight
        assert transfer is not None
        layer = self._next_layer
        try:
            self._wait_in_flight(transfer)
            self._in_flight = None
            self._status[layer] = PARTIAL
            transfer.commit()
            self._status[layer] = APPLIED
            self._next_layer += 1
            self._start(self._next_layer)
        except Exception as error:  # noqa: BLE001
            self._in_flight = None
            self._release()
            raise RearrangementError(f"{what} of layer {layer} failed: {type(error).__name__}: {error}",
                                     self._prepared.ep_rank, self._status) from error
        if self.done:
            self._release()
            _finish_with_outcome(self._prepared, what, self._status, None)
        return layer

    def finish(self) -> None:
        """Commit every remaining layer."""
        while not self.done:
            self.commit_next_layer()

    def _release(self) -> None:
        self._closed = True
        self._buffer = None

    def close(self) -> None:
        """End the rearrangement here: wait for the layer in flight, commit nothing more.

        Collective in effect: every rank must close at the same layer. Layers
        not committed keep their old weights (see :attr:`layer_status`).
        Idempotent; a no-op once done.
        """
        if self._closed:
            return
        transfer, self._in_flight = self._in_flight, None
        try:
            if transfer is not None:
                self._wait_in_flight(transfer)
        except Exception as error:  # noqa: BLE001  e.g. a peer that is gone
            raise RearrangementError(
                f"rearrange_expert_weights_async: close() could not complete the transfer of layer "
                f"{self._next_layer} in flight: {type(error).__name__}: {error}. Layers not committed keep "
                "their old weights", self._prepared.ep_rank, self._status) from error
        finally:
            self._release()

    def __enter__(self) -> "RearrangementHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # getattr: __init__ may have failed before setting these.
        if getattr(self, "_closed", True) or getattr(self, "_in_flight", None) is None:
            return
        prepared = self._prepared
        reason = (f"a rearrange_expert_weights_async handle was dropped without close() while layer "
                  f"{self._next_layer} of {self.num_layers} was in flight; its P2P operations may never "
                  "complete")
        try:
            mark_unusable(prepared.group, reason)
            warnings.warn(f"moe_ext: {reason}. The expert-parallel group is now marked unusable on rank "
                          f"{prepared.ep_rank}: the next moe_ext collective on it raises GroupUnusableError. "
                          "Call handle.close() (or use the handle as a context manager) on every rank.",
                          RuntimeWarning, stacklevel=2)
        except Exception:  # noqa: BLE001  never raise from a finaliser (e.g. at interpreter exit)
            pass


def rearrange_expert_weights_async(old_global_expert_indices: Any, new_global_expert_indices: Any,
                                   expert_weights: Sequence[Iterable[torch.Tensor]], ep_group: Any = None,
                                   rank_mapping: Optional[Mapping[int, int]] = None, *,
                                   ranks_per_node: int = 0,
                                   allow_dropping_experts: bool = False) -> RearrangementHandle:
    """Start a layer-by-layer rearrangement; drive it with the returned handle.

    Same arguments, checks and all-or-nothing refusal as
    :func:`rearrange_expert_weights_inplace` (the checks run here, before
    anything is posted). Layer 0's transfer is posted on a side stream (CUDA,
    NPU) or to the backend's threads (gloo) before returning; call
    :meth:`RearrangementHandle.commit_next_layer` between model steps, and
    :meth:`RearrangementHandle.close` (or use a ``with`` block) to end early.
    """
    prepared = _prepare(old_global_expert_indices, new_global_expert_indices, expert_weights, ep_group,
                        False, rank_mapping, ranks_per_node, write_before_commit=False,
                        allow_dropping_experts=allow_dropping_experts,
                        what="rearrange_expert_weights_async")
    return RearrangementHandle(prepared)
