"""A torchtitan 0.3 token dispatcher on moe_ext's routing and regroup ops.

torchtitan 0.3 routes an MoE's tokens through a token-dispatcher object
(``torchtitan.models.common.token_dispatcher``): ``dispatch(x_TD, topk_scores_TK,
topk_expert_ids_TK, num_local_tokens_per_expert_E) -> (routed_input_RD,
num_tokens_per_local_expert, metadata)`` and ``combine(routed_output_RD, metadata,
x_TD) -> out_TD``, with the EP mesh installed by ``wire_meshes``. Per-call state
travels in the metadata value, so two micro-batches can be in flight at once.

:class:`MoeExtTokenDispatcher` implements that interface (``BaseEPTokenDispatcher``)
with moe_ext's ops; a torchtitan user switches one config entry::

    from moe_ext.parallel.torchtitan_dispatcher import MoeExtTokenDispatcher
    routed_experts_config.token_dispatcher = MoeExtTokenDispatcher.Config(num_experts=E, top_k=K)

What changes against torchtitan's ``AllToAllTokenDispatcher``:

- the local reorder is :func:`moe_ext.ops.moe_permute` (one pass: stable counting sort
  by expert, each row copied once) instead of ``argsort`` + gather;
- the regroup after the all-to-all is :func:`moe_ext.ops.group_by_local_expert` (one
  index launch + one row pass) instead of ``repeat_interleave`` index maths + gather, and
  its inverse a single scatter pass; blocks can be padded to ``alignment`` rows;
- the combine is :func:`moe_ext.ops.moe_unpermute`: each token sums its K rows times
  their scores in fp32, in a fixed order, and is written once (no scatter-add);
- the all-to-all is :func:`moe_ext.distributed.functional.all_to_all_single`
  (differentiable, correct on subgroups and gloo).

Outputs agree with torchtitan's dispatcher to rounding (the fp32 combine rounds once
per token instead of once per row); gradients are exact for the same computation.

Importing this module needs torchtitan 0.3 (``pip install --no-deps torchtitan==0.3.0``
plus, at import, ``spmd_types==0.2.3``, ``tyro`` and ``triton``); importing
:mod:`moe_ext` or :mod:`moe_ext.parallel` never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

try:
    from torchtitan.models.common.token_dispatcher import BaseEPTokenDispatcher
except ImportError as error:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "moe_ext.parallel.torchtitan_dispatcher implements torchtitan 0.3's BaseEPTokenDispatcher and needs "
        "torchtitan: pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 && pip install tyro triton"
    ) from error

from moe_ext.errors import check_int
from moe_ext.ops import moe_permute, moe_unpermute
from moe_ext.parallel.expert_parallel import DispatchMetadata, combine_tokens, dispatch_tokens

__all__ = ["MoeExtDispatchMetadata", "MoeExtTokenDispatcher"]


@dataclass(frozen=True, kw_only=True)
class MoeExtDispatchMetadata:
    """What :meth:`MoeExtTokenDispatcher.combine` needs from the matching dispatch."""

    expanded_row_idx: torch.Tensor
    """int32 ``[T*K]``: the row of each (token, k) in the locally permuted rows."""
    topk_scores: torch.Tensor
    """``[T, K]`` routing scores, applied in combine."""
    expert_parallel: Optional[DispatchMetadata]
    """Split sizes and regroup indices of the all-to-all; ``None`` without an EP mesh."""


class MoeExtTokenDispatcher(BaseEPTokenDispatcher):
    """torchtitan 0.3's EP token dispatcher, on moe_ext's ops (see the module docstring).

    Config fields: ``num_experts``, ``top_k`` (torchtitan's), ``alignment`` (rows per
    local-expert block after the all-to-all, for grouped GEMMs; default 1 = no padding
    except a single zero row for an expert that receives none).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseEPTokenDispatcher.Config):
        alignment: int = 1

    def __init__(self, config: Config):
        super().__init__(config)
        self.alignment = check_int("alignment", config.alignment, minimum=1)

    def dispatch(self, x_TD: torch.Tensor, topk_scores_TK: torch.Tensor, topk_expert_ids_TK: torch.Tensor,
                 num_local_tokens_per_expert_E: torch.Tensor):
        """Rows grouped by expert, sent to the experts' EP ranks; returns ``(rows, counts, metadata)``."""
        permuted, expanded_row_idx, _ = moe_permute(x_TD, topk_expert_ids_TK, num_experts=self.num_experts)
        if self.ep_mesh is None:
            metadata = MoeExtDispatchMetadata(expanded_row_idx=expanded_row_idx, topk_scores=topk_scores_TK,
                                              expert_parallel=None)
            return permuted, num_local_tokens_per_expert_E, metadata
        rows, counts, ep_metadata = dispatch_tokens(permuted, num_local_tokens_per_expert_E,
                                                    self.ep_mesh.get_group(), self.alignment,
                                                    num_experts=self.num_experts)
        metadata = MoeExtDispatchMetadata(expanded_row_idx=expanded_row_idx, topk_scores=topk_scores_TK,
                                          expert_parallel=ep_metadata)
        return rows, counts, metadata

    def combine(self, routed_output_RD: torch.Tensor, metadata: MoeExtDispatchMetadata,
                x_TD: torch.Tensor) -> torch.Tensor:
        """Expert outputs back to their tokens, each token's K rows summed with their scores."""
        rows = routed_output_RD
        if metadata.expert_parallel is not None:
            rows = combine_tokens(routed_output_RD, metadata.expert_parallel, self.ep_mesh.get_group())
        scores = metadata.topk_scores
        if scores.dtype not in (torch.float32, rows.dtype):
            scores = scores.float()
        return moe_unpermute(rows, metadata.expanded_row_idx, scores).to(x_TD.dtype)
