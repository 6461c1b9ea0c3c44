"""moe_ext.parallel: the selection table, the options, and every op against a dense nn.Linear.

The multi-process part spawns one group per world size (2 and 4 ranks, gloo;
$MOE_EXT_TEST_BACKEND=nccl runs the 2-rank plan on two GPUs, also with the
fused operators demanded) and runs, per ParallelConfig, the cases of
tests/parallel_cases.py: TP x DP combinations, flashcomm2 with O-TP 1, 2 and a
single O-TP group under layer sharding, MLP-TP and O-proj TP across DP with
uneven token counts.
"""

from __future__ import annotations

import pytest
import torch

from moe_ext.distributed import ParallelConfig
from moe_ext.errors import ArgumentError
from moe_ext.parallel import (ColumnParallelLinear, ColumnParallelOp, Flashcomm2OProjRowParallelOp, LinearBackend,
                              LinearContext, MatmulAllReduceRowParallelOp, MLPColumnParallelOp, MLPRowParallelOp,
                              OProjRowParallelOp, ParallelLinearOptions, ReplicatedLinear, ReplicatedOp,
                              RowParallelOp, SequenceColumnParallelOp, SequenceRowParallelOp, build_linear_context,
                              parallel_op_class)
from moe_ext.testing.distributed import run_distributed
from moe_ext.testing.distributed import test_backend as backend_under_test

import parallel_cases

O = ParallelLinearOptions
SP = dict(sequence_parallel=True)
# (prefix, direction, options, expected op class): the table of moe_ext.parallel.select, row by row.
TABLE = [
    # disabled TP and data-parallel shared experts: replicated, whatever else is on
    ("model.layers.0.mlp.gate_up_proj", "column", O(disable_tp=True, mlp_tensor_parallel=True), ReplicatedOp),
    ("model.layers.0.self_attn.o_proj", "row", O(disable_tp=True, oproj_tensor_parallel=True), ReplicatedOp),
    ("layers.1.mlp.shared_experts.down_proj", "row", O(shared_expert_dp=True, mlp_tensor_parallel=True),
     ReplicatedOp),
    ("layers.1.mlp.shared_experts.gate_up_proj", "column", O(shared_expert_dp=True, **SP), ReplicatedOp),
    ("layers.1.mlp.shared_expert.gate_up_proj", "column", O(shared_expert_dp=True), ColumnParallelOp),
    ("layers.1.mlp.shared_experts.down_proj", "row", O(), RowParallelOp),
    ("lm_head", "replicated", O(), ReplicatedOp),
    ("lm_head", "replicated", O(**SP, mlp_tensor_parallel=True), ReplicatedOp),
    # column
    ("layers.0.mlp.gate_up_proj", "column", O(mlp_tensor_parallel=True), MLPColumnParallelOp),
    ("layers.0.mlp.gate_up_proj", "column", O(mlp_tensor_parallel=True, **SP), MLPColumnParallelOp),
    ("layers.0.mlp.gate_up_proj", "column", O(), ColumnParallelOp),
    ("layers.0.mlp.gate_up_proj", "column", O(**SP), SequenceColumnParallelOp),
    ("layers.0.mlp.shared_expert.gate_up_proj", "column", O(**SP), ColumnParallelOp),
    ("layers.0.mlp.shared_experts.gate_up_proj", "column", O(**SP), ColumnParallelOp),
    ("layers.0.mixer.in_proj", "column", O(**SP), SequenceColumnParallelOp),
    ("layers.0.self_attn.qkv_proj", "column", O(**SP), SequenceColumnParallelOp),
    ("layers.0.self_attn.qkv_proj", "column", O(mlp_tensor_parallel=True), ColumnParallelOp),
    ("layers.0.mixer.conv1d", "column", O(**SP), SequenceColumnParallelOp),
    ("layers.0.self_attn.q_a_proj", "column", O(**SP), ColumnParallelOp),
    ("layers.0.self_attn.o_proj", "column", O(**SP, oproj_tensor_parallel=True), ColumnParallelOp),
    # row
    ("layers.0.mlp.down_proj", "row", O(mlp_tensor_parallel=True), MLPRowParallelOp),
    ("layers.0.mlp.down_proj", "row", O(mlp_tensor_parallel=True, matmul_allreduce=True, **SP), MLPRowParallelOp),
    ("layers.0.self_attn.o_proj", "row", O(oproj_tensor_parallel=True), OProjRowParallelOp),
    ("layers.0.self_attn.o_proj", "row", O(oproj_tensor_parallel=True, matmul_allreduce=True, flashcomm2=True),
     OProjRowParallelOp),
    ("layers.0.self_attn.out_proj", "row", O(oproj_tensor_parallel=True), RowParallelOp),
    ("layers.0.mlp.down_proj", "row", O(oproj_tensor_parallel=True), RowParallelOp),
    ("layers.0.mlp.down_proj", "row", O(matmul_allreduce=True), MatmulAllReduceRowParallelOp),
    ("layers.0.self_attn.o_proj", "row", O(matmul_allreduce=True, flashcomm2=True, **SP),
     MatmulAllReduceRowParallelOp),
    ("anything.at.all", "row", O(matmul_allreduce=True), MatmulAllReduceRowParallelOp),
    ("layers.0.self_attn.o_proj", "row", O(flashcomm2=True), Flashcomm2OProjRowParallelOp),
    ("layers.0.linear_attn.out_proj", "row", O(flashcomm2=True, **SP), Flashcomm2OProjRowParallelOp),
    ("layers.0.mlp.down_proj", "row", O(flashcomm2=True), RowParallelOp),
    ("layers.0.mlp.down_proj", "row", O(flashcomm2=True, **SP), SequenceRowParallelOp),
    ("layers.0.self_attn.o_proj", "row", O(**SP), SequenceRowParallelOp),
    ("layers.0.linear_attn.out_proj", "row", O(**SP), SequenceRowParallelOp),
    ("layers.0.mlp.shared_expert.down_proj", "row", O(**SP), RowParallelOp),
    ("layers.0.mlp.experts.down_proj", "row", O(**SP), SequenceRowParallelOp),
    ("layers.0.self_attn.o_proj", "row", O(), RowParallelOp),
    ("layers.0.self_attn.kv_b_proj", "row", O(**SP), RowParallelOp),
]


