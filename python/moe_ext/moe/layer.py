"""The expert-parallel MoE layer: router -> top-k -> comm method -> experts -> back."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from moe_ext.moe.comm.base import MoECommMethod
from moe_ext.moe.config import MoEConfig
from moe_ext.moe.context import ForwardContext, checked_forward_context
from moe_ext.moe.experts import run_local_experts
from moe_ext.moe.select import COMM_METHODS, FORCE_ENV, make_comm_method, select_comm_method
from moe_ext.moe.topk import select_experts

__all__ = ["MoELayer", "logical_to_physical_table"]


def logical_to_physical_table(physical_to_logical: torch.Tensor, num_experts: int):
    """From a placement (logical expert of each physical slot) to ``(table [E, R] padded with -1, replicas [E])``."""
    physical_to_logical = physical_to_logical.to(torch.int64).cpu()
    if physical_to_logical.numel() and (int(physical_to_logical.min()) < 0
                                        or int(physical_to_logical.max()) >= num_experts):
        raise ValueError(f"placement: every slot must hold a logical expert in [0, {num_experts})")
    replicas = torch.bincount(physical_to_logical, minlength=num_experts)
    if int(replicas.min()) == 0:
        missing = torch.nonzero(replicas == 0).flatten().tolist()
        raise ValueError(f"placement: every logical expert needs a slot; missing {missing[:8]}")
    table = torch.full((num_experts, int(replicas.max())), -1, dtype=torch.int64)
    filled = [0] * num_experts
    for slot, expert in enumerate(physical_to_logical.tolist()):
        table[expert, filled[expert]] = slot
        filled[expert] += 1
    return table, replicas


class MoELayer(nn.Module):
    """A routed-experts MoE block with expert parallelism.

    Parameters: ``gate_weight`` [E, H] (router, ``config.router_dtype``),
    optional ``correction_bias`` [E], and this rank's expert slots ``w13``
    [L, H, 2I] (gate | up) and ``w2`` [L, I, H].

    ``placement``: the logical expert of each physical slot (as EPLB plans
    produce), default identity. A token's choice of logical expert ``e`` goes
    to replica ``t % replicas[e]`` of ``e`` (``t`` its index in the local
    batch): deterministic, and spreading the tokens of a batch over replicas.

    ``comm_method``: "auto" (decided per forward by
    :func:`select_comm_method`), a method name, or an instance.

    ``load_recorder``: a ``moe_ext.eplb.LoadRecorder`` (its ``record_layer``) or a
    callable, called as ``(layer_index, tokens_per_slot)``
    each forward with int64 [num_physical_experts] counts of this rank's real
    tokens per physical slot (identical on the ranks of one TP group; the sum
    over the DP group is the global load); the last counts are also kept in
    ``last_expert_load``.
    """

    def __init__(self, config: MoEConfig, *, scoring: str = "softmax", renormalize: bool = True,
                 num_expert_group: Optional[int] = None, topk_group: Optional[int] = None,
                 use_correction_bias: bool = False, routed_scaling_factor: float = 1.0,
                 comm_method: Any = "auto", npu=None, placement: Optional[torch.Tensor] = None,
                 load_recorder: Optional[Callable[[int, torch.Tensor], None]] = None, layer_index: int = 0,
                 reduce_results: bool = True, expert_backend: Optional[str] = None,
                 device: Optional[torch.device | str] = None):
        super().__init__()
        if config.intermediate_size < 1:
            raise ValueError(f"MoELayer: config.intermediate_size must be >= 1, got {config.intermediate_size}")
        self.config = config
        self.scoring, self.renormalize = scoring, renormalize
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.npu = npu
        self.load_recorder = load_recorder
        self.layer_index = layer_index
        self.reduce_results = reduce_results
        self.expert_backend = expert_backend
        self.last_expert_load: Optional[torch.Tensor] = None
        self.last_comm_method: Optional[str] = None
        hidden, inter, local = config.hidden_size, config.intermediate_size, config.num_local_experts
        self.gate_weight = nn.Parameter(torch.empty(config.num_experts, hidden, dtype=config.router_dtype,
                                                    device=device))
        self.correction_bias = (nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32, device=device),
                                             requires_grad=False) if use_correction_bias else None)
        self.w13 = nn.Parameter(torch.empty(local, hidden, 2 * inter, dtype=config.dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(local, inter, hidden, dtype=config.dtype, device=device))
        if placement is None:
            if config.num_physical_experts != config.num_experts:
                raise ValueError("MoELayer: a placement is needed when num_physical_experts != num_experts")
            placement = torch.arange(config.num_experts)
        placement = torch.as_tensor(placement, dtype=torch.int64)
        if tuple(placement.shape) != (config.num_physical_experts,):
            raise ValueError(f"MoELayer: placement must have shape ({config.num_physical_experts},), "
                             f"got {tuple(placement.shape)}")
        table, replicas = logical_to_physical_table(placement, config.num_experts)
        self.register_buffer("placement", placement.to(device), persistent=False)
        self.register_buffer("logical_to_physical", table.to(device), persistent=False)
        self.register_buffer("replica_count", replicas.to(device), persistent=False)
        self._fixed_comm: Optional[MoECommMethod] = None
        self._comm_cache: dict[str, MoECommMethod] = {}
        if isinstance(comm_method, MoECommMethod):
            self._fixed_comm = comm_method
        elif comm_method != "auto":
            self._fixed_comm = make_comm_method(comm_method, config, npu)

    @torch.no_grad()
    def load_logical_weights(self, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                             correction_bias: Optional[torch.Tensor] = None) -> None:
        """Fill this rank's slots from the logical experts' weights (``w13`` [E, H, 2I], ``w2`` [E, I, H])."""
        first, last = self.config.local_expert_range
        logical = self.placement[first:last].to(w13.device)
        self.gate_weight.copy_(gate_weight)
        self.w13.copy_(w13.index_select(0, logical))
        self.w2.copy_(w2.index_select(0, logical))
        if correction_bias is not None:
            if self.correction_bias is None:
                raise ValueError("MoELayer.load_logical_weights: built without use_correction_bias")
            self.correction_bias.copy_(correction_bias)

    def comm_method_for(self, max_tokens_across_dp: int) -> MoECommMethod:
        if self._fixed_comm is not None:
            return self._fixed_comm
        name = select_comm_method(self.config, max_tokens_across_dp, npu=self.npu)
        if name not in self._comm_cache:
            self._comm_cache[name] = make_comm_method(name, self.config, self.npu)
        return self._comm_cache[name]

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights fp32 [T, K], physical slot ids int32 [T, K])`` for this rank's tokens."""
        logits = hidden_states.to(self.gate_weight.dtype) @ self.gate_weight.t()
        weights, logical = select_experts(logits, self.config.top_k, scoring=self.scoring,
                                          renormalize=self.renormalize, num_expert_group=self.num_expert_group,
                                          topk_group=self.topk_group, correction_bias=self.correction_bias,
                                          routed_scaling_factor=self.routed_scaling_factor)
        logical = logical.to(torch.int64)
        token = torch.arange(logical.shape[0], device=logical.device).unsqueeze(1)
        replica = token % self.replica_count[logical]
        physical = self.logical_to_physical[logical, replica]
        return weights, physical.to(torch.int32)

    def forward(self, hidden_states: torch.Tensor, context: Optional[ForwardContext] = None) -> torch.Tensor:
        """``hidden_states`` [T, hidden_size] in the expert weights' dtype -> [T, hidden_size].

        Bad input raises TypeError / ArgumentError naming it, on every rank of
        the EP group at once when the context is built here (see
        :func:`moe_ext.moe.context.checked_forward_context`).
        """
        context = checked_forward_context("MoELayer", self.config, hidden_states, dtype=self.w13.dtype,
                                          device=self.w13.device, comm_method=self._comm_method_label(),
                                          methods=("auto",) + COMM_METHODS, context=context)
        weights, slots = self.route(hidden_states)
        self._record_load(slots)
        comm = self.comm_method_for(context.max_tokens_across_dp)
        self.last_comm_method = comm.name
        tokens, slots, weights = comm.prepare(hidden_states, slots, weights, context)
        routed = comm.permute(tokens, slots, weights)
        expert_output = run_local_experts(routed, self.w13, self.w2, npu=self.npu, backend=self.expert_backend)
        combined = comm.unpermute(expert_output)
        return comm.finalize(combined, self.reduce_results)

    def _comm_method_label(self) -> str:
        """The method as every rank must agree on it: fixed, forced by the environment, or "auto"."""
        if self._fixed_comm is not None:
            return self._fixed_comm.name
        return os.environ.get(FORCE_ENV) or "auto"

    def _record_load(self, slots: torch.Tensor) -> None:
        with torch.no_grad():
            load = torch.bincount(slots.reshape(-1).to(torch.int64), minlength=self.config.num_physical_experts)
        self.last_expert_load = load
        if self.load_recorder is not None:
            record = getattr(self.load_recorder, "record_layer", self.load_recorder)  # eplb.LoadRecorder or a callable
            record(self.layer_index, load)
