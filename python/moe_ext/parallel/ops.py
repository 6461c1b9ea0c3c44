"""The parallel linear op family: how a column-, row-parallel or replicated linear layer communicates.

A module (:mod:`moe_ext.parallel.linear`) owns the weight shard of the group
its op names and delegates ``forward`` to ``op.forward(module, x, ctx)``::

    ParallelLinearOp
    ├── ColumnParallelOp                  TP group: matmul [, all-gather of the output features]
    │   ├── MLPColumnParallelOp           MLP-TP group: all-gather tokens, matmul
    │   └── SequenceColumnParallelOp      TP group: all-gather tokens + unpad (sequence parallel), matmul
    ├── RowParallelOp                     TP group: matmul, all-reduce
    │   ├── MatmulAllReduceRowParallelOp  TP group: fused matmul + all-reduce
    │   ├── SequenceRowParallelOp         TP group: pad, matmul + reduce-scatter (sequence parallel)
    │   ├── MLPRowParallelOp              MLP-TP group: matmul, reduce-scatter tokens
    │   ├── OProjRowParallelOp            O-proj TP group: all-to-all head shards, matmul, reduce-scatter
    │   └── Flashcomm2OProjRowParallelOp  flashcomm2 O-DP all-to-all, matmul, O-TP reduce-scatter,
    │                                     TP all-gather unless sequence parallel
    └── ReplicatedOp                      no group: the whole weight, no communication

Conventions, for every op:

- inputs and outputs are ``[tokens, features]`` (the replicated and plain
  column/row ops also take extra leading dims); fp32, fp16 or bf16;
- the bias is added exactly once per output element: on every rank when each
  rank holds different output elements (column shards, and the rows a
  reduce-scatter leaves: the fused reduce-scatter operators take no bias, so
  it is added after the collective); on rank 0 of the group only before an
  all-reduce (and when ``reduce_results=False`` leaves the sum to the caller);
  not at all with ``skip_bias_add`` (the module returns it instead);
- padding comes from the explicit :class:`~moe_ext.parallel.LinearContext`:
  an op that needs equal, divisible token counts pads with ``ctx.pad_size``
  zero rows and drops them again where the output is unsharded along tokens;
  a token count that does not divide raises ``ArgumentError`` on every rank
  before any collective;
- every step is differentiable through ``moe_ext.parallel._collectives``,
  except the fused operators, which :mod:`moe_ext.parallel.backend` uses only
  when autograd does not record the call. Gradient convention (that of
  ``moe_ext.distributed.functional``): an output every member holds
  identically carries one loss; a replicated input's gradient is summed over
  the members. Parameters held by several members (a row op's bias, added on
  rank 0 or after the reduce-scatter; flashcomm2's weight shard on its O-DP
  peers) get partial gradients whose sum over those members is the gradient,
  as for any replicated parameter.

Where the reference engine's ops (Ascend inference engine's custom linear ops)
break, these do better: the O-proj TP op there splits an unsharded input and
then reshapes it as if it were whole (here the input is the whole per-token
input, checked); the flashcomm2 op there drops ``pad_size`` rows from every
rank's *sharded* output when sequence parallelism is on (here the padding is
dropped only after the all-gather; the sharded output keeps it, in the last
rank's rows); the MLP-TP column op there ignores ``gather_output`` (here it is
refused); and the flashcomm2 op works with a single O-TP group, where the
reference's group setup fails (``moe_ext.distributed`` accepts that config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional

import torch
import torch.nn.functional as F

from moe_ext.distributed.group import ParallelGroup
from moe_ext.errors import ArgumentError
from moe_ext.parallel import _collectives
from moe_ext.parallel.backend import LinearBackend, all_gather_linear, linear_all_reduce, linear_reduce_scatter
from moe_ext.parallel.context import LinearContext

if TYPE_CHECKING:  # pragma: no cover
    from moe_ext.parallel.linear import _ParallelLinearBase

__all__ = [
    "ParallelLinearOp", "ColumnParallelOp", "MLPColumnParallelOp", "SequenceColumnParallelOp",
    "RowParallelOp", "MatmulAllReduceRowParallelOp", "SequenceRowParallelOp", "MLPRowParallelOp",
    "OProjRowParallelOp", "Flashcomm2OProjRowParallelOp", "ReplicatedOp",
]


def _check_group(name: str, group) -> ParallelGroup:
    if not isinstance(group, ParallelGroup):
        raise TypeError(f"{name} must be a moe_ext.distributed.ParallelGroup, got {type(group).__name__}")
    return group


def _check_2d(op: str, x: torch.Tensor, features: int, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != features:
        raise ArgumentError(f"{op}: x must be [tokens, {features}] ({what}), got {tuple(x.shape)}")


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, rows)) if rows else x


def _check_divisible(op: str, rows: int, size: int, ctx: LinearContext, group: ParallelGroup) -> None:
    if rows % size:
        raise ArgumentError(f"{op}: tokens + ctx.pad_size must be a multiple of the {group.name!r} group size "
                            f"{size}, got {rows} (pad_size={ctx.pad_size}); build the context with "
                            f"build_linear_context(num_tokens, multiple_of={size})")


def _check_equal_counts(op: str, rows: int, group: ParallelGroup, ctx: LinearContext) -> None:
    if not ctx.check_token_counts:
        return
    counts = _collectives.gather_counts(rows, group)
    if len(set(counts)) > 1:
        raise ArgumentError(f"{op}: every member of the {group.name!r} group must bring the same number of "
                            f"rows (tokens + ctx.pad_size), got {counts}; pad to the group's maximum with "
                            f"build_linear_context(num_tokens, group=...)")


class ParallelLinearOp:
    """Base of the op family: the group whose shard the module owns and the backend of the fused steps.

    ``group`` (a :class:`~moe_ext.distributed.ParallelGroup`, None for the
    replicated op) decides the shard: ``shard_rank`` / ``shard_size``.
    Subclasses set ``direction`` ("column", "row" or "replicated") and
    implement :meth:`forward`, which returns the output with the bias applied
    (unless ``module.skip_bias_add``).
    """

    direction: ClassVar[str] = ""
    supports_w8a8: ClassVar[bool] = False  # only SequenceRowParallelOp consults module.quant

    def __init__(self, group: Optional[ParallelGroup], backend: Optional[LinearBackend] = None) -> None:
        self.group = _check_group(f"{type(self).__name__}: group", group) if group is not None else None
        if backend is not None and not isinstance(backend, LinearBackend):
            raise TypeError(f"{type(self).__name__}: backend must be a LinearBackend, got {type(backend).__name__}")
        self.backend = backend if backend is not None else LinearBackend()

    @property
    def shard_group(self) -> Optional[ParallelGroup]:
        """The group the weight is sharded over (None: not sharded)."""
        return self.group

    @property
    def shard_rank(self) -> int:
        return self.shard_group.rank_in_group if self.shard_group is not None else 0

    @property
    def shard_size(self) -> int:
        return self.shard_group.world_size if self.shard_group is not None else 1

    def check_module(self, module: "_ParallelLinearBase") -> None:
        """Refuse module settings this op cannot honour (called when the module is built)."""

    def forward(self, module: "_ParallelLinearBase", x: torch.Tensor, ctx: LinearContext) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        group = f"{self.group.name}:{self.group.world_size}" if self.group is not None else "none"
        return f"{type(self).__name__}(group={group}, fusion={self.backend.fusion!r})"

    # -- helpers shared by the family -------------------------------------------------------
    def _backend_for(self, ctx: LinearContext) -> LinearBackend:
        """The op's backend, with the context's per-forward ``fusion`` override applied."""
        if ctx.fusion is None or ctx.fusion == self.backend.fusion:
            return self.backend
        return LinearBackend(ctx.fusion, self.backend.npu)

    @staticmethod
    def _bias(module) -> Optional[torch.Tensor]:
        return None if module.skip_bias_add else module.bias

    def _bias_on_first_rank(self, module, group: Optional[ParallelGroup]) -> Optional[torch.Tensor]:
        """The bias for a sum over ``group``: on its rank 0 only."""
        if group is not None and group.rank_in_group != 0:
            return None
        return self._bias(module)

    def _add_bias(self, module, out: torch.Tensor) -> torch.Tensor:
        bias = self._bias(module)
        return out + bias if bias is not None else out


# ---------------------------------------------------------------------------------- column
class ColumnParallelOp(ParallelLinearOp):
    """Plain column parallelism on the TP group: ``y = x W_shard^T + b_shard`` [..., out / tp].

    ``gather_output``: all-gather the output features, [..., out].
    """

    direction = "column"

    def __init__(self, tp_group: ParallelGroup, backend: Optional[LinearBackend] = None) -> None:
        super().__init__(tp_group, backend)

    def _gather_features(self, module, out: torch.Tensor) -> torch.Tensor:
        if not module.gather_output:
            return out
        return _collectives.all_gather(out, -1, self.group, replicated_output=True)

    def forward(self, module, x, ctx):
        x = _collectives.copy_to_group(x, self.group)  # every member uses the whole x: gradients sum
        return self._gather_features(module, F.linear(x, module.weight, self._bias(module)))


class MLPColumnParallelOp(ColumnParallelOp):
    """MLP tensor parallelism across DP replicas, column half (``gate_up_proj``).

    x: [tokens, in], this replica's tokens; every member must bring the same
    number of rows after ``ctx.pad_size`` zero rows are appended. The tokens
    of the MLP-TP group are all-gathered (member order) and multiplied by this
    rank's column shard: [size * (tokens + pad), out / size]. Pair it with
    :class:`MLPRowParallelOp`, which scatters the rows back and drops the pad.
    ``gather_output`` is refused: the output is sharded along tokens *and*
    features.
    """

    def check_module(self, module):
        if module.gather_output:
            raise ArgumentError("MLPColumnParallelOp: gather_output must be False (its output is the MLP-TP "
                                "group's tokens with this rank's features), got True")

    def forward(self, module, x, ctx):
        _check_2d("MLPColumnParallelOp", x, module.input_size, "the full input features")
        x = _pad_rows(x, ctx.pad_size)
        _check_equal_counts("MLPColumnParallelOp", x.shape[0], self.group, ctx)
        return all_gather_linear(x, module.weight, self._bias(module), self.group, self._backend_for(ctx))


class SequenceColumnParallelOp(ColumnParallelOp):
    """Column parallelism with sequence-parallel input (``qkv_proj``, ``gate_up_proj``, ``in_proj``, ``conv1d``).

    With ``ctx.sequence_parallel``: x [(tokens + pad) / tp, in] is this rank's
    token shard; it is all-gathered over TP (fused with the matmul where the
    backend can), the ``ctx.pad_size`` padding rows are dropped, and the
    output is [tokens, out / tp] (or [tokens, out] with ``gather_output``).
    Without: the plain column op.
    """

    def forward(self, module, x, ctx):
        if not ctx.sequence_parallel or self.group.world_size == 1:
            return super().forward(module, x, ctx)
        _check_2d("SequenceColumnParallelOp", x, module.input_size, "this rank's token shard, all features")
        out = all_gather_linear(x, module.weight, self._bias(module), self.group, self._backend_for(ctx))
        if ctx.pad_size:
            if ctx.pad_size > out.shape[0]:
                raise ArgumentError(f"SequenceColumnParallelOp: ctx.pad_size must be <= the gathered tokens "
                                    f"{out.shape[0]}, got {ctx.pad_size}")
            out = out[: out.shape[0] - ctx.pad_size]
        return self._gather_features(module, out)


# ------------------------------------------------------------------------------------- row
class RowParallelOp(ParallelLinearOp):
    """Plain row parallelism on the TP group: ``sum over TP of x_shard W_shard^T`` + bias, [..., out].

    x: [..., in / tp] with ``input_is_parallel``, else [..., in] (this rank's
    slice of the last dim is taken). ``reduce_results=False`` returns this
    rank's partial sum (bias on rank 0 only, so the caller's sum has it once).
    """

    direction = "row"

    def __init__(self, tp_group: ParallelGroup, backend: Optional[LinearBackend] = None) -> None:
        super().__init__(tp_group, backend)

    def _input_shard(self, module, x: torch.Tensor, group: Optional[ParallelGroup] = None) -> torch.Tensor:
        """This rank's slice of the input features, split over ``group`` (default: the shard group)."""
        group = group if group is not None else self.shard_group
        size = group.world_size if group is not None else 1
        local = module.input_size // size
        if module.input_is_parallel:
            if x.shape[-1] != local:
                raise ArgumentError(f"{type(self).__name__}: with input_is_parallel, x's last dim must be "
                                    f"input_size / {size} = {local}, got {tuple(x.shape)}")
            return x
        if x.shape[-1] != module.input_size:
            raise ArgumentError(f"{type(self).__name__}: without input_is_parallel, x's last dim must be "
                                f"input_size = {module.input_size}, got {tuple(x.shape)}")
        if group is None:
            return x
        return _collectives.split(x, -1, group)  # x replicated: backward gathers the slices' gradients

    def forward(self, module, x, ctx):
        x = self._input_shard(module, x)
        bias = self._bias_on_first_rank(module, self.group)
        if not module.reduce_results:
            return F.linear(x, module.weight, bias)
        return _collectives.all_reduce(F.linear(x, module.weight, bias), self.group)


