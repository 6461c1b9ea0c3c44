"""The group registry: every family of a ParallelConfig as process groups on torch.distributed.

``init_parallel_state(config)`` creates, on every rank and in the same order,
one process group per group of every family in ``group_layouts(config)`` and
keeps, per family, the :class:`ParallelGroup` this rank belongs to. Which
communicators are shared follows the reference engine:

- fine-grained TP families of equal size (``otp``, ``lmhead_tp``,
  ``embed_tp``, ``mlp_tp``) share one set of groups;
- ``flashcomm2_odp`` with O-proj TP 1 is the ``tp`` group itself;
- ``mc2``, ``dynamic_eplb`` and ``fc3_quant_x`` have the same ranks but each
  its own communicator: an MC2 communicator must not be used by other ops.

After the families, every rank also creates the data-parallel groups
(:func:`~moe_ext.distributed.layouts.dp_layout`, vLLM's ``get_dp_group()``),
each with its own communicator, got with :func:`get_dp_group` (or
``get_group("dp")``).
"""

from __future__ import annotations

import datetime
import inspect

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from moe_ext.distributed.config import ParallelConfig
from moe_ext.distributed.group import ParallelGroup
from moe_ext.distributed.layouts import FAMILIES, dp_layout, group_layouts

__all__ = [
    "init_parallel_state",
    "world_timeout",
    "destroy_parallel_state",
    "is_initialized",
    "get_parallel_config",
    "get_group",
    "has_group",
    "get_tp_group",
    "get_dp_group",
    "get_mc2_group",
    "get_dynamic_eplb_group",
    "get_otp_group",
    "get_lmhead_tp_group",
    "get_embed_tp_group",
    "get_mlp_tp_group",
    "get_flashcomm2_otp_group",
    "get_flashcomm2_odp_group",
    "get_shard_weight_group",
    "get_p_tp_group",
    "get_fc3_quant_x_group",
]

# Why a family can be missing from a config, for the getters' error messages.
_SWITCH_OF_FAMILY = {
    "p_tp": "pd_head_ratio > 1 and kv_producer=True",
    "dynamic_eplb": "dynamic_eplb=True",
    "otp": "oproj_tensor_parallel_size > 0",
    "lmhead_tp": "lmhead_tensor_parallel_size > 0",
    "embed_tp": "embedding_tensor_parallel_size > 0",
    "mlp_tp": "mlp_tensor_parallel_size > 0",
    "flashcomm2_otp": "flashcomm2_oproj_tensor_parallel_size > 1",
    "flashcomm2_odp": "flashcomm2_oproj_tensor_parallel_size set (not None)",
    "shard_weight": "layer_sharding=True",
    "fc3_quant_x": "multistream_overlap_gate=True",
}


@dataclass
class _ParallelState:
    config: ParallelConfig
    backend: str
    groups: dict[str, ParallelGroup] = field(default_factory=dict)
    # Every process group this rank created and belongs to, each once, for teardown.
    owned: list[dist.ProcessGroup] = field(default_factory=list)


_STATE: Optional[_ParallelState] = None


def is_initialized() -> bool:
    """Whether ``init_parallel_state`` ran (and ``destroy_parallel_state`` did not since)."""
    return _STATE is not None


