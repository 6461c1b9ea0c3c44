"""Which comm method a forward uses: the platform, the token count and the sizes decide; it can be forced."""

from __future__ import annotations

import os
from typing import Optional

from moe_ext.moe.comm.allgather import AllGatherCommImpl
from moe_ext.moe.comm.alltoall import AllToAllCommImpl
from moe_ext.moe.comm.base import MoECommMethod
from moe_ext.moe.comm.dummy import DummyCommImpl
from moe_ext.moe.comm.mc2 import MC2CommImpl
from moe_ext.moe.comm.native_allgather import NativeAllGatherCommImpl
from moe_ext.moe.config import MoEConfig

__all__ = ["COMM_METHODS", "make_comm_method", "mc2_fits", "select_comm_method"]

COMM_METHODS = ("dummy", "allgather", "native_allgather", "alltoall", "mc2")
#: environment variable that forces a method for every layer (name from COMM_METHODS)
FORCE_ENV = "MOE_EXT_MOE_COMM_METHOD"


def make_comm_method(name: str, config: MoEConfig, npu=None) -> MoECommMethod:
    """An instance of the method called ``name``."""
    if name == "dummy":
        return DummyCommImpl(config)
    if name == "allgather":
        return AllGatherCommImpl(config, npu=npu)
    if name == "native_allgather":
        return NativeAllGatherCommImpl(config)
    if name == "alltoall":
        return AllToAllCommImpl(config)
    if name == "mc2":
        return MC2CommImpl(config, npu)
    raise ValueError(f"make_comm_method: name must be one of {COMM_METHODS}, got {name!r}")


def mc2_fits(config: MoEConfig, tokens_per_rank: int, npu) -> bool:
    """Whether MC2's documented limits admit this layer and batch (batch = padded tokens / tp).

    ``npu``: the :class:`~moe_ext.platform.npu.NpuRuntime` (its chip and whether it has the v2
    operators decide the limits; see ``NpuRuntime.mc2_unsupported``).
    """
    return npu.mc2_unsupported(ep_world_size=config.ep_size, moe_expert_num=config.num_physical_experts,
                               top_k=config.top_k, hidden=config.hidden_size, batch=tokens_per_rank) is None


def select_comm_method(config: MoEConfig, max_tokens_across_dp: int, *, npu=None,
                       force: Optional[str] = None) -> str:
    """The method name for a forward whose largest DP rank holds ``max_tokens_across_dp`` tokens.

    Every rank of the EP group must get the same answer, so the decision uses
    only values that agree across ranks. Rules, in order:

    1. ``force``, else ``$MOE_EXT_MOE_COMM_METHOD``, if set;
    2. on NPU (``npu`` runtime given): MC2 when the EP group has >= 2 ranks
       and the batch fits MC2's limits (the engines' choice for small batches),
       else the all-gather path with the fused routing ops;
    3. elsewhere: the all-gather path when it moves no more data than
       all-to-all, else all-to-all. Per rank, all-gather moves
       ``2 (dp - 1) T H`` elements (gather + reduce-scatter) and all-to-all
       ``2 (T / tp) K H (ep - 1) / ep``; all-gather is one collective fewer and
       has no host synchronisation, so it also wins ties (and dp == 1).
    """
    chosen = force or os.environ.get(FORCE_ENV) or None
    if chosen is not None:
        if chosen not in COMM_METHODS:
            raise ValueError(f"select_comm_method: force/${FORCE_ENV} must be one of {COMM_METHODS}, got {chosen!r}")
        return chosen
    if npu is not None:
        tp = config.tp_size
        padded = max(tp, -(-max_tokens_across_dp // tp) * tp)
        if config.ep_size >= 2 and mc2_fits(config, padded // tp, npu):
            return "mc2"
        return "allgather"
    if config.ep_size == 1:
        return "allgather"
    tokens = max(max_tokens_across_dp, 1)
    allgather_elements = 2 * (config.dp_size - 1) * tokens
    alltoall_elements = 2 * (tokens / config.tp_size) * config.top_k * (config.ep_size - 1) / config.ep_size
    return "allgather" if allgather_elements <= alltoall_elements else "alltoall"