class MatmulAllReduceRowParallelOp(RowParallelOp):
    """Row parallelism with the matmul and the all-reduce fused (``npu_mm_all_reduce_base`` on A2 NPUs).

    Same contract as :class:`RowParallelOp`; elsewhere (no fused operator) the
    unfused pair, unless the backend's ``fusion="fused"`` demands the fusion.
    """

    def forward(self, module, x, ctx):
        x = self._input_shard(module, x)
        bias = self._bias_on_first_rank(module, self.group)
        if not module.reduce_results:
            return F.linear(x, module.weight, bias)
        return linear_all_reduce(x, module.weight, bias, self.group, self._backend_for(ctx))


class SequenceRowParallelOp(RowParallelOp):
    """Row parallelism with sequence-parallel output (``o_proj``, ``out_proj``, ``down_proj``).

    x: [tokens, in / tp] (or [tokens, in] without ``input_is_parallel``).
    With ``ctx.sequence_parallel``: ``ctx.pad_size`` zero rows are appended,
    the matmul and the reduce-scatter over TP run fused where the backend can,
    the bias is added after, and the output is this rank's token shard
    [(tokens + pad) / tp, out]. Without sequence parallelism: the plain row
    op (all-reduce). TP size 1 or ``reduce_results=False``: just the matmul.
    """

    supports_w8a8 = True

    def forward(self, module, x, ctx):
        if not ctx.sequence_parallel or self.group.world_size == 1 or not module.reduce_results:
            if module.quant is not None:
                raise ArgumentError("SequenceRowParallelOp: the w8a8 quant state is wired for the "
                                    "sequence-parallel matmul + reduce-scatter only (ctx.sequence_parallel, "
                                    "TP > 1, reduce_results); this call takes the float path")
            return super().forward(module, x, ctx)
        x = self._input_shard(module, x)
        if x.dim() != 2:
            raise ArgumentError(f"SequenceRowParallelOp: x must be [tokens, features], got {tuple(x.shape)}")
        x = _pad_rows(x, ctx.pad_size)
        _check_divisible("SequenceRowParallelOp", x.shape[0], self.group.world_size, ctx, self.group)
        if module.quant is not None:
            out = module.quant.matmul_reduce_scatter(x, self.group, self._backend_for(ctx))
        else:
            out = linear_reduce_scatter(x, module.weight, self.group, self._backend_for(ctx))
        return self._add_bias(module, out)