@pytest.mark.parametrize("prefix, direction, options, expected", TABLE)
def test_selection_table(prefix, direction, options, expected):
    assert parallel_op_class(prefix, direction, options) is expected


def test_selection_table_covers_every_op():
    ops = {row[3] for row in TABLE}
    assert ops == {ReplicatedOp, ColumnParallelOp, MLPColumnParallelOp, SequenceColumnParallelOp, RowParallelOp,
                   MLPRowParallelOp, OProjRowParallelOp, MatmulAllReduceRowParallelOp, Flashcomm2OProjRowParallelOp,
                   SequenceRowParallelOp}


def test_options_and_arguments_are_checked():
    with pytest.raises(TypeError, match="sequence_parallel must be a bool"):
        ParallelLinearOptions(sequence_parallel=1)
    with pytest.raises(ArgumentError, match="fusion must be one of"):
        ParallelLinearOptions(fusion="always")
    with pytest.raises(ArgumentError, match="direction must be one of"):
        parallel_op_class("x", "diagonal", O())
    with pytest.raises(TypeError, match="options must be ParallelLinearOptions"):
        parallel_op_class("x", "row", {"sequence_parallel": True})
    with pytest.raises(ArgumentError, match="pad_size must be >= 0"):
        LinearContext(pad_size=-1)
    with pytest.raises(ArgumentError, match="multiple_of must be >= 1"):
        build_linear_context(3, multiple_of=0)
    assert build_linear_context(5, multiple_of=4).pad_size == 3
    assert build_linear_context(8, multiple_of=4, sequence_parallel=True) == LinearContext(0, True)
    with pytest.raises(ArgumentError, match="fusion must be one of"):
        LinearBackend(fusion="yes")
    with pytest.raises(ArgumentError, match="LinearContext.fusion must be one of"):
        LinearContext(fusion="sometimes")
    assert build_linear_context(3, fusion="unfused").fusion == "unfused"
    options = ParallelLinearOptions.from_config(
        ParallelConfig(4, 2, 2, mlp_tensor_parallel_size=2, flashcomm2_oproj_tensor_parallel_size=1),
        sequence_parallel=True)
    assert options == O(mlp_tensor_parallel=True, flashcomm2=True, sequence_parallel=True)


