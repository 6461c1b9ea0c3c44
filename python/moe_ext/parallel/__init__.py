"""Parallel layers for MoE models: tensor-parallel linear layers and expert-parallel training styles.

Linear layers (tensor parallelism on moe_ext.distributed's groups):

- :mod:`moe_ext.parallel.linear` — ``ColumnParallelLinear``, ``RowParallelLinear``,
  ``ReplicatedLinear``: own their weight shard, load it from the full checkpoint
  tensor, delegate ``forward`` to an op;
- :mod:`moe_ext.parallel.ops` — the ops (MLP TP, O-proj TP, flashcomm2, matmul +
  all-reduce, sequence parallel, replicated);
- :mod:`moe_ext.parallel.select` — ``select_parallel_op(prefix, direction, options)``;
- :mod:`moe_ext.parallel.backend` — the matmul + collective steps, fused on NPU
  (torch_npu) and CUDA (symmetric memory) where possible;
- :mod:`moe_ext.parallel.context` — the explicit per-forward context (padding,
  sequence parallelism).

Expert parallelism (training):

- :mod:`moe_ext.parallel.expert_parallel` — ``GroupedExperts``, ``TokenReorderer`` and the DTensor
  styles ``TensorParallel``, ``ExpertParallel``, ``ExpertTensorParallel``,
  ``ReordererSequenceParallel``;
- :mod:`moe_ext.parallel.torchtitan_dispatcher` — ``MoeExtTokenDispatcher`` for torchtitan 0.3
  (imported on its own: it needs torchtitan).
"""

from moe_ext.parallel.backend import FUSION_MODES, LinearBackend, cuda_fused_ops_available
from moe_ext.parallel.context import LinearContext, build_linear_context
from moe_ext.parallel.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
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
from moe_ext.parallel.quant import W8A8RowQuant
from moe_ext.parallel.select import DIRECTIONS, ParallelLinearOptions, parallel_op_class, select_parallel_op

__all__ = [
    "FUSION_MODES", "LinearBackend", "cuda_fused_ops_available", "LinearContext", "build_linear_context",
    "ColumnParallelLinear", "RowParallelLinear", "ReplicatedLinear",
    "ParallelLinearOp", "ColumnParallelOp", "MLPColumnParallelOp", "SequenceColumnParallelOp", "RowParallelOp",
    "MatmulAllReduceRowParallelOp", "SequenceRowParallelOp", "MLPRowParallelOp", "OProjRowParallelOp",
    "Flashcomm2OProjRowParallelOp", "ReplicatedOp",
    "W8A8RowQuant", "DIRECTIONS", "ParallelLinearOptions", "parallel_op_class", "select_parallel_op",
]