def world_timeout() -> Optional[datetime.timedelta]:
    """The timeout the default (world) process group was initialised with, or None if unknown.

    ``torch.distributed.new_group`` without a timeout uses torch's default (30
    minutes on gloo), not the world's: groups moe_ext creates pass this
    instead, so a world started with a short timeout fails fast everywhere.
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.group.WORLD
    # The backend config reads like "cpu:gloo,cuda:nccl"; every backend object carries its options.
    config = str(dist.get_backend_config(world)) if hasattr(dist, "get_backend_config") else "cpu:gloo"
    for entry in config.split(","):
        device = entry.split(":")[0].strip()
        try:
            return world._get_backend(torch.device(device)).options._timeout
        except Exception:  # a device type torch cannot name here, or a backend without options
            continue
    return None


def init_parallel_state(config: ParallelConfig, backend: Optional[str] = None, *,
                        cpu_groups: bool = True, timeout: Optional[datetime.timedelta] = None) -> None:
    """Create the process groups of every family ``config`` turns on.

    Call on every rank, after ``torch.distributed.init_process_group``, with
    the same config. ``backend`` defaults to the default group's backend
    (gloo, nccl, hccl, ...). With ``cpu_groups`` and a non-gloo backend, each
    group also gets a gloo twin as ``cpu_group``. ``timeout``: of every group
    created; default the world's (:func:`world_timeout`), not torch's
    30-minute default for new groups.

    Calling it again with the same config and backend does nothing; with a
    different one it raises (call :func:`destroy_parallel_state` first).
    """
    global _STATE
    if not isinstance(config, ParallelConfig):
        raise ValueError(f"init_parallel_state: config must be a ParallelConfig, got {type(config).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_parallel_state: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if config.world_size != dist.get_world_size():
        raise ValueError(f"init_parallel_state: config.world_size must equal "
                         f"torch.distributed.get_world_size()={dist.get_world_size()}, "
                         f"got {config.world_size}")
    backend = str(backend) if backend is not None else str(dist.get_backend())
    if _STATE is not None:
        if _STATE.config == config and _STATE.backend == backend:
            return
        raise RuntimeError("init_parallel_state: already initialised with a different config or "
                           "backend; call destroy_parallel_state() first")

    if timeout is not None and not isinstance(timeout, datetime.timedelta):
        raise TypeError(f"init_parallel_state: timeout must be a datetime.timedelta or None, got "
                        f"{type(timeout).__name__}")
    timeout = timeout if timeout is not None else world_timeout()
    state = _ParallelState(config=config, backend=backend)
    make_cpu_twin = cpu_groups and backend != "gloo"
    by_size: dict[int, ParallelGroup] = {}  # fine-grained TP groups, shared by size
    try:
        for name, layout in group_layouts(config).items():
            if name in config.finegrained_tp_sizes and len(layout[0]) in by_size:
                state.groups[name] = by_size[len(layout[0])]
                continue
            if name == "flashcomm2_odp" and config.flashcomm2_oproj_tensor_parallel_size == 1:
                state.groups[name] = state.groups["tp"]
                continue
            group = _create_family(name, layout, backend, make_cpu_twin, state.owned, timeout)
            state.groups[name] = group
            if name in config.finegrained_tp_sizes:
                by_size[group.world_size] = group
        # Not a family (group_layouts is the engine-family map): created last, so the families'
        # creation order, which every rank shares, is unchanged.
        state.groups["dp"] = _create_family("dp", dp_layout(config), backend, make_cpu_twin, state.owned,
                                            timeout)
    except BaseException:
        _destroy_groups(state.owned)
        raise
    _STATE = state


# torch >= 2.12 can keep a group's rank order (new_group(sort_ranks=False));
# older torch always sorts it, so there the group's ranks are reported sorted,
# which keeps rank_in_group consistent with the communicator.
_KEEP_ORDER = ({"sort_ranks": False}
               if "sort_ranks" in inspect.signature(dist.new_group).parameters else {})
KEEPS_RANK_ORDER = bool(_KEEP_ORDER)  # False: groups come out in sorted rank order


def _group_order(ranks: list[int]) -> list[int]:
    """The member order the created group will really have."""
    return list(ranks) if _KEEP_ORDER else sorted(ranks)


def _create_family(name: str, layout: list[list[int]], backend: str, make_cpu_twin: bool,
                   owned: list[dist.ProcessGroup], timeout: Optional[datetime.timedelta] = None) -> ParallelGroup:
    """Create every group of a family (collectively) and return this rank's."""
    rank = dist.get_rank()
    mine: Optional[ParallelGroup] = None
    for index, ranks in enumerate(layout):
        description = f"moe_ext_{name}_{index}"
        ranks = _group_order(ranks)
        device_group = dist.new_group(ranks, backend=backend, group_desc=description, timeout=timeout,
                                      **_KEEP_ORDER)
        cpu_group = None
        if make_cpu_twin:
            cpu_group = dist.new_group(ranks, backend="gloo", group_desc=description + "_cpu", timeout=timeout,
                                       **_KEEP_ORDER)
        if rank in ranks:
            owned.append(device_group)
            if cpu_group is not None:
                owned.append(cpu_group)
            mine = ParallelGroup(name, ranks, device_group, cpu_group)
    if mine is None:  # layouts partition the world: a broken invariant, not a user error
        raise AssertionError(f"moe_ext internal error: rank {rank} is in no group of family {name!r}")
    return mine