def test_module_arguments_are_checked():
    with pytest.raises(TypeError, match="op must be"):
        ColumnParallelLinear(4, 4, op="tp")
    with pytest.raises(ArgumentError, match="op must be a replicated op"):
        ReplicatedLinear(4, 4, op=_FakeRowOp())
    layer = ReplicatedLinear(4, 6)
    with pytest.raises(ArgumentError, match=r"full shape \(6, 4\)"):
        layer.weight_loader(layer.weight, torch.zeros(4, 6))
    with pytest.raises(ArgumentError, match="no bias"):
        ReplicatedLinear(4, 6, bias=False).load_full_weights(torch.zeros(6, 4), torch.zeros(6))
    with pytest.raises(TypeError, match="ctx must be a LinearContext"):
        layer(torch.zeros(2, 4), {"pad_size": 0})
    with pytest.raises(ArgumentError, match="input_size must be >= 1"):
        ReplicatedLinear(0, 4)


def test_backend_decisions():
    from moe_ext.parallel import backend
    assert backend._decide("step", LinearBackend("auto"), None) is True
    assert backend._decide("step", LinearBackend("auto"), "no operator") is False
    assert backend._decide("step", LinearBackend("unfused"), None) is False
    with pytest.raises(ArgumentError, match="fusion='fused' but the fused operator cannot take this call: why"):
        backend._decide("step", LinearBackend("fused"), "why")
    x, w = torch.zeros(4, 8), torch.zeros(6, 8)
    assert "CUDA tensors" in backend._cuda_reason(x, w, None)
    with pytest.raises(TypeError, match="LinearBackend.npu must be an NpuRuntime"):
        LinearBackend(npu="torch_npu")


class _FakeRowOp(RowParallelOp):
    def __init__(self):  # no group needed for the direction check
        self.group, self.backend = None, LinearBackend()


# ------------------------------------------------------------------------- multi-process
ALL_TP = ["column", "column_gather", "row", "row_split", "row_partial", "mm_allreduce", "sequence",
          "sequence_even", "replicated", "refusals"]
