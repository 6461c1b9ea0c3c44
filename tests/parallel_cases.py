"""Cases of the multi-process parallel-linear tests: every op against a dense nn.Linear.

Each case runs on one group (the op's): every rank builds, from fixed seeds,
the inputs of *every* member of its group, computes the members' expected
outputs with one dense ``nn.Linear`` on the full weight, and the dense loss;
it then runs its own share through the parallel module and compares the
output, and after ``backward`` of its own ``<out, g_m>`` the input and
parameter gradients.

The loss follows moe_ext.distributed.functional's convention: an output that
every member holds identically (after an all-reduce or a replicated gather)
carries one loss, the same ``g`` on every member, counted once in the dense
loss; a sharded output carries each member's own ``g_k``, summed. Parameters
held by several members (a row op's bias, flashcomm2's weight shard on its
O-DP peers) get partial gradients whose sum over those members is the
gradient: the test sums them (an all-reduce) before comparing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_ext.distributed import (ParallelConfig, destroy_parallel_state, get_flashcomm2_odp_group,
                                  get_flashcomm2_otp_group, get_mlp_tp_group, get_otp_group, get_tp_group,
                                  init_parallel_state)
from moe_ext.errors import ArgumentError
from moe_ext.parallel import (ColumnParallelLinear, ColumnParallelOp, Flashcomm2OProjRowParallelOp, LinearBackend,
                              LinearContext, MatmulAllReduceRowParallelOp, MLPColumnParallelOp, MLPRowParallelOp,
                              OProjRowParallelOp, ParallelLinearOptions, ReplicatedLinear, ReplicatedOp,
                              RowParallelLinear, RowParallelOp, SequenceColumnParallelOp, SequenceRowParallelOp,
                              build_linear_context, select_parallel_op)

IN, OUT = 8, 12
ATOL = RTOL = 1e-5


def device_for(rank: int) -> torch.device:
    return torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def _rand(seed: int, *shape, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device)


def _close(actual, expected, what):
    torch.testing.assert_close(actual.detach().float().cpu(), expected.detach().float().cpu(), atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{what}: {m}")


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    if group is not None and group.world_size > 1:
        dist.all_reduce(t, group=group.device_group)
    return t


class _Dense:
    """The full layer as one nn.Linear (fp32), with leaves for the gradients."""

    def __init__(self, seed: int, bias: bool, device, in_features: int = IN, out_features: int = OUT):
        self.linear = nn.Linear(in_features, out_features, bias=bias, device=device)
        with torch.no_grad():
            self.linear.weight.copy_(_rand(seed, out_features, in_features, device=device))
            if bias:
                self.linear.bias.copy_(_rand(seed + 1, out_features, device=device))

    def __call__(self, x, skip_bias_add: bool):
        if skip_bias_add and self.linear.bias is not None:
            return x @ self.linear.weight.t()
        return self.linear(x)


def _check_grads(label, module, dense, weight_view, bias_view, weight_sum_group=None, bias_sum_group=None):
    _close(_sum_over(module.weight.grad, weight_sum_group), weight_view(dense.linear.weight.grad),
           f"{label}: weight grad")
    if module.bias is not None:
        if module.skip_bias_add:
            assert module.bias.grad is None, f"{label}: a skipped bias must get no gradient"
        else:
            grad = module.bias.grad if module.bias.grad is not None else torch.zeros_like(module.bias)
            _close(_sum_over(grad, bias_sum_group), bias_view(dense.linear.bias.grad), f"{label}: bias grad")


def _finish(label, module, out, out_bias, expected, g_mine, dense_loss, skip, backward):
    """Compare the output and the returned bias; run both backwards."""
    _close(out, expected, f"{label}: output")
    if module.skip_bias_add:
        assert out_bias is module.bias, f"{label}: skip_bias_add must return the bias"
    else:
        assert out_bias is None, f"{label}: output_bias must be None without skip_bias_add"
    if backward:
        dense_loss.backward()
        (out * g_mine).sum().backward()


def _loss_terms(seed, expected, replicated, device):
    """(g per member, dense loss): one shared g for a replicated output, one per member otherwise."""
    if replicated:
        g = _rand(seed, *expected[0].shape, device=device)
        return [g] * len(expected), (expected[0] * g).sum()
    gs = [_rand(seed + k, *e.shape, device=device) for k, e in enumerate(expected)]
    return gs, sum((e * g).sum() for e, g in zip(expected, gs))


def _load(module, dense):
    module.load_full_weights(dense.linear.weight.detach(),
                             dense.linear.bias.detach() if dense.linear.bias is not None else None)
    return module


def _variants():
    return [(False, False), (True, False), (True, True)]  # (bias, skip_bias_add)


# ----------------------------------------------------------------------------------- cases
def case_column(rank, device, backend, backward, gather_output):
    group = get_tp_group()
    s, m = group.world_size, group.rank_in_group
    tokens, local = 5, OUT // s
    for bias, skip in _variants():
        label = f"ColumnParallelOp(gather_output={gather_output}, bias={bias}, skip={skip}, tp={s})"
        dense = _Dense(11, bias, device)
        module = _load(ColumnParallelLinear(IN, OUT, op=ColumnParallelOp(group, backend), bias=bias,
                                            gather_output=gather_output, skip_bias_add=skip, device=device), dense)
        X = _rand(12, tokens, IN, device=device).requires_grad_(backward)
        full = dense(X, skip)
        expected = [full if gather_output else full[:, k * local:(k + 1) * local] for k in range(s)]
        gs, loss = _loss_terms(100, expected, gather_output, device)
        x = X.detach().clone().requires_grad_(backward)
        out, ob = module(x)
        _finish(label, module, out, ob, expected[m], gs[m], loss, skip, backward)
        if backward:
            _close(x.grad, X.grad, f"{label}: x grad")
            _check_grads(label, module, dense, lambda w: w[m * local:(m + 1) * local],
                         lambda b: b[m * local:(m + 1) * local])


def case_row(rank, device, backend, backward, op_cls, input_is_parallel, reduce_results):
    group = get_tp_group()
    s, m = group.world_size, group.rank_in_group
    tokens, local = 5, IN // s
    for bias, skip in _variants():
        label = (f"{op_cls.__name__}(input_is_parallel={input_is_parallel}, reduce_results={reduce_results}, "
                 f"bias={bias}, skip={skip}, tp={s})")
        dense = _Dense(21, bias, device)
        module = _load(RowParallelLinear(IN, OUT, op=op_cls(group, backend), bias=bias,
                                         input_is_parallel=input_is_parallel, reduce_results=reduce_results,
                                         skip_bias_add=skip, device=device), dense)
        X = _rand(22, tokens, IN, device=device).requires_grad_(backward)
        full = dense(X, skip)
        gs, loss = _loss_terms(200, [full] * s, True, device)
        x = X.detach()[:, m * local:(m + 1) * local] if input_is_parallel else X.detach()
        x = x.clone().requires_grad_(backward)
        out, ob = module(x)
        if not reduce_results:  # partial sums: their sum over the group is the layer's output
            out = _sum_over_autograd(out, group)
        _finish(label, module, out, ob, full, gs[m], loss, skip, backward)
        if backward:
            _close(x.grad, X.grad[:, m * local:(m + 1) * local] if input_is_parallel else X.grad, f"{label}: x grad")
            _check_grads(label, module, dense, lambda w: w[:, m * local:(m + 1) * local], lambda b: b,
                         bias_sum_group=group)


def _sum_over_autograd(x, group):
    from moe_ext.parallel import _collectives
    return _collectives.all_reduce(x, group)


def case_sequence(rank, device, backend, backward, tokens):
    """SequenceColumnParallelOp then SequenceRowParallelOp with sequence parallelism on (and off)."""
    group = get_tp_group()
    s, m = group.world_size, group.rank_in_group
    for sp in (True, False):
        ctx = build_linear_context(tokens, multiple_of=s, sequence_parallel=sp)
        padded = tokens + ctx.pad_size
        chunk = padded // s
        for bias, skip in _variants():
            label = f"Sequence ops(sp={sp}, tokens={tokens}, bias={bias}, skip={skip}, tp={s})"
            d1, d2 = _Dense(31, bias, device), _Dense(33, bias, device, OUT, IN)
            col = _load(ColumnParallelLinear(IN, OUT, op=SequenceColumnParallelOp(group, backend), bias=bias,
                                             skip_bias_add=skip, device=device), d1)
            row = _load(RowParallelLinear(OUT, IN, op=SequenceRowParallelOp(group, backend), bias=bias,
                                          skip_bias_add=skip, device=device), d2)
            X = _rand(34, tokens, IN, device=device).requires_grad_(backward)
            hidden = d1(X, skip)
            Y = d2(hidden, skip)
            if sp:  # rows of the padded result, this rank's chunk (padding rows: zero input -> bias only)
                Ypad = torch.cat([Y, d2(torch.zeros(ctx.pad_size, OUT, device=device), skip)])
                expected = [Ypad[k * chunk:(k + 1) * chunk] for k in range(s)]
                Xpad = torch.cat([X.detach(), torch.zeros(ctx.pad_size, IN, device=device)])
                x = Xpad[m * chunk:(m + 1) * chunk].clone().requires_grad_(backward)
            else:
                expected = [Y] * s
                x = X.detach().clone().requires_grad_(backward)
            gs, loss = _loss_terms(300, expected, not sp, device)
            h, _ = col(x, ctx)  # with skip_bias_add the reference skips the bias too
            out, ob = row(h, ctx)
            _finish(label, row, out, ob, expected[m], gs[m], loss, skip, backward)
            if backward:
                x_grad = (torch.cat([X.grad, torch.zeros(ctx.pad_size, IN, device=device)])[m * chunk:(m + 1) * chunk]
                          if sp else X.grad)
                _close(x.grad, x_grad, f"{label}: x grad")
                local_out, local_in = OUT // s, OUT // s
                _check_grads(label + " column", col, d1, lambda w: w[m * local_out:(m + 1) * local_out],
                             lambda b: b[m * local_out:(m + 1) * local_out])
                _check_grads(label + " row", row, d2, lambda w: w[:, m * local_in:(m + 1) * local_in], lambda b: b,
                             bias_sum_group=group)


def case_mlp_tp(rank, device, backend, backward):
    """gate_up (MLPColumnParallelOp) then down (MLPRowParallelOp) across DP replicas, uneven tokens padded."""
    group = get_mlp_tp_group()
    s, m = group.world_size, group.rank_in_group
    counts = [3 + 2 * k for k in range(s)]
    ctx = build_linear_context(counts[m], group=group, check_token_counts=True)
    assert ctx.pad_size == max(counts) - counts[m]
    for bias, skip in _variants():
        label = f"MLP-TP ops(bias={bias}, skip={skip}, mlp_tp={s}, tokens={counts})"
        d1, d2 = _Dense(41, bias, device), _Dense(43, bias, device, OUT, IN)
        col = _load(ColumnParallelLinear(IN, OUT, op=MLPColumnParallelOp(group, backend), bias=bias,
                                         skip_bias_add=skip, device=device), d1)
        row = _load(RowParallelLinear(OUT, IN, op=MLPRowParallelOp(group, backend), bias=bias, skip_bias_add=skip,
                                      device=device), d2)
        Xs = [_rand(400 + k, counts[k], IN, device=device).requires_grad_(backward) for k in range(s)]
        expected = [d2(d1(X, skip), skip) for X in Xs]
        gs, loss = _loss_terms(450, expected, False, device)
        x = Xs[m].detach().clone().requires_grad_(backward)
        h, _ = col(x, ctx)  # with skip_bias_add the reference skips the bias too
        assert h.shape == (s * max(counts), OUT // s), f"{label}: column output shape {tuple(h.shape)}"
        out, ob = row(h, ctx)
        _finish(label, row, out, ob, expected[m], gs[m], loss, skip, backward)
        if backward:
            local = OUT // s
            _close(x.grad, Xs[m].grad, f"{label}: x grad")
            _check_grads(label + " column", col, d1, lambda w: w[m * local:(m + 1) * local],
                         lambda b: b[m * local:(m + 1) * local])
            _check_grads(label + " row", row, d2, lambda w: w[:, m * local:(m + 1) * local], lambda b: b,
                         bias_sum_group=group)


def case_oproj_tp(rank, device, backend, backward):
    group = get_otp_group()
    s, m = group.world_size, group.rank_in_group
    counts = [4 + k for k in range(s)]
    ctx = build_linear_context(counts[m], group=group)
    for bias, skip in _variants():
        label = f"OProjRowParallelOp(bias={bias}, skip={skip}, otp={s}, tokens={counts})"
        dense = _Dense(51, bias, device)
        module = _load(RowParallelLinear(IN, OUT, op=OProjRowParallelOp(group, backend), bias=bias,
                                         skip_bias_add=skip, device=device), dense)
        Xs = [_rand(500 + k, counts[k], IN, device=device).requires_grad_(backward) for k in range(s)]
        expected = [dense(X, skip) for X in Xs]
        gs, loss = _loss_terms(550, expected, False, device)
        x = Xs[m].detach().clone().requires_grad_(backward)
        out, ob = module(x, ctx)
        _finish(label, module, out, ob, expected[m], gs[m], loss, skip, backward)
        if backward:
            local = IN // s
            _close(x.grad, Xs[m].grad, f"{label}: x grad")
            _check_grads(label, module, dense, lambda w: w[:, m * local:(m + 1) * local], lambda b: b,
                         bias_sum_group=group)


def case_flashcomm2(rank, device, backend, backward, tokens, input_is_parallel=True):
    tp = get_tp_group()
    odp, otp = get_flashcomm2_odp_group(), get_flashcomm2_otp_group()
    T, r = tp.world_size, tp.rank_in_group
    o = otp.world_size if otp is not None else 1
    j = otp.rank_in_group if otp is not None else 0
    for sp in (False, True):
        ctx = build_linear_context(tokens, multiple_of=T, sequence_parallel=sp)
        padded = tokens + ctx.pad_size
        chunk = padded // T
        for bias, skip in _variants():
            label = (f"Flashcomm2OProjRowParallelOp(sp={sp}, tokens={tokens}, bias={bias}, skip={skip}, tp={T}, "
                     f"otp={o}, input_is_parallel={input_is_parallel})")
            dense = _Dense(61, bias, device)
            op = Flashcomm2OProjRowParallelOp(tp, odp, otp, backend)
            module = _load(RowParallelLinear(IN, OUT, op=op, bias=bias, skip_bias_add=skip,
                                             input_is_parallel=input_is_parallel, device=device), dense)
            assert module.weight.shape == (OUT, IN // o)
            X = _rand(62, tokens, IN, device=device).requires_grad_(backward)
            Y = dense(X, skip)
            if sp:
                Ypad = torch.cat([Y, dense(torch.zeros(ctx.pad_size, IN, device=device), skip)])
                expected = [Ypad[k * chunk:(k + 1) * chunk] for k in range(T)]
            else:
                expected = [Y] * T
            gs, loss = _loss_terms(600, expected, not sp, device)
            head = IN // T
            x = X.detach()[:, r * head:(r + 1) * head] if input_is_parallel else X.detach()
            x = x.clone().requires_grad_(backward)
            out, ob = module(x, ctx)
            _finish(label, module, out, ob, expected[r], gs[r], loss, skip, backward)
            if backward:
                _close(x.grad, X.grad[:, r * head:(r + 1) * head] if input_is_parallel else X.grad, f"{label}: x grad")
                block = IN // o
                # The weight shard j is held by the n O-DP peers (different tokens): sum over O-DP.
                _check_grads(label, module, dense, lambda w: w[:, j * block:(j + 1) * block], lambda b: b,
                             weight_sum_group=odp, bias_sum_group=tp)


def case_replicated(rank, device, backend, backward):
    for bias, skip in _variants():
        label = f"ReplicatedOp(bias={bias}, skip={skip})"
        dense = _Dense(71, bias, device)
        module = _load(ReplicatedLinear(IN, OUT, bias=bias, skip_bias_add=skip, device=device), dense)
        X = _rand(72, 2, 3, IN, device=device).requires_grad_(backward)
        expected = dense(X, skip)
        g = _rand(73, *expected.shape, device=device)
        x = X.detach().clone().requires_grad_(backward)
        out, ob = module(x)
        _finish(label, module, out, ob, expected, g, (expected * g).sum(), skip, backward)
        if backward:
            _close(x.grad, X.grad, f"{label}: x grad")
            _check_grads(label, module, dense, lambda w: w, lambda b: b)
    # return_bias=False returns the output alone; the "TP disabled" column layer is whole.
    dense = _Dense(74, True, device)
    module = _load(ColumnParallelLinear(IN, OUT, op=ReplicatedOp(backend), return_bias=False, device=device), dense)
    X = _rand(75, 3, IN, device=device)
    with torch.no_grad():
        _close(module(X), dense(X, False), "ColumnParallelLinear with ReplicatedOp")


def case_refusals(rank, device, backend):
    """Documented refusals, raised on every rank before any collective."""
    tp = get_tp_group()
    s = tp.world_size
    seq_row = RowParallelLinear(IN, OUT, op=SequenceRowParallelOp(tp, backend), device=device)
    bad = LinearContext(pad_size=0, sequence_parallel=True)
    x = torch.zeros(s + 1, IN // s, device=device)
    if s > 1:
        try:
            seq_row(x, bad)
        except ArgumentError as error:
            assert "multiple of" in str(error) and "pad_size=0" in str(error), str(error)
        else:
            raise AssertionError("SequenceRowParallelOp accepted a token count that does not divide")
    try:
        ColumnParallelLinear(IN, OUT, op=ColumnParallelOp(tp, backend), device=device)(torch.zeros(2, IN + 1,
                                                                                                 device=device))
    except RuntimeError:
        pass  # F.linear's own shape error
    else:
        raise AssertionError("a wrong input width was accepted")


def case_uneven_refused(rank, device, backend):
    """MLP-TP with different row counts and check_token_counts: ArgumentError on every member."""
    group = get_mlp_tp_group()
    col = ColumnParallelLinear(IN, OUT, op=MLPColumnParallelOp(group, backend), device=device)
    rows = 2 + group.rank_in_group
    try:
        col(torch.zeros(rows, IN, device=device), LinearContext(check_token_counts=True))
    except ArgumentError as error:
        assert "same number of rows" in str(error), str(error)
    else:
        raise AssertionError("uneven MLP-TP token counts were accepted")


def case_select(rank, device, backend_unused):
    """select_parallel_op builds each op on the registry's groups."""
    options = ParallelLinearOptions(mlp_tensor_parallel=True, oproj_tensor_parallel=True)
    assert isinstance(select_parallel_op("layers.0.mlp.gate_up_proj", "column", options), MLPColumnParallelOp)
    op = select_parallel_op("layers.0.self_attn.o_proj", "row", options)
    assert isinstance(op, OProjRowParallelOp) and op.group is get_otp_group()
    op = select_parallel_op("layers.0.self_attn.qkv_proj", "column", options)
    assert type(op) is ColumnParallelOp and op.group is get_tp_group()
    assert isinstance(select_parallel_op("x.down_proj", "row", ParallelLinearOptions(matmul_allreduce=True)),
                      MatmulAllReduceRowParallelOp)


