"""The local experts: a SwiGLU MLP per expert, run as one grouped matmul.

Weights are stored input-major, the layout grouped matmuls take:
``w13`` [L, H, 2I] (gate columns first, then up), ``w2`` [L, I, H].
Backends: ``npu_grouped_matmul`` + ``npu_swiglu`` on NPU, ``torch._grouped_mm``
where it applies (CUDA, bf16, 16-byte-aligned strides), a per-expert loop
otherwise. Rows past the last group are not computed: their content is
undefined on the grouped-matmul backends and zero on the loop.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moe_ext.moe.comm.base import GROUP_LIST_COUNT, PermuteResult

__all__ = ["gated_mlp_loop", "gated_mlp_grouped_mm", "grouped_mm_applies", "run_local_experts"]


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gated_mlp_loop(rows: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One matmul pair per expert (reads the counts on the host).

    Every expert runs, on zero rows too, and the blocks are concatenated: the
    output stays a function of ``rows``, ``w13`` and ``w2`` whatever the counts,
    so backward reaches them (zero gradients) on a rank whose experts got no
    rows, as it does on its peers (see ``moe_ext.moe.comm.base``).
    """
    blocks = []
    start = 0
    for expert, count in enumerate(counts.tolist()):
        blocks.append(_swiglu(rows[start:start + count] @ w13[expert]) @ w2[expert])
        start += count
    blocks.append(rows.new_zeros((rows.shape[0] - start, w2.shape[2])))  # rows past the last group
    return torch.cat(blocks)


def grouped_mm_applies(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs bf16 here and 16-byte-aligned row strides (inner sizes multiple of 8)."""
    if not hasattr(torch, "_grouped_mm") or rows.dtype != torch.bfloat16:
        return False
    return all(size % 8 == 0 for size in (rows.shape[1], w13.shape[2], w2.shape[1], w2.shape[2]))


def gated_mlp_grouped_mm(rows: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor,
                         w2: torch.Tensor) -> torch.Tensor:
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    gate_up = torch._grouped_mm(rows, w13, offs=offsets)
    return torch._grouped_mm(_swiglu(gate_up), w2, offs=offsets)


def run_local_experts(routed: PermuteResult, w13: torch.Tensor, w2: torch.Tensor, *, npu=None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Expert outputs for the rows of ``routed`` (same row order).

    ``backend``: "npu", "grouped_mm" or "loop"; by default "npu" when an NPU
    runtime is given, "grouped_mm" on CUDA where it applies, else "loop".
    """
    rows = routed.hidden_states
    if backend is None:
        if npu is not None:
            backend = "npu"
        elif rows.is_cuda and grouped_mm_applies(rows, w13, w2):
            backend = "grouped_mm"
        else:
            backend = "loop"
    if backend == "npu":
        from moe_ext.platform import npu as npu_adapter
        return npu_adapter.grouped_gated_mlp(npu, rows, routed.expert_tokens, routed.group_list_type, w13, w2)
    counts = routed.counts()
    if backend == "grouped_mm":
        return gated_mlp_grouped_mm(rows, counts, w13, w2)
    if backend == "loop":
        return gated_mlp_loop(rows, counts, w13, w2)
    raise ValueError(f"run_local_experts: backend must be 'npu', 'grouped_mm' or 'loop', got {backend!r}")
