"""Composites for the NPU dispatch key: ops without an AscendC kernel.

moe_ext's NPU op library (``_C_npu.so``, csrc/ascend/npu/npu_ops.cpp) registers
AscendC kernels for seven ops. ``moe_permute_padded`` (the layout of grouped
GEMMs and fp8 dispatch) has no AscendC kernel; so that ``torch.ops.moe_ext.*``
never lacks an NPU implementation, :func:`register` gives it this composite,
built from ``torch.ops.moe_ext.moe_permute`` (on NPU tensors: our AscendC
layout kernels) and plain torch operators (which torch_npu implements). It is
registered only when ``_C_npu.so`` is loaded (moe_ext._loader). The composite is
device-agnostic, so CI checks it on CPU tensors against the CPU kernel
(tests/test_ascend_composites.py); it has never run on an NPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from moe_ext.ops import _checks

_library: Optional[torch.library.Library] = None


def moe_permute_padded(hidden_states: torch.Tensor, scales: Optional[torch.Tensor], topk_ids: torch.Tensor,
                       num_experts: int, active_start: int, active_end: int,
                       expert_map: Optional[torch.Tensor], counts_cumsum: bool, alignment: int):
    """``moe_ext::moe_permute_padded`` from moe_permute + torch operators.

    Same contract as the CPU/CUDA kernels (csrc/core/routing_layout.h): the
    dropless layout of moe_permute with each active expert's block starting at
    a multiple of ``alignment``; pad rows are zero. Rows past the padded total
    are unspecified by the contract; here they are zero. Returns
    ``(permuted [bound, H], permuted_scales, expanded_row_idx int32 [T*K],
    expert_tokens int64 [A], expert_tokens_unpadded int64 [A])``.
    """
    alignment, bound = _checks.permute_padded_tensors(hidden_states, scales, topk_ids, num_experts, expert_map,
                                                      active_end - active_start, alignment)
    num_tokens, topk = topk_ids.shape
    # The unpadded layout (expanded_row_idx, counts) without moving any row: a zero-width input.
    no_rows = topk_ids.new_empty((num_tokens, 0), dtype=torch.float32)
    _, row_idx, counts = torch.ops.moe_ext.moe_permute(no_rows, topk_ids, num_experts, active_start, active_end,
                                                       expert_map, False)
    padded = (counts + alignment - 1) // alignment * alignment
    end_unpadded = torch.cumsum(counts, 0)
    shift = (torch.cumsum(padded, 0) - padded) - (end_unpadded - counts)  # padded start - unpadded start
    valid = row_idx >= 0
    positions = row_idx.to(torch.int64)
    kept = positions[valid]
    block = torch.searchsorted(end_unpadded, kept, right=True)  # the expert block of each kept row
    moved = kept + shift[block]
    new_idx = torch.full_like(positions, -1)
    new_idx[valid] = moved
    source = torch.arange(num_tokens * topk, device=topk_ids.device)[valid] // topk

    def scatter(rows: torch.Tensor) -> torch.Tensor:
        """rows[token] to its padded positions, zeros elsewhere; moved as bytes (fp8 included)."""
        width = 1
        for size in rows.shape[1:]:
            width *= size
        flat = rows.reshape(rows.shape[0], width).contiguous()
        as_bytes = flat.view(torch.uint8)
        out = as_bytes.new_zeros((bound, as_bytes.shape[1]))
        out.index_copy_(0, moved, as_bytes.index_select(0, source))
        return out.view(rows.dtype).reshape((bound,) + tuple(rows.shape[1:]))

    permuted = scatter(hidden_states)
    permuted_scales = (scatter(scales) if scales is not None
                       else topk_ids.new_empty((0,), dtype=torch.float32))
    expert_tokens = torch.cumsum(padded, 0) if counts_cumsum else padded
    expert_tokens_unpadded = end_unpadded if counts_cumsum else counts
    return permuted, permuted_scales, new_idx.to(torch.int32), expert_tokens, expert_tokens_unpadded


def register() -> None:
    """Registers the composites for PrivateUse1 (called once, after _C_npu.so is loaded)."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library("moe_ext", "IMPL")
    library.impl("moe_permute_padded", moe_permute_padded, "PrivateUse1")
    _library = library