def _destroy_groups(groups: list[dist.ProcessGroup]) -> None:
    for group in groups:
        dist.destroy_process_group(group)


def destroy_parallel_state() -> None:
    """Destroy every group ``init_parallel_state`` created. Safe to call when not initialised."""
    global _STATE
    state, _STATE = _STATE, None
    if state is not None and dist.is_initialized():
        _destroy_groups(state.owned)


def _state(caller: str) -> _ParallelState:
    if _STATE is None:
        raise RuntimeError(f"{caller}: the parallel state is not initialised "
                           "(call moe_ext.distributed.init_parallel_state first)")
    return _STATE


def get_parallel_config() -> ParallelConfig:
    """The config the parallel state was built from."""
    return _state("get_parallel_config").config


def has_group(name: str) -> bool:
    """Whether the initialised state has family ``name``."""
    return _STATE is not None and name in _STATE.groups


def get_group(name: str) -> ParallelGroup:
    """This rank's group of family ``name`` (one of ``FAMILIES``, or ``"dp"``)."""
    if name not in FAMILIES and name != "dp":
        raise ValueError(f"get_group: name must be one of {list(FAMILIES) + ['dp']}, got {name!r}")
    state = _state(f"get_group({name!r})")
    group = state.groups.get(name)
    if group is None:
        raise RuntimeError(f"get_group({name!r}): this family is not built by the current "
                           f"ParallelConfig (it needs {_SWITCH_OF_FAMILY[name]})")
    return group


def get_tp_group() -> ParallelGroup:
    return get_group("tp")


def get_dp_group() -> ParallelGroup:
    """This rank's data-parallel group (vLLM's ``get_dp_group()``; see
    :func:`moe_ext.distributed.layouts.dp_layout`): the ranks that differ from
    this one only in their DP index, in DP order, so ``rank_in_group`` is the
    DP rank. Always built, of one rank when ``data_parallel_size`` is 1. For
    ``MoEConfig(dp_group=..., dp_size=..., dp_rank=...)`` and the DP
    collectives of an engine (token counts, idle-rank agreement)."""
    return get_group("dp")


def get_mc2_group() -> ParallelGroup:
    return get_group("mc2")


def get_dynamic_eplb_group() -> ParallelGroup:
    return get_group("dynamic_eplb")


def get_otp_group() -> ParallelGroup:
    return get_group("otp")


def get_lmhead_tp_group() -> ParallelGroup:
    return get_group("lmhead_tp")


def get_embed_tp_group() -> ParallelGroup:
    return get_group("embed_tp")


def get_mlp_tp_group() -> ParallelGroup:
    return get_group("mlp_tp")


def get_flashcomm2_otp_group() -> Optional[ParallelGroup]:
    """The flashcomm2 O-proj TP group; ``None`` when its size is 1 (no group: the
    O-proj runs unsharded), as in the reference engine."""
    state = _state("get_flashcomm2_otp_group")
    if state.config.flashcomm2_oproj_tensor_parallel_size == 1:
        return None
    return get_group("flashcomm2_otp")


def get_flashcomm2_odp_group() -> ParallelGroup:
    return get_group("flashcomm2_odp")


def get_shard_weight_group() -> ParallelGroup:
    return get_group("shard_weight")


def get_p_tp_group() -> ParallelGroup:
    return get_group("p_tp")


def get_fc3_quant_x_group() -> ParallelGroup:
    return get_group("fc3_quant_x")
