"""Column-, row-parallel and replicated linear modules that own their shard and delegate to an op.

``ColumnParallelLinear(input_size, output_size, op=...)`` holds ``weight``
[output_size / s, input_size] (and ``bias`` [output_size / s]);
``RowParallelLinear`` holds ``weight`` [output_size, input_size / s] and the
whole ``bias`` [output_size]; ``ReplicatedLinear`` the whole weight. ``s`` is
the size of the group the op shards over (``op.shard_size``: the MLP-TP group
for the MLP ops, the O-proj TP group for the O-proj ops, the flashcomm2 O-TP
group for flashcomm2, the TP group otherwise). ``weight_loader(param,
full_tensor)`` keeps this rank's slice of a checkpoint tensor.

``module(x, ctx=None)`` runs ``op.forward(module, x, ctx)``; with
``return_bias`` (the default, as in inference engines) it returns
``(output, output_bias)``, where ``output_bias`` is the bias when
``skip_bias_add`` (the caller adds it, e.g. fused into the next op) and None
otherwise; without ``return_bias`` just the output.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from moe_ext.errors import ArgumentError, check_bool, check_int
from moe_ext.parallel.context import LinearContext
from moe_ext.parallel.ops import ParallelLinearOp, ReplicatedOp

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ReplicatedLinear"]

Output = Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]


class _ParallelLinearBase(nn.Module):
    _direction = ""
    _weight_shard_dim: Optional[int] = None  # dim of weight split over the op's shard group
    _bias_sharded = False

    def __init__(self, input_size: int, output_size: int, *, bias: bool, skip_bias_add: bool, return_bias: bool,
                 op: ParallelLinearOp, params_dtype: Optional[torch.dtype], device, prefix: str) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_size = check_int(f"{name}: input_size", input_size, minimum=1)
        self.output_size = check_int(f"{name}: output_size", output_size, minimum=1)
        check_bool(f"{name}: bias", bias)
        self.skip_bias_add = check_bool(f"{name}: skip_bias_add", skip_bias_add)
        self.return_bias = check_bool(f"{name}: return_bias", return_bias)
        if not isinstance(op, ParallelLinearOp):
            raise TypeError(f"{name}: op must be a moe_ext.parallel ParallelLinearOp, got {type(op).__name__}")
        if op.direction not in (self._direction, "replicated"):
            # A replicated op is the "TP disabled" case: a shard of size 1, the whole weight.
            raise ArgumentError(f"{name}: op must be a {self._direction} op or the replicated op, got "
                                f"{type(op).__name__} ({op.direction})")
        if not isinstance(prefix, str):
            raise TypeError(f"{name}: prefix must be a str, got {type(prefix).__name__}")
        self.op = op
        self.prefix = prefix
        self.quant = None  # set by quantisation helpers (the w8a8 path of SequenceRowParallelOp)
        size = op.shard_size
        sharded = self.output_size if self._weight_shard_dim == 0 else self.input_size
        if self._weight_shard_dim is not None and sharded % size:
            what = "output_size" if self._weight_shard_dim == 0 else "input_size"
            raise ArgumentError(f"{name}: {what} must be a multiple of the {op.shard_group.name!r} group size "
                                f"{size} that {type(op).__name__} shards over, got {sharded}")
        shape = [self.output_size, self.input_size]
        if self._weight_shard_dim is not None:
            shape[self._weight_shard_dim] //= size
        dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        # Zeros, not empty: an unloaded layer computes zeros, never garbage.
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if bias:
            bias_size = self.output_size // size if self._bias_sharded else self.output_size
            self.bias = nn.Parameter(torch.zeros(bias_size, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        op.check_module(self)

    # -- weights -------------------------------------------------------------------------
    def _full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        if param is self.weight:
            return (self.output_size, self.input_size)
        if param is self.bias:
            return (self.output_size,)
        raise ArgumentError(f"{type(self).__name__}.weight_loader: param must be this module's weight or bias")

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Copy this rank's shard of the full checkpoint tensor ``loaded_weight`` into ``param``.

        ``param`` is ``self.weight`` (full shape [output_size, input_size]) or
        ``self.bias`` ([output_size]). Raises ArgumentError on a shape mismatch;
        the dtype is converted to the parameter's.
        """
        if not isinstance(loaded_weight, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.weight_loader: loaded_weight must be a tensor, got "
                            f"{type(loaded_weight).__name__}")
        full = self._full_shape(param)
        if tuple(loaded_weight.shape) != full:
            raise ArgumentError(f"{type(self).__name__}.weight_loader: loaded_weight must have the full shape "
                                f"{full}, got {tuple(loaded_weight.shape)}")
        dim = self._weight_shard_dim if param is self.weight else (0 if self._bias_sharded else None)
        if dim is not None:
            local = param.shape[dim]
            loaded_weight = loaded_weight.narrow(dim, self.op.shard_rank * local, local)
        with torch.no_grad():
            param.copy_(loaded_weight)

    def load_full_weights(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """``weight_loader`` for the weight and (when this module has one) the bias."""
        self.weight_loader(self.weight, weight)
        if bias is not None:
            if self.bias is None:
                raise ArgumentError(f"{type(self).__name__}.load_full_weights: this module has no bias "
                                    "(built with bias=False), got a bias tensor")
            self.weight_loader(self.bias, bias)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: Optional[LinearContext] = None) -> Output:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: x must be a tensor, got {type(x).__name__}")
        if ctx is None:
            ctx = LinearContext()
        elif not isinstance(ctx, LinearContext):
            raise TypeError(f"{type(self).__name__}: ctx must be a LinearContext or None, got {type(ctx).__name__}")
        if self.quant is not None and not self.op.supports_w8a8:
            raise ArgumentError(f"{type(self).__name__}: a w8a8 quant state is set but {type(self.op).__name__} "
                                "has no w8a8 path (only SequenceRowParallelOp has)")
        output = self.op.forward(self, x, ctx)
        if not self.return_bias:
            return output
        return output, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, weight={tuple(self.weight.shape)}, "
                f"bias={self.bias is not None}, op={self.op!r}, prefix={self.prefix!r}")