# ---------------------------------------------------------------------------------- driver
def run_configs(rank, world_size, plan, fusion="unfused"):
    """``plan``: [(ParallelConfig kwargs, [case names])]. Returns the cases run, per config."""
    device = device_for(rank)
    backend = LinearBackend(fusion=fusion)
    backward = torch.is_grad_enabled() and fusion != "fused"
    done = []
    for config_kwargs, cases in plan:
        init_parallel_state(ParallelConfig(**config_kwargs))
        try:
            for name in cases:
                CASES[name](rank, device, backend, backward) if name not in _NO_GRAD_ARG else \
                    CASES[name](rank, device, backend)
                done.append(name)
        finally:
            destroy_parallel_state()
    return done


def run_configs_fused(rank, world_size, plan):
    """The forward checks with the fused operators demanded (no autograd: they have no backward)."""
    with torch.no_grad():
        return run_configs(rank, world_size, plan, fusion="fused")


def run_configs_symm_mem_reference(rank, world_size, plan):
    """The CUDA fused wiring on gloo: torch's own reference implementations of the symmetric-memory
    operators (``_fused_*_fallback``, the same contract on any device) stand in for the CUDA kernels,
    so everything around the kernel call (shapes, argument order, bias, padding) runs here."""
    import torch.distributed._symmetric_memory as symm_mem
    from moe_ext.parallel import backend as backend_module
    backend_module._cuda_reason = lambda x, weight, group: None
    backend_module._ensure_symm_mem = lambda group: group.device_group.group_name
    backend_module._symm_mem_matmul_reduce_scatter = (
        lambda x, weight_t, name: symm_mem._fused_matmul_reduce_scatter_fallback(x, weight_t, "sum", 0, name))
    backend_module._symm_mem_all_gather_matmul = (
        lambda x, weight_t, name: symm_mem._fused_all_gather_matmul_fallback(x, [weight_t], 0, name,
                                                                             return_A=True)[1][0])
    calls = {"rs": 0, "ag": 0}
    rs, ag = backend_module._symm_mem_matmul_reduce_scatter, backend_module._symm_mem_all_gather_matmul

    def count(key, fn):
        def wrapped(*args):
            calls[key] += 1
            return fn(*args)
        return wrapped
    backend_module._symm_mem_matmul_reduce_scatter = count("rs", rs)
    backend_module._symm_mem_all_gather_matmul = count("ag", ag)
    done = run_configs_fused(rank, world_size, plan)
    assert calls["rs"] > 0 and calls["ag"] > 0, calls
    return done