class MLPRowParallelOp(RowParallelOp):
    """MLP tensor parallelism across DP replicas, row half (``down_proj``).

    x: [size * rows, in / size] (the output of :class:`MLPColumnParallelOp`,
    or [size * rows, in] without ``input_is_parallel``): matmul with this
    rank's input-feature shard, reduce-scatter of the rows over the MLP-TP
    group (fused where the backend can), bias, then the ``ctx.pad_size``
    padding rows are dropped: [tokens, out], this replica's tokens.
    ``reduce_results=False`` is refused: the reduce-scatter is the op.
    """

    def check_module(self, module):
        if not module.reduce_results:
            raise ArgumentError("MLPRowParallelOp: reduce_results must be True (the op is a reduce-scatter "
                                "over the MLP-TP group), got False")

    def forward(self, module, x, ctx):
        x = self._input_shard(module, x)
        if x.dim() != 2:
            raise ArgumentError(f"MLPRowParallelOp: x must be [tokens, features], got {tuple(x.shape)}")
        _check_divisible("MLPRowParallelOp", x.shape[0], self.group.world_size, ctx, self.group)
        out = self._add_bias(module, linear_reduce_scatter(x, module.weight, self.group, self._backend_for(ctx)))
        return _drop_pad("MLPRowParallelOp", out, ctx)