PLANS = {
    2: [
        # TP 2: a single flashcomm2 O-TP group with layer sharding (refused by the reference).
        (dict(world_size=2, tensor_parallel_size=2, data_parallel_size=1, flashcomm2_oproj_tensor_parallel_size=2,
              layer_sharding=True), ALL_TP + ["flashcomm2", "flashcomm2_split"]),
        (dict(world_size=2, tensor_parallel_size=2, data_parallel_size=1, flashcomm2_oproj_tensor_parallel_size=1),
         ["flashcomm2", "flashcomm2_split"]),
        # DP 2: MLP-TP and O-proj TP across the replicas, uneven token counts.
        (dict(world_size=2, tensor_parallel_size=1, data_parallel_size=2, mlp_tensor_parallel_size=2,
              oproj_tensor_parallel_size=2), ["mlp_tp", "oproj_tp", "uneven_refused", "select", "column", "row"]),
    ],
    4: [
        (dict(world_size=4, tensor_parallel_size=2, data_parallel_size=2, mlp_tensor_parallel_size=2,
              oproj_tensor_parallel_size=2, flashcomm2_oproj_tensor_parallel_size=2),
         ["column", "row_split", "sequence", "mlp_tp", "oproj_tp", "flashcomm2", "select"]),
        (dict(world_size=4, tensor_parallel_size=4, data_parallel_size=1, flashcomm2_oproj_tensor_parallel_size=2,
              layer_sharding=True), ["column_gather", "row_partial", "sequence", "flashcomm2", "flashcomm2_split",
                                     "refusals"]),
        (dict(world_size=4, tensor_parallel_size=4, data_parallel_size=1, flashcomm2_oproj_tensor_parallel_size=1),
         ["flashcomm2"]),
        (dict(world_size=4, tensor_parallel_size=4, data_parallel_size=1, flashcomm2_oproj_tensor_parallel_size=4,
              layer_sharding=True), ["flashcomm2"]),
        (dict(world_size=4, tensor_parallel_size=1, data_parallel_size=4, mlp_tensor_parallel_size=4,
              oproj_tensor_parallel_size=2), ["mlp_tp", "oproj_tp", "uneven_refused"]),
    ],
}
# The fused CUDA operators (forward only): every op with a matmul + reduce-scatter or all-gather + matmul step.
FUSED_PLAN = [
    (dict(world_size=2, tensor_parallel_size=2, data_parallel_size=1, flashcomm2_oproj_tensor_parallel_size=2,
          layer_sharding=True), ["sequence", "sequence_even", "flashcomm2"]),
    (dict(world_size=2, tensor_parallel_size=1, data_parallel_size=2, mlp_tensor_parallel_size=2,
          oproj_tensor_parallel_size=2), ["mlp_tp", "oproj_tp"]),
]


def _needs_ranks(world_size):
    if backend_under_test() == "nccl":
        if world_size > 2:
            pytest.skip("4-rank cases run on gloo only")
        if torch.cuda.device_count() < world_size:
            pytest.skip(f"needs {world_size} GPUs")


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_every_op_matches_dense_linear(world_size):
    _needs_ranks(world_size)
    plan = PLANS[world_size]
    done = run_distributed(parallel_cases.run_configs, world_size, plan, backend=backend_under_test(), timeout=300)
    expected = [name for _, names in plan for name in names]
    assert all(ran == expected for ran in done), done


@pytest.mark.distributed
def test_fused_cuda_wiring_with_torchs_reference_operators():
    """The fused (symmetric-memory) path of every op, on gloo, with torch's reference implementations
    of the two operators in place of the CUDA kernels: checks moe_ext's wiring, not the kernels."""
    import torch.distributed._symmetric_memory as symm_mem
    if not all(hasattr(symm_mem, name) for name in ("_fused_matmul_reduce_scatter_fallback",
                                                    "_fused_all_gather_matmul_fallback")):
        pytest.skip(f"torch {torch.__version__} has no reference symm_mem fused operators")
    if backend_under_test() == "nccl":
        pytest.skip("the CUDA kernels themselves are tested by test_fused_cuda_operators_match_dense_linear")
    done = run_distributed(parallel_cases.run_configs_symm_mem_reference, 2, FUSED_PLAN, timeout=300)
    assert all(ran == [n for _, names in FUSED_PLAN for n in names] for ran in done), done


@pytest.mark.cuda
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_fused_cuda_operators_match_dense_linear():
    """fusion='fused' on NCCL: the symmetric-memory fused operators, forward, against the dense layer."""
    from moe_ext.parallel import cuda_fused_ops_available
    if not cuda_fused_ops_available():
        pytest.skip(f"torch {torch.__version__} has no symm_mem fused matmul operators")
    done = run_distributed(parallel_cases.run_configs_fused, 2, FUSED_PLAN, backend="nccl", timeout=300)
    assert all(ran == [n for _, names in FUSED_PLAN for n in names] for ran in done), done
