"""The local experts: a gated MLP per expert, run as one grouped matmul.

Weights are stored input-major, the layout grouped matmuls take:
``w13`` [L, H, 2I] (gate and up projections, concatenated ``[gate | up]`` or
interleaved ``[g0, u0, g1, u1, ...]``), ``w2`` [L, I, H], optional biases
``w13_bias`` [L, 2I] (same layout) and ``w2_bias`` [L, H]. An expert computes
``act(x @ w13 + b13) @ w2 + b2`` where ``act`` splits gate and up
(:class:`ExpertActivation`).

Backends: ``npu_grouped_matmul`` (+ ``npu_swiglu`` for plain SwiGLU) on NPU,
``torch._grouped_mm`` where it applies (CUDA, bf16, 16-byte-aligned strides), a
per-expert loop otherwise; every activation and bias runs on every backend (the
activation between the two grouped matmuls, biases gathered per row). Rows past
the last group are not computed: their content is undefined on the
grouped-matmul backends and zero on the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from moe_ext.errors import ArgumentError, check_choice
from moe_ext.moe.comm.base import PermuteResult

__all__ = ["ACTIVATIONS", "GATE_UP_LAYOUTS", "ExpertActivation", "FirstProjection", "gated_mlp_loop",
           "gated_mlp_grouped_mm", "grouped_mm_applies", "run_local_experts"]

#: the gated activations: act(gate) * up, with act silu (SwiGLU), gelu (GeGLU, exact erf), gelu_tanh (GeGLU with
#: the tanh approximation), relu (ReGLU); "swigluoai" is GPT-OSS's clamped SwiGLU (see ExpertActivation)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swigluoai")
#: the names Hugging Face configs use (``hidden_act``) for the same functions
ACTIVATION_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                      "gelu_fast": "gelu_tanh"}
GATE_UP_LAYOUTS = ("concatenated", "interleaved")


@dataclass(frozen=True)
class ExpertActivation:
    """How the ``[.., 2I]`` gate/up projection becomes the ``[.., I]`` input of the down projection.

    - ``name``: one of :data:`ACTIVATIONS` (or a Hugging Face alias such as
      "gelu_pytorch_tanh"); gated: ``act(gate) * up``. "swigluoai" is GPT-OSS's
      ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with
      ``g = clamp(gate, max=limit)`` (``swiglu_alpha`` 1.702, ``swiglu_limit`` 7.0 in its config);
    - ``gate_up_layout``: "concatenated" (gate columns, then up) or
      "interleaved" (gate, up, gate, up, ... as GPT-OSS stores them).
    """

    name: str = "silu"
    gate_up_layout: str = "concatenated"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"ExpertActivation: name must be a str, got {type(self.name).__name__}")
        object.__setattr__(self, "name", ACTIVATION_ALIASES.get(self.name, self.name))
        check_choice("ExpertActivation: name", self.name, ACTIVATIONS)
        check_choice("ExpertActivation: gate_up_layout", self.gate_up_layout, GATE_UP_LAYOUTS)
        for field_name in ("alpha", "limit"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"ExpertActivation: {field_name} must be a float, got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ArgumentError(f"ExpertActivation: {field_name} must be a finite float > 0, got {value}")

    @property
    def is_plain_swiglu(self) -> bool:
        """SwiGLU over concatenated gate|up: what npu_swiglu computes."""
        return self.name == "silu" and self.gate_up_layout == "concatenated"

    def split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_up_layout == "interleaved":
            return gate_up[..., 0::2], gate_up[..., 1::2]
        return gate_up.chunk(2, dim=-1)

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.gated(*self.split(gate_up))

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The activation on gate and up already apart (separately stored projections)."""
        if self.name == "silu":
            return F.silu(gate) * up
        if self.name == "gelu":
            return F.gelu(gate) * up
        if self.name == "gelu_tanh":
            return F.gelu(gate, approximate="tanh") * up
        if self.name == "relu":
            return F.relu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SWIGLU = ExpertActivation()