class ColumnParallelLinear(_ParallelLinearBase):
    """``y = x W^T + b`` with W [output_size, input_size] split along the output features.

    Args:
        input_size, output_size: the full layer's features.
        bias: whether the layer has a bias ([output_size / s] on this rank).
        gather_output: all-gather the output features (plain / sequence ops).
        skip_bias_add: do not add the bias; return it (with ``return_bias``).
        return_bias: return ``(output, output_bias)`` instead of the output.
        op: a column op of :mod:`moe_ext.parallel.ops` (``select_parallel_op``
            picks one by layer prefix).
        params_dtype, device: of the parameters (default dtype, CPU).
        prefix: the layer's name in the model.
    """

    _direction = "column"
    _weight_shard_dim = 0
    _bias_sharded = True

    def __init__(self, input_size: int, output_size: int, *, op: ParallelLinearOp, bias: bool = True,
                 gather_output: bool = False, skip_bias_add: bool = False, return_bias: bool = True,
                 params_dtype: Optional[torch.dtype] = None, device=None, prefix: str = "") -> None:
        self.gather_output = check_bool(f"{type(self).__name__}: gather_output", gather_output)
        super().__init__(input_size, output_size, bias=bias, skip_bias_add=skip_bias_add, return_bias=return_bias,
                         op=op, params_dtype=params_dtype, device=device, prefix=prefix)


class RowParallelLinear(_ParallelLinearBase):
    """``y = x W^T + b`` with W [output_size, input_size] split along the input features.

    Args:
        input_is_parallel: x already holds this rank's input-feature slice
            (else the op takes it from the full x).
        reduce_results: sum the partial outputs over the group (else the
            caller does; the bias is then added on rank 0 only).
        The rest as :class:`ColumnParallelLinear`; ``bias`` is [output_size]
        on every rank.
    """

    _direction = "row"
    _weight_shard_dim = 1
    _bias_sharded = False

    def __init__(self, input_size: int, output_size: int, *, op: ParallelLinearOp, bias: bool = True,
                 input_is_parallel: bool = True, reduce_results: bool = True, skip_bias_add: bool = False,
                 return_bias: bool = True, params_dtype: Optional[torch.dtype] = None, device=None,
                 prefix: str = "") -> None:
        self.input_is_parallel = check_bool(f"{type(self).__name__}: input_is_parallel", input_is_parallel)
        self.reduce_results = check_bool(f"{type(self).__name__}: reduce_results", reduce_results)
        super().__init__(input_size, output_size, bias=bias, skip_bias_add=skip_bias_add, return_bias=return_bias,
                         op=op, params_dtype=params_dtype, device=device, prefix=prefix)

    @property
    def input_size_per_partition(self) -> int:
        return self.input_size // self.op.shard_size


class ReplicatedLinear(_ParallelLinearBase):
    """``y = x W^T + b`` with the whole weight on every rank (op: :class:`ReplicatedOp`)."""

    _direction = "replicated"
    _weight_shard_dim = None

    def __init__(self, input_size: int, output_size: int, *, op: Optional[ParallelLinearOp] = None,
                 bias: bool = True, skip_bias_add: bool = False, return_bias: bool = True,
                 params_dtype: Optional[torch.dtype] = None, device=None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, bias=bias, skip_bias_add=skip_bias_add, return_bias=return_bias,
                         op=op if op is not None else ReplicatedOp(), params_dtype=params_dtype, device=device,
                         prefix=prefix)
