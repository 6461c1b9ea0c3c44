"""The w8a8 path of the sequence-parallel row op: int8 activations and weights, fused matmul + reduce-scatter.

:class:`W8A8RowQuant`, attached to a :class:`~moe_ext.parallel.RowParallelLinear`
whose op is :class:`~moe_ext.parallel.SequenceRowParallelOp`, replaces the
float matmul + reduce-scatter of the sequence-parallel path by::

    x_q  = clamp(round(x * input_scale_reciprocal + input_offset), -128, 127)     (int8, per tensor)
    out  = reduce_scatter(deq_scale * (x_q @ weight_t))  + deq_scale * quant_bias  (output_dtype)

``deq_scale`` [n] is ``input_scale * weight_scale`` (per output channel), and
``quant_bias`` [n] int32 is the bias in the integer domain, added once after
the reduce-scatter (the fused operator takes no bias). On the NPU the
reduce-scatter step is ``npu_mm_reduce_scatter_base`` with int8 inputs,
``x2_scale=deq_scale`` and ``output_dtype`` (the reference engine's w8a8
call); elsewhere the same arithmetic in float32, then rounded to
``output_dtype``. Only this path is wired: any other use of a module with a
quant state raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moe_ext.distributed.group import ParallelGroup
from moe_ext.errors import ArgumentError
from moe_ext.parallel import _collectives
from moe_ext.parallel.backend import LinearBackend, _comm_name, _decide
from moe_ext.platform import npu as npu_platform

__all__ = ["W8A8RowQuant"]


@dataclass
class W8A8RowQuant:
    """This rank's int8 shard of a row-parallel layer, with its scales.

    Attributes:
        weight_t: int8 [input_size / s, output_size] (the transposed weight's rows of this rank).
        deq_scale: float32 [output_size].
        quant_bias: int32 [output_size] or None.
        input_scale_reciprocal, input_offset: float32 [1], the static activation quantisation.
        output_dtype: float16 or bfloat16.
    """

    weight_t: torch.Tensor
    deq_scale: torch.Tensor
    quant_bias: Optional[torch.Tensor]
    input_scale_reciprocal: torch.Tensor
    input_offset: torch.Tensor
    output_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_checkpoint(cls, module, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: float,
                        input_offset: float = 0.0, quant_bias: Optional[torch.Tensor] = None,
                        output_dtype: torch.dtype = torch.bfloat16) -> "W8A8RowQuant":
        """This rank's shard from the full checkpoint tensors, attached to ``module`` (returned too).

        ``weight`` int8 [output_size, input_size]; ``weight_scale`` float
        [output_size]; ``input_scale`` / ``input_offset`` the activation
        quantisation (x ~ input_scale * (x_q - input_offset)); ``quant_bias``
        int32 [output_size] or None. Raises ArgumentError on shapes, dtypes or
        a non-positive ``input_scale``.
        """
        from moe_ext.parallel.ops import SequenceRowParallelOp
        if not isinstance(module.op, SequenceRowParallelOp):
            raise ArgumentError(f"W8A8RowQuant: module.op must be a SequenceRowParallelOp (the only op with the "
                                f"w8a8 path), got {type(module.op).__name__}")
        full = (module.output_size, module.input_size)
        if weight.dtype != torch.int8 or tuple(weight.shape) != full:
            raise ArgumentError(f"W8A8RowQuant: weight must be int8 {full}, got {weight.dtype} {tuple(weight.shape)}")
        if tuple(weight_scale.shape) != (module.output_size,):
            raise ArgumentError(f"W8A8RowQuant: weight_scale must be [{module.output_size}], got "
                                f"{tuple(weight_scale.shape)}")
        if quant_bias is not None and (quant_bias.dtype != torch.int32
                                       or tuple(quant_bias.shape) != (module.output_size,)):
            raise ArgumentError(f"W8A8RowQuant: quant_bias must be int32 [{module.output_size}], got "
                                f"{quant_bias.dtype} {tuple(quant_bias.shape)}")
        if not input_scale > 0:
            raise ArgumentError(f"W8A8RowQuant: input_scale must be > 0, got {input_scale}")
        if output_dtype not in (torch.float16, torch.bfloat16):
            raise ArgumentError(f"W8A8RowQuant: output_dtype must be float16 or bfloat16, got {output_dtype}")
        local = module.input_size // module.op.shard_size
        shard = weight.narrow(1, module.op.shard_rank * local, local)
        device = module.weight.device
        quant = cls(weight_t=shard.t().contiguous().to(device),
                    deq_scale=(weight_scale.double() * input_scale).float().to(device),
                    quant_bias=quant_bias.to(device) if quant_bias is not None else None,
                    input_scale_reciprocal=torch.tensor([1.0 / input_scale], dtype=torch.float32, device=device),
                    input_offset=torch.tensor([float(input_offset)], dtype=torch.float32, device=device),
                    output_dtype=output_dtype)
        module.quant = quant
        return quant

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.int8:
            return x
        return npu_platform.quantize_per_tensor(x, self.input_scale_reciprocal, self.input_offset)

    def matmul_reduce_scatter(self, x: torch.Tensor, group: ParallelGroup, backend: LinearBackend) -> torch.Tensor:
        """This rank's rows of the summed, dequantised ``x_q @ weight_t`` plus the dequantised quant bias."""
        x_q = self.quantize_input(x)
        if backend.npu is not None:
            reason = npu_platform.mm_reduce_scatter_unsupported(backend.npu, x_q, self.weight_t, group.world_size)
        else:
            reason = "the int8 fused matmul + reduce-scatter exists on the NPU only"
        if _decide("W8A8RowQuant.matmul_reduce_scatter", backend, reason):
            name = _comm_name(backend.npu, group)
            out = npu_platform.mm_reduce_scatter(backend.npu, x_q, self.weight_t, name, group.world_size,
                                                 x2_scale=self.deq_scale, output_dtype=self.output_dtype)
        else:
            # Exact integer products (float64 holds k * 127^2 sums exactly for k < 2^38).
            local = ((x_q.double() @ self.weight_t.double()) * self.deq_scale.double()).float()
            out = _collectives.reduce_scatter(local, 0, group).to(self.output_dtype)
        if self.quant_bias is not None:
            out = out + (self.quant_bias.double() * self.deq_scale.double()).to(self.output_dtype)
        return out