def _row_experts(counts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The local expert of each of ``num_rows`` grouped rows (rows past the groups: the last expert), no sync."""
    ends = torch.cumsum(counts.to(torch.int64), 0)
    rows = torch.arange(num_rows, device=counts.device)
    return torch.searchsorted(ends, rows, right=True).clamp_max(counts.numel() - 1)


#: the first projection: ``w13`` [L, H, 2I], or a pair (``w_gate`` [L, H, I], ``w_up`` [L, H, I]) stored apart
#: (torchtitan's / seed 003's ``w1`` and ``w3``, transposed views: ``moe_ext.parallel.GroupedExperts``)
FirstProjection = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _check_first_projection(w13: FirstProjection, w13_bias: Optional[torch.Tensor], caller: str) -> None:
    if isinstance(w13, tuple) and (len(w13) != 2 or w13_bias is not None):
        raise ArgumentError(f"{caller}: a split first projection is a (w_gate, w_up) pair without w13_bias, got "
                            f"{len(w13)} tensors{' and a w13_bias' if w13_bias is not None else ''}")


def _project_and_activate(activation: ExpertActivation, project, w13: FirstProjection,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``activation`` of the first projection (``project(weight)`` computes one), bias added before it."""
    if isinstance(w13, tuple):
        return activation.gated(project(w13[0]), project(w13[1]))
    gate_up = project(w13)
    if bias is not None:
        gate_up = gate_up + bias
    return activation(gate_up)


def gated_mlp_loop(rows: torch.Tensor, counts: torch.Tensor, w13: FirstProjection, w2: torch.Tensor,
                   activation: ExpertActivation = SWIGLU, w13_bias: Optional[torch.Tensor] = None,
                   w2_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One matmul pair per expert (reads the counts on the host).

    Every expert runs, on zero rows too, and the blocks are concatenated: the
    output stays a function of ``rows``, the weights and the biases whatever the
    counts, so backward reaches them (zero gradients) on a rank whose experts got
    no rows, as it does on its peers (see ``moe_ext.moe.comm.base``). ``w13``
    may be a (gate, up) pair (:data:`FirstProjection`): one matmul each.
    """
    _check_first_projection(w13, w13_bias, "gated_mlp_loop")
    blocks = []
    start = 0
    for expert, count in enumerate(counts.tolist()):
        block_rows = rows[start:start + count]
        hidden = _project_and_activate(activation, lambda w: block_rows @ w[expert], w13,
                                       None if w13_bias is None else w13_bias[expert])
        block = hidden @ w2[expert]
        if w2_bias is not None:
            block = block + w2_bias[expert]
        blocks.append(block)
        start += count
    blocks.append(rows.new_zeros((rows.shape[0] - start, w2.shape[2])))  # rows past the last group
    return torch.cat(blocks)


def grouped_mm_applies(rows: torch.Tensor, w13: FirstProjection, w2: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs bf16 here and 16-byte-aligned row strides (inner sizes multiple of 8)."""
    first = w13 if isinstance(w13, tuple) else (w13,)
    if not hasattr(torch, "_grouped_mm") or any(t.dtype != torch.bfloat16 for t in (rows, w2, *first)):
        return False
    return all(size % 8 == 0 for size in (rows.shape[1], *(w.shape[2] for w in first), w2.shape[1], w2.shape[2]))


def gated_mlp_grouped_mm(rows: torch.Tensor, counts: torch.Tensor, w13: FirstProjection, w2: torch.Tensor,
                         activation: ExpertActivation = SWIGLU, w13_bias: Optional[torch.Tensor] = None,
                         w2_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One ``torch._grouped_mm`` per projection (offsets from the counts, no host sync); ``w13`` as in
    :func:`gated_mlp_loop`. Rows past the last group are undefined."""
    _check_first_projection(w13, w13_bias, "gated_mlp_grouped_mm")
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    row_expert = _row_experts(counts, rows.shape[0]) if (w13_bias is not None or w2_bias is not None) else None
    hidden = _project_and_activate(activation, lambda w: torch._grouped_mm(rows, w, offs=offsets), w13,
                                   None if w13_bias is None else w13_bias.index_select(0, row_expert))
    out = torch._grouped_mm(hidden, w2, offs=offsets)
    if w2_bias is not None:
        out = out + w2_bias.index_select(0, row_expert)
    return out


def _npu_gated_mlp(npu, routed: PermuteResult, w13, w2, activation, w13_bias, w2_bias) -> torch.Tensor:
    from moe_ext.platform import npu as npu_adapter
    rows = routed.hidden_states
    if activation.is_plain_swiglu and w13_bias is None and w2_bias is None:
        return npu_adapter.grouped_gated_mlp(npu, rows, routed.expert_tokens, routed.group_list_type, w13, w2)
    gate_up = npu_adapter.grouped_matmul(npu, rows, routed.expert_tokens, routed.group_list_type, w13)
    row_expert = _row_experts(routed.counts(), rows.shape[0]) if (w13_bias is not None or w2_bias is not None) \
        else None
    if w13_bias is not None:
        gate_up = gate_up + w13_bias.index_select(0, row_expert)
    out = npu_adapter.grouped_matmul(npu, activation(gate_up), routed.expert_tokens, routed.group_list_type, w2)
    if w2_bias is not None:
        out = out + w2_bias.index_select(0, row_expert)
    return out


def run_local_experts(routed: PermuteResult, w13: torch.Tensor, w2: torch.Tensor, *, npu=None,
                      backend: Optional[str] = None, activation: ExpertActivation = SWIGLU,
                      w13_bias: Optional[torch.Tensor] = None,
                      w2_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Expert outputs [R, H] for the rows of ``routed`` (same row order).

    ``w13`` [L, H, 2I], ``w2`` [L, I, H], ``w13_bias`` [L, 2I], ``w2_bias``
    [L, H] in the rows' dtype. ``backend``: "npu", "grouped_mm" or "loop"; by
    default "npu" when an NPU runtime is given, "grouped_mm" on CUDA where it
    applies, else "loop".
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
        return _npu_gated_mlp(npu, routed, w13, w2, activation, w13_bias, w2_bias)
    counts = routed.counts()
    if backend == "grouped_mm":
        return gated_mlp_grouped_mm(rows, counts, w13, w2, activation, w13_bias, w2_bias)
    if backend == "loop":
        return gated_mlp_loop(rows, counts, w13, w2, activation, w13_bias, w2_bias)
    raise ArgumentError(f"run_local_experts: backend must be 'npu', 'grouped_mm' or 'loop', got {backend!r}")