def _drop_pad(op: str, out: torch.Tensor, ctx: LinearContext) -> torch.Tensor:
    if not ctx.pad_size:
        return out
    if ctx.pad_size > out.shape[0]:
        raise ArgumentError(f"{op}: ctx.pad_size must be <= the rows {out.shape[0]}, got {ctx.pad_size}")
    return out[: out.shape[0] - ctx.pad_size]


class OProjRowParallelOp(RowParallelOp):
    """Attention output projection with its own TP group across DP replicas (``o_proj``).

    x: [tokens, in], the whole attention output of this replica's tokens
    (``input_is_parallel`` is not consulted: the all-to-all does the split).
    With ``ctx.pad_size`` zero rows appended (every member must then hold the
    same rows), an all-to-all over the O-proj TP group gives every member its
    slice of the input features for the group's tokens; matmul with this
    rank's shard, reduce-scatter of the rows, bias, drop the padding:
    [tokens, out]. ``reduce_results=False`` is refused.
    """

    check_module = MLPRowParallelOp.check_module

    def forward(self, module, x, ctx):
        _check_2d("OProjRowParallelOp", x, module.input_size, "the whole input of this replica's tokens")
        size = self.group.world_size
        x = _pad_rows(x, ctx.pad_size)
        _check_equal_counts("OProjRowParallelOp", x.shape[0], self.group, ctx)
        rows, local = x.shape[0], module.input_size // size
        # [rows, size * local] -> [size, rows, local]: block p holds member p's features.
        send = x.reshape(rows, size, local).transpose(0, 1).reshape(size * rows, local)
        received = _collectives.all_to_all_single(send, self.group)  # [size * rows, local], member-major rows
        out = self._add_bias(module, linear_reduce_scatter(received, module.weight, self.group, self._backend_for(ctx)))
        return _drop_pad("OProjRowParallelOp", out, ctx)


