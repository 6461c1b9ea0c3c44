"""Which parallel op a linear layer gets, from its prefix and a few switches.

``select_parallel_op(prefix, direction, options)`` returns the op for a layer
named ``prefix`` (its dotted path in the model, e.g.
``"model.layers.3.mlp.down_proj"``) of ``direction`` "column", "row" or
"replicated", built on the groups of the initialised
``moe_ext.distributed`` state. :func:`parallel_op_class` is the same rule
without groups (pure: the table below, tested as a table). A name matches when
it is a substring of the prefix, as in the reference engine.

Rules, first match wins (``options`` fields in ``code``):

==========  =======================================================  ==================================
direction   condition                                                op
==========  =======================================================  ==================================
any         ``disable_tp``                                           ReplicatedOp
any         "shared_experts" in prefix and ``shared_expert_dp``      ReplicatedOp
replicated  —                                                        ReplicatedOp
column      ``mlp_tensor_parallel`` and "gate_up_proj"               MLPColumnParallelOp (mlp_tp)
column      ``sequence_parallel`` and "shared_expert"                ColumnParallelOp (tp)
column      ``sequence_parallel`` and "gate_up_proj", "in_proj",     SequenceColumnParallelOp (tp)
            "qkv_proj" or "conv1d"
column      otherwise                                                ColumnParallelOp (tp)
row         ``mlp_tensor_parallel`` and "down_proj"                  MLPRowParallelOp (mlp_tp)
row         ``oproj_tensor_parallel`` and "o_proj"                   OProjRowParallelOp (otp)
row         ``matmul_allreduce`` (any prefix)                        MatmulAllReduceRowParallelOp (tp)
row         ``flashcomm2`` and "o_proj" or "out_proj"                Flashcomm2OProjRowParallelOp
                                                                     (tp, flashcomm2_odp, flashcomm2_otp)
row         ``sequence_parallel`` and "shared_expert"                RowParallelOp (tp)
row         ``sequence_parallel`` and "o_proj", "out_proj" or        SequenceRowParallelOp (tp)
            "down_proj"
row         otherwise                                                RowParallelOp (tp)
==========  =======================================================  ==================================

Where the reference returns "no custom op" this returns the plain op it falls
back to (ColumnParallelOp / RowParallelOp on the TP group), so every layer of
an engine-free model gets an op; its "TP disabled" answer (rank 0 of 1) is the
ReplicatedOp.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from moe_ext.distributed import state as _state
from moe_ext.distributed.config import ParallelConfig
from moe_ext.errors import check_bool, check_choice
from moe_ext.parallel.backend import FUSION_MODES, LinearBackend
from moe_ext.parallel.ops import (
    ColumnParallelOp,
    Flashcomm2OProjRowParallelOp,
    MatmulAllReduceRowParallelOp,
    MLPColumnParallelOp,
    MLPRowParallelOp,
    OProjRowParallelOp,
    ParallelLinearOp,
    ReplicatedOp,
    RowParallelOp,
    SequenceColumnParallelOp,
    SequenceRowParallelOp,
)
from moe_ext.platform.npu import NpuRuntime

__all__ = ["DIRECTIONS", "ParallelLinearOptions", "parallel_op_class", "select_parallel_op"]

DIRECTIONS = ("column", "row", "replicated")


@dataclass(frozen=True)
class ParallelLinearOptions:
    """The switches that choose the parallel ops (the reference engine reads them from its config).

    Args:
        mlp_tensor_parallel: dense MLPs use their own TP group across DP
            replicas (``mlp_tp``; ``ParallelConfig.mlp_tensor_parallel_size > 0``).
        oproj_tensor_parallel: the attention output projection uses its own TP
            group across DP replicas (``otp``; ``oproj_tensor_parallel_size > 0``).
        matmul_allreduce: every row-parallel layer not taken by the two above
            fuses its matmul with the all-reduce.
        flashcomm2: the attention output projection is the flashcomm2 op
            (``flashcomm2_oproj_tensor_parallel_size`` set).
        sequence_parallel: hidden states are sharded along tokens over TP
            between layers (flashcomm1): the sequence-parallel ops.
        shared_expert_dp: shared experts run data-parallel (replicated).
        disable_tp: the layer is not tensor-parallel at all (replicated).
        fusion: "auto", "fused" or "unfused": whether matmul + collective
            steps use the fused operators (the reference's matmul +
            reduce-scatter fusion switch, for every fused step); see
            :mod:`moe_ext.parallel.backend`.
    """

    mlp_tensor_parallel: bool = False
    oproj_tensor_parallel: bool = False
    matmul_allreduce: bool = False
    flashcomm2: bool = False
    sequence_parallel: bool = False
    shared_expert_dp: bool = False
    disable_tp: bool = False
    fusion: str = "auto"

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name == "fusion":
                check_choice("ParallelLinearOptions.fusion", self.fusion, FUSION_MODES)
            else:
                check_bool(f"ParallelLinearOptions.{field.name}", getattr(self, field.name))

    @classmethod
    def from_config(cls, config: ParallelConfig, **switches) -> "ParallelLinearOptions":
        """The group switches from a :class:`ParallelConfig`; the others from ``switches``."""
        if not isinstance(config, ParallelConfig):
            raise TypeError(f"ParallelLinearOptions.from_config: config must be a ParallelConfig, got "
                            f"{type(config).__name__}")
        return cls(mlp_tensor_parallel=config.mlp_tensor_parallel_size > 0,
                   oproj_tensor_parallel=config.oproj_tensor_parallel_size > 0,
                   flashcomm2=config.flashcomm2_enabled, **switches)


def parallel_op_class(prefix: str, direction: str, options: ParallelLinearOptions) -> type:
    """The op class the table in the module docstring gives (no groups needed)."""
    if not isinstance(prefix, str):
        raise TypeError(f"parallel_op_class: prefix must be a str, got {type(prefix).__name__}")
    check_choice("parallel_op_class: direction", direction, DIRECTIONS)
    if not isinstance(options, ParallelLinearOptions):
        raise TypeError(f"parallel_op_class: options must be ParallelLinearOptions, got {type(options).__name__}")
    o = options
    if o.disable_tp or ("shared_experts" in prefix and o.shared_expert_dp) or direction == "replicated":
        return ReplicatedOp
    if direction == "column":
        if o.mlp_tensor_parallel and "gate_up_proj" in prefix:
            return MLPColumnParallelOp
        if o.sequence_parallel:
            if "shared_expert" in prefix:
                return ColumnParallelOp
            if any(name in prefix for name in ("gate_up_proj", "in_proj", "qkv_proj", "conv1d")):
                return SequenceColumnParallelOp
        return ColumnParallelOp
    if o.mlp_tensor_parallel and "down_proj" in prefix:
        return MLPRowParallelOp
    if o.oproj_tensor_parallel and "o_proj" in prefix:
        return OProjRowParallelOp
    if o.matmul_allreduce:
        return MatmulAllReduceRowParallelOp
    if o.flashcomm2 and ("o_proj" in prefix or "out_proj" in prefix):
        return Flashcomm2OProjRowParallelOp
    if o.sequence_parallel:
        if "shared_expert" in prefix:
            return RowParallelOp
        if any(name in prefix for name in ("o_proj", "out_proj", "down_proj")):
            return SequenceRowParallelOp
    return RowParallelOp


def select_parallel_op(prefix: str, direction: str, options: Optional[ParallelLinearOptions] = None, *,
                       npu_runtime: Optional[NpuRuntime] = None) -> ParallelLinearOp:
    """The op for layer ``prefix``, on the groups of ``moe_ext.distributed``'s initialised state.

    ``npu_runtime``: use the torch_npu fused operators (see
    :class:`~moe_ext.parallel.backend.LinearBackend`). Raises RuntimeError when
    the state is not initialised or lacks the group the op needs (e.g.
    ``mlp_tensor_parallel`` with ``mlp_tensor_parallel_size == 0``).
    """
    options = options if options is not None else ParallelLinearOptions()
    cls = parallel_op_class(prefix, direction, options)
    backend = LinearBackend(options.fusion, npu_runtime)
    if cls is ReplicatedOp:
        return ReplicatedOp(backend)
    if cls in (MLPColumnParallelOp, MLPRowParallelOp):
        return cls(_state.get_mlp_tp_group(), backend)
    if cls is OProjRowParallelOp:
        return cls(_state.get_otp_group(), backend)
    if cls is Flashcomm2OProjRowParallelOp:
        return cls(_state.get_tp_group(), _state.get_flashcomm2_odp_group(), _state.get_flashcomm2_otp_group(),
                   backend)
    return cls(_state.get_tp_group(), backend)