CASES = {
    "column": lambda r, d, b, g: case_column(r, d, b, g, False),
    "column_gather": lambda r, d, b, g: case_column(r, d, b, g, True),
    "row": lambda r, d, b, g: case_row(r, d, b, g, RowParallelOp, True, True),
    "row_split": lambda r, d, b, g: case_row(r, d, b, g, RowParallelOp, False, True),
    "row_partial": lambda r, d, b, g: case_row(r, d, b, g, RowParallelOp, True, False),
    "mm_allreduce": lambda r, d, b, g: case_row(r, d, b, g, MatmulAllReduceRowParallelOp, True, True),
    "sequence": lambda r, d, b, g: case_sequence(r, d, b, g, 5),
    "sequence_even": lambda r, d, b, g: case_sequence(r, d, b, g, 8),
    "mlp_tp": case_mlp_tp,
    "oproj_tp": case_oproj_tp,
    "flashcomm2": lambda r, d, b, g: case_flashcomm2(r, d, b, g, 5),
    "flashcomm2_split": lambda r, d, b, g: case_flashcomm2(r, d, b, g, 8, input_is_parallel=False),
    "replicated": case_replicated,
    "refusals": case_refusals,
    "uneven_refused": case_uneven_refused,
    "select": case_select,
}
_NO_GRAD_ARG = {"refusals", "uneven_refused", "select"}