class Flashcomm2OProjRowParallelOp(RowParallelOp):
    """Flashcomm2 attention output projection (``o_proj`` / ``out_proj``).

    Groups (``moe_ext.distributed``): the TP group (size T), the flashcomm2
    O-DP group (size n = T / o, the blocks of n consecutive TP ranks) and the
    O-TP group (size o, TP ranks ``i, i + n, ...``; None when o == 1). TP rank
    ``r = j n + i`` is O-DP rank i of block j and O-TP rank j of group i. The
    weight is sharded over O-TP: rank j holds input features
    ``[j in / o, (j + 1) in / o)`` (the whole weight when o == 1).

    x: [tokens, in / T], this TP rank's head shard (or [tokens, in] without
    ``input_is_parallel``), the same tokens on every TP rank. After
    ``ctx.pad_size`` zero rows (tokens + pad must divide by T) the rows are cut
    into T chunks; an all-to-all on O-DP sends chunk ``j' n + i`` to O-DP rank
    i, so each rank gets the head block j of the chunks ``i, n + i, ...``;
    matmul; reduce-scatter over O-TP (fused where the backend can; skipped
    when o == 1) leaves chunk r, the TP rank's own, with bias. Output: with
    ``ctx.sequence_parallel`` that shard, [(tokens + pad) / T, out]; else the
    all-gather over TP without the padding, [tokens, out].
    """

    def __init__(self, tp_group: ParallelGroup, odp_group: ParallelGroup, otp_group: Optional[ParallelGroup],
                 backend: Optional[LinearBackend] = None) -> None:
        super().__init__(tp_group, backend)
        self.odp_group = _check_group("Flashcomm2OProjRowParallelOp: odp_group", odp_group)
        self.otp_group = (_check_group("Flashcomm2OProjRowParallelOp: otp_group", otp_group)
                          if otp_group is not None else None)
        tp, n = tp_group.world_size, odp_group.world_size
        o = self.otp_group.world_size if self.otp_group is not None else 1
        if n * o != tp or (o == 1) != (self.otp_group is None):
            raise ArgumentError(f"Flashcomm2OProjRowParallelOp: O-DP size * O-TP size must equal the TP size "
                                f"{tp} (O-TP group None exactly when its size is 1), got {n} * {o}")
        j, i = divmod(tp_group.rank_in_group, n)
        if odp_group.rank_in_group != i or (self.otp_group is not None and self.otp_group.rank_in_group != j):
            raise ArgumentError("Flashcomm2OProjRowParallelOp: TP rank r must be O-DP rank r % n and O-TP rank "
                                f"r // n (moe_ext.distributed's flashcomm2 layout); got TP rank "
                                f"{tp_group.rank_in_group}, O-DP rank {odp_group.rank_in_group}, O-TP rank "
                                f"{self.otp_group.rank_in_group if self.otp_group is not None else 0}")
        # Chunk ids in send order: for O-DP destination i, the chunks j' n + i, j' = 0..o-1.
        self._send_order = [jj * n + ii for ii in range(n) for jj in range(o)]

    @property
    def shard_group(self) -> Optional[ParallelGroup]:
        return self.otp_group

    def check_module(self, module):
        MLPRowParallelOp.check_module(self, module)
        if module.input_size % self.group.world_size:
            raise ArgumentError(f"Flashcomm2OProjRowParallelOp: input_size must be a multiple of the TP size "
                                f"{self.group.world_size} (one head shard per TP rank), got {module.input_size}")

    def forward(self, module, x, ctx):
        tp = self.group.world_size
        n, o = self.odp_group.world_size, tp // self.odp_group.world_size
        x = self._input_shard(module, x, self.group)  # the head shard of this TP rank
        if x.dim() != 2:
            raise ArgumentError(f"Flashcomm2OProjRowParallelOp: x must be [tokens, features], got {tuple(x.shape)}")
        tokens = x.shape[0]
        x = _pad_rows(x, ctx.pad_size)
        _check_divisible("Flashcomm2OProjRowParallelOp", x.shape[0], tp, ctx, self.group)
        chunk, width = x.shape[0] // tp, x.shape[1]
        order = torch.tensor(self._send_order, device=x.device)
        send = x.view(tp, chunk, width).index_select(0, order).reshape(tp * chunk, width)
        received = _collectives.all_to_all_single(send, self.odp_group)  # [n * o * chunk, width], peer-major
        # Peer i' sent its head shard (TP rank j n + i'): side by side they are head block j.
        block = received.view(n, o * chunk, width).transpose(0, 1).reshape(o * chunk, n * width)
        if self.otp_group is not None:
            out = linear_reduce_scatter(block, module.weight, self.otp_group, self._backend_for(ctx))
        else:
            out = F.linear(block, module.weight)
        out = self._add_bias(module, out)  # [chunk, out]: TP rank r's rows
        if ctx.sequence_parallel:
            return out
        return _collectives.all_gather(out, 0, self.group, replicated_output=True)[:tokens]


# ------------------------------------------------------------------------------ replicated
class ReplicatedOp(ParallelLinearOp):
    """No sharding, no communication: ``F.linear(x, W, b)`` with the whole weight."""

    direction = "replicated"

    def __init__(self, backend: Optional[LinearBackend] = None) -> None:
        super().__init__(None, backend)

    def forward(self, module, x, ctx):
        return F.linear(x, module.weight, self._bias(module))
