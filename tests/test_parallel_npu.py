"""moe_ext.parallel's torch_npu call sites, run against moe_ext.testing.npu's emulation on 2 gloo ranks.

npu_mm_all_reduce_base (MatmulAllReduceRowParallelOp) and
npu_mm_reduce_scatter_base (the sequence-parallel, MLP-TP, O-proj TP and
flashcomm2 row ops, and the w8a8 path), on emulated A2 and A3 runtimes:
outputs against a dense float32 layer on the same bf16 values, the operator
call counts, the documented refusals (A3 has no matmul + all-reduce, k below
256, float32, autograd), and the emulation's own strictness. This checks the
wiring against the operators' documented contracts, not the hardware.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ext.distributed import ParallelConfig, destroy_parallel_state, get_group, get_tp_group, init_parallel_state
from moe_ext.errors import ArgumentError
from moe_ext.parallel import (Flashcomm2OProjRowParallelOp, LinearBackend, LinearContext,
                              MatmulAllReduceRowParallelOp, MLPRowParallelOp, OProjRowParallelOp, RowParallelLinear,
                              SequenceRowParallelOp, W8A8RowQuant, build_linear_context)
from moe_ext.platform import npu as npu_platform
from moe_ext.testing.distributed import run_distributed
from moe_ext.testing.npu import emulated_runtime

IN, OUT = 512, 64
BF16 = torch.bfloat16


def _rand(seed, *shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _close(actual, expected, what, tol=2e-2):
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _raises(exc, fragment, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as error:
        assert fragment in str(error), f"{fragment!r} not in {error}"
        return
    raise AssertionError(f"expected {exc.__name__} ({fragment})")


def _weights(seed):
    """Full bf16 weight and bias, and their float32 values (the dense reference's)."""
    weight, bias = _rand(seed, OUT, IN, scale=0.05).to(BF16), _rand(seed + 1, OUT).to(BF16)
    return weight, bias, weight.float(), bias.float()


def _row(op, *, bias=True):
    return RowParallelLinear(IN, OUT, op=op, bias=bias, return_bias=False, params_dtype=BF16)


def _mm_all_reduce(runtime_a2, runtime_a3):
    tp = get_tp_group()
    s, m = tp.world_size, tp.rank_in_group
    weight, bias, w32, b32 = _weights(1)
    X = _rand(2, 6, IN).to(BF16)
    x = X[:, m * IN // s:(m + 1) * IN // s]
    expected = X.float() @ w32.t() + b32
    for runtime in (runtime_a2, runtime_a3):
        before = runtime.ops.calls.get("npu_mm_all_reduce_base", 0)
        module = _row(MatmulAllReduceRowParallelOp(tp, LinearBackend("auto", runtime)))
        module.load_full_weights(weight, bias)
        with torch.no_grad():
            _close(module(x), expected, f"MatmulAllReduce on {runtime.soc_version}")
        fused = runtime.ops.calls.get("npu_mm_all_reduce_base", 0) - before
        assert fused == (1 if runtime.soc_version == "A2" else 0), (runtime.soc_version, fused)
    # The fused operator exists on A2 only; it has no backward; float32 is not among its dtypes.
    _raises(ArgumentError, "A2 only", _row(MatmulAllReduceRowParallelOp(tp, LinearBackend("fused", runtime_a3))),
            x)
    grad_module = _row(MatmulAllReduceRowParallelOp(tp, LinearBackend("fused", runtime_a2)))
    _raises(ArgumentError, "no backward", grad_module, x)
    auto = _row(MatmulAllReduceRowParallelOp(tp, LinearBackend("auto", runtime_a2)))
    auto.load_full_weights(weight, bias)
    before = runtime_a2.ops.calls["npu_mm_all_reduce_base"]
    out = auto(x)  # autograd records it: the unfused, differentiable pair
    out.float().sum().backward()
    assert runtime_a2.ops.calls["npu_mm_all_reduce_base"] == before and auto.weight.grad is not None
    _close(out, expected, "MatmulAllReduce, autograd (unfused)")
    f32 = RowParallelLinear(IN, OUT, op=MatmulAllReduceRowParallelOp(tp, LinearBackend("fused", runtime_a2)))
    with torch.no_grad():
        _raises(ArgumentError, "float16/bfloat16", f32, x.float())
    # reduce_results=False: the partial sums, no operator call.
    partial = RowParallelLinear(IN, OUT, op=MatmulAllReduceRowParallelOp(tp, LinearBackend("fused", runtime_a2)),
                                reduce_results=False, return_bias=False, params_dtype=BF16)
    partial.load_full_weights(weight, bias)
    with torch.no_grad():
        summed = partial(x).float()
    dist.all_reduce(summed, group=tp.device_group)
    _close(summed, expected, "MatmulAllReduce, reduce_results=False")


def _sequence_row(runtime, tokens):
    tp = get_tp_group()
    s, m = tp.world_size, tp.rank_in_group
    weight, bias, w32, b32 = _weights(3)
    ctx = build_linear_context(tokens, multiple_of=s, sequence_parallel=True)
    X = _rand(4, tokens, IN).to(BF16)
    padded = torch.cat([X.float(), torch.zeros(ctx.pad_size, IN)])
    chunk = padded.shape[0] // s
    expected = (padded @ w32.t() + b32)[m * chunk:(m + 1) * chunk]
    before = runtime.ops.calls.get("npu_mm_reduce_scatter_base", 0)
    module = _row(SequenceRowParallelOp(tp, LinearBackend("fused", runtime)))
    module.load_full_weights(weight, bias)
    with torch.no_grad():
        _close(module(X[:, m * IN // s:(m + 1) * IN // s], ctx), expected, f"SequenceRow on {runtime.soc_version}")
        # k = IN / s must lie in [256, 65535): a narrower layer cannot take the fused operator.
        narrow = RowParallelLinear(2 * s, OUT, op=SequenceRowParallelOp(tp, LinearBackend("fused", runtime)),
                                   params_dtype=BF16)
        _raises(ArgumentError, "k in [256, 65535)", narrow, torch.zeros(s, 2, dtype=BF16), LinearContext(0, True))
    assert runtime.ops.calls["npu_mm_reduce_scatter_base"] == before + 1
    # The context's per-forward switch overrides the op's backend: unfused, same result, no call.
    unfused = LinearContext(ctx.pad_size, True, fusion="unfused")
    with torch.no_grad():
        _close(module(X[:, m * IN // s:(m + 1) * IN // s], unfused), expected, "SequenceRow, ctx fusion='unfused'")
    assert runtime.ops.calls["npu_mm_reduce_scatter_base"] == before + 1


def _w8a8(runtime, fusion):
    tp = get_tp_group()
    s, m = tp.world_size, tp.rank_in_group
    tokens = 5
    ctx = build_linear_context(tokens, multiple_of=s, sequence_parallel=True)
    weight_q = torch.randint(-127, 128, (OUT, IN), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    weight_scale = torch.rand(OUT, generator=torch.Generator().manual_seed(6)) * 0.01 + 0.001
    quant_bias = torch.randint(-500, 500, (OUT,), generator=torch.Generator().manual_seed(7), dtype=torch.int32)
    input_scale, input_offset = 0.02, 3.0
    X = _rand(8, tokens, IN).to(BF16)
    module = _row(SequenceRowParallelOp(tp, LinearBackend(fusion, runtime)))
    W8A8RowQuant.from_checkpoint(module, weight_q, weight_scale, input_scale, input_offset, quant_bias)
    padded = torch.cat([X.float(), torch.zeros(ctx.pad_size, IN)])
    x_q = npu_platform.quantize_per_tensor(padded, torch.tensor([1 / input_scale]), torch.tensor([input_offset]))
    deq = weight_scale.double() * input_scale
    dense = ((x_q.double() @ weight_q.double().t() + quant_bias.double()) * deq).float()
    chunk = padded.shape[0] // s
    before = runtime.ops.calls.get("npu_mm_reduce_scatter_base", 0) if runtime is not None else 0
    with torch.no_grad():
        out = module(X[:, m * IN // s:(m + 1) * IN // s], ctx)
    assert out.dtype == BF16
    _close(out, dense[m * chunk:(m + 1) * chunk], f"w8a8 ({fusion}, {runtime and runtime.soc_version})")
    if runtime is not None:
        assert runtime.ops.calls["npu_mm_reduce_scatter_base"] == before + (fusion != "unfused")
    _raises(ArgumentError, "wired for the sequence-parallel", module, X[:, :IN // s], LinearContext())


def _dp_ops(runtime):
    """MLP-TP and O-proj TP row ops with the fused reduce-scatter (TP 1, DP 2)."""
    for family, cls in (("mlp_tp", MLPRowParallelOp), ("otp", OProjRowParallelOp)):
        group = get_group(family)
        s, m = group.world_size, group.rank_in_group
        weight, bias, w32, b32 = _weights(9)
        module = _row(cls(group, LinearBackend("fused", runtime)))
        module.load_full_weights(weight, bias)
        counts = [3, 4]
        ctx = build_linear_context(counts[m], group=group)
        before = runtime.ops.calls.get("npu_mm_reduce_scatter_base", 0)
        with torch.no_grad():
            if cls is MLPRowParallelOp:  # input: the group's padded tokens, this rank's features
                Xs = [torch.cat([_rand(10 + k, counts[k], IN), torch.zeros(max(counts) - counts[k], IN)]).to(BF16)
                      for k in range(s)]
                out = module(torch.cat(Xs)[:, m * IN // s:(m + 1) * IN // s], ctx)
                expected = Xs[m][:counts[m]].float() @ w32.t() + b32
            else:
                X = _rand(20 + m, counts[m], IN).to(BF16)
                out = module(X, ctx)
                expected = X.float() @ w32.t() + b32
        _close(out, expected, f"{cls.__name__} on {runtime.soc_version}")
        assert runtime.ops.calls["npu_mm_reduce_scatter_base"] == before + 1


def _flashcomm2(runtime):
    tp = get_tp_group()
    odp, otp = get_group("flashcomm2_odp"), get_group("flashcomm2_otp")
    s, m = tp.world_size, tp.rank_in_group
    weight, bias, w32, b32 = _weights(11)
    module = _row(Flashcomm2OProjRowParallelOp(tp, odp, otp, LinearBackend("fused", runtime)))
    module.load_full_weights(weight, bias)
    X = _rand(12, 7, IN).to(BF16)
    before = runtime.ops.calls.get("npu_mm_reduce_scatter_base", 0)
    with torch.no_grad():
        out = module(X[:, m * IN // s:(m + 1) * IN // s], build_linear_context(7, multiple_of=s))
    _close(out, X.float() @ w32.t() + b32, f"Flashcomm2 on {runtime.soc_version}")
    assert runtime.ops.calls["npu_mm_reduce_scatter_base"] == before + 1


def _emulation_strictness(runtime_a2, runtime_a3):
    tp = get_tp_group()
    ops2, ops3 = runtime_a2.ops, runtime_a3.ops
    name2 = npu_platform.hccl_comm_name(runtime_a2, tp.device_group, tp.rank)
    name3 = npu_platform.hccl_comm_name(runtime_a3, tp.device_group, tp.rank)
    x = torch.ones(4, 256, dtype=BF16)
    w = torch.ones(256, 8, dtype=BF16)
    # all-reduce form
    _raises(NotImplementedError, "not emulated", ops2.npu_mm_all_reduce_base, x, w, name2, dequant_scale=torch.ones(8))
    _raises(RuntimeError, "A2 only", ops3.npu_mm_all_reduce_base, x, w, name3)
    _raises(ValueError, "reduce_op", ops2.npu_mm_all_reduce_base, x, w, name2, reduce_op="max")
    _raises(TypeError, "float16/bfloat16", ops2.npu_mm_all_reduce_base, x.float(), w.float(), name2)
    _raises(ValueError, "(k, n)", ops2.npu_mm_all_reduce_base, x, w.t(), name2)
    _raises(ValueError, "bias must be", ops2.npu_mm_all_reduce_base, x, w, name2, bias=torch.ones(7, dtype=BF16))
    _raises(ValueError, "x3 must be", ops2.npu_mm_all_reduce_base, x, w, name2, x3=torch.ones(4, 7, dtype=BF16))
    _raises(ValueError, "unknown HCCL", ops2.npu_mm_all_reduce_base, x, w, "no_such_comm")
    x3 = torch.full((2, 2, 8), 2.0, dtype=BF16)
    out = ops2.npu_mm_all_reduce_base(x.view(2, 2, 256), w, name2, x3=x3)  # 3-D x1, x3 added before the sum
    _close(out, torch.full((2, 2, 8), tp.world_size * 258.0), "npu_mm_all_reduce_base with x3", tol=1e-2)
    # reduce-scatter form
    ws = tp.world_size
    _raises(ValueError, "reduce_op", ops3.npu_mm_reduce_scatter_base, x, w, name3, ws, reduce_op="max")
    _raises(ValueError, "bias is not supported", ops3.npu_mm_reduce_scatter_base, x, w, name3, ws,
            bias=torch.zeros(8, dtype=BF16))
    _raises(NotImplementedError, "x1_scale", ops3.npu_mm_reduce_scatter_base, x, w, name3, ws,
            x1_scale=torch.ones(4))
    _raises(ValueError, "comm_mode", ops3.npu_mm_reduce_scatter_base, x, w, name3, ws, comm_mode="fast")
    _raises(ValueError, "world_size", ops3.npu_mm_reduce_scatter_base, x, w, name3, ws + 1)
    _raises(ValueError, "input must be (m, k)", ops3.npu_mm_reduce_scatter_base, x, w.t(), name3, ws)
    _raises(ValueError, "k must lie", ops3.npu_mm_reduce_scatter_base, x[:, :128], w[:128], name3, ws)
    _raises(ValueError, "m divide", ops3.npu_mm_reduce_scatter_base, x[:3], w, name3, ws)
    xq, wq = torch.ones(4, 256, dtype=torch.int8), torch.ones(256, 8, dtype=torch.int8)
    _raises(ValueError, "comm_mode='aiv'", ops3.npu_mm_reduce_scatter_base, xq, wq, name3, ws)
    _raises(TypeError, "int8 x2", ops3.npu_mm_reduce_scatter_base, xq, w, name3, ws, comm_mode="aiv")
    _raises(NotImplementedError, "float32 x2_scale", ops3.npu_mm_reduce_scatter_base, xq, wq, name3, ws,
            comm_mode="aiv", x2_scale=torch.ones(8, dtype=torch.int64))
    _raises(ValueError, "output_dtype", ops3.npu_mm_reduce_scatter_base, xq, wq, name3, ws, comm_mode="aiv",
            x2_scale=torch.ones(8), output_dtype=torch.float32)
    _raises(TypeError, "of one dtype", ops3.npu_mm_reduce_scatter_base, x.float(), w, name3, ws)
    _raises(ValueError, "belong to the int8 form", ops3.npu_mm_reduce_scatter_base, x, w, name3, ws,
            x2_scale=torch.ones(8))
    out = ops3.npu_mm_reduce_scatter_base(xq, wq, name3, ws, comm_mode="aiv", x2_scale=torch.full((1,), 0.5),
                                          output_dtype=BF16)
    assert out.shape == (4 // ws, 8) and torch.all(out.float() == ws * 128.0), out


def _npu_worker(rank, world_size):
    a2, a3 = emulated_runtime("A2"), emulated_runtime("A3")
    init_parallel_state(ParallelConfig(2, 2, 1, flashcomm2_oproj_tensor_parallel_size=2, layer_sharding=True))
    try:
        _mm_all_reduce(a2, a3)
        for runtime in (a2, a3):
            _sequence_row(runtime, tokens=5)
            _flashcomm2(runtime)
        _w8a8(a2, "fused")
        _w8a8(a3, "auto")
        _w8a8(None, "auto")
        _emulation_strictness(a2, a3)
    finally:
        destroy_parallel_state()
    init_parallel_state(ParallelConfig(2, 1, 2, mlp_tensor_parallel_size=2, oproj_tensor_parallel_size=2))
    try:
        _dp_ops(a3)
    finally:
        destroy_parallel_state()
    return {**a2.ops.calls, **{f"A3 {k}": v for k, v in a3.ops.calls.items()}}


def test_unsupported_reasons_name_the_limit():
    a2, a3 = emulated_runtime("A2"), emulated_runtime("A3")
    for name in ("npu_mm_all_reduce_base", "npu_mm_reduce_scatter_base"):  # reached through the pinned schema
        assert "bound to torch-npu" in repr(getattr(a2.ops, name)), repr(getattr(a2.ops, name))
    x, w = torch.zeros(4, 256, dtype=BF16), torch.zeros(256, 8, dtype=BF16)
    assert npu_platform.mm_all_reduce_unsupported(a2, x, w, 2) is None
    assert "A2 only" in npu_platform.mm_all_reduce_unsupported(a3, x, w, 2)
    assert "world sizes" in npu_platform.mm_all_reduce_unsupported(a2, x, w, 3)
    assert "float16/bfloat16" in npu_platform.mm_all_reduce_unsupported(a2, x.float(), w, 2)
    assert "(k, n)" in npu_platform.mm_all_reduce_unsupported(a2, x, w.t(), 2)
    assert npu_platform.mm_reduce_scatter_unsupported(a3, x, w, 4) is None
    assert "world sizes" in npu_platform.mm_reduce_scatter_unsupported(a2, x, w, 16)
    assert npu_platform.mm_reduce_scatter_unsupported(a3, x, w, 16) is None or "m divisible" in \
        npu_platform.mm_reduce_scatter_unsupported(a3, x, w, 16)
    assert "float16/bfloat16/int8" in npu_platform.mm_reduce_scatter_unsupported(a2, x.float(), w, 2)
    assert "of one dtype" in npu_platform.mm_reduce_scatter_unsupported(a2, x, w.float(), 2)
    assert "(m, k)" in npu_platform.mm_reduce_scatter_unsupported(a2, x, w.t(), 2)
    assert "k in" in npu_platform.mm_reduce_scatter_unsupported(a2, x[:, :8], w[:8], 2)
    assert "m divisible" in npu_platform.mm_reduce_scatter_unsupported(a2, x[:3], w, 2)
    q = npu_platform.quantize_per_tensor(torch.tensor([-10.0, 0.26, 0.74, 10.0]), torch.tensor([20.0]),
                                         torch.tensor([1.0]))
    assert q.dtype == torch.int8 and q.tolist() == [-128, 6, 16, 127]


@pytest.mark.distributed
def test_npu_call_sites_under_the_emulation():
    calls = run_distributed(_npu_worker, 2, timeout=300)
    for rank_calls in calls:
        assert rank_calls["npu_mm_all_reduce_base"] >= 2 and rank_calls["npu_mm_reduce_scatter_base"] >= 3
        assert rank_calls["A3 npu_mm_reduce_scatter_base"] >= 5, rank_calls
