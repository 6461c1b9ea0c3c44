"""STAND-INS: minimal local versions of moe_ext pieces that have not landed in this build.

Each one is used only when the real module is missing (see moe_ext.demo.pieces,
which says which is which and reports it). They are deliberately plain: small,
obviously correct, not fast. Delete each one when its real module is always there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["StandInMoELayer", "standin_select_experts", "standin_dense_moe", "standin_rearrange"]


def standin_select_experts(logits: torch.Tensor, top_k: int, *, scoring: str, renormalize: bool,
                           num_expert_group: Optional[int], topk_group: Optional[int],
                           routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """STAND-IN for moe_ext.moe.select_experts: (weights fp32 [T, K], logical ids int64 [T, K])."""
    logits = logits.float()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores
    if num_expert_group is not None:
        tokens, experts = scores.shape
        grouped = scores.view(tokens, num_expert_group, experts // num_expert_group)
        best_groups = grouped.max(dim=-1).values.topk(topk_group, dim=-1).indices
        keep = torch.zeros(tokens, num_expert_group, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, best_groups, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
        choice = scores.masked_fill(~keep, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * routed_scaling_factor, ids


def _swiglu_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w13).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2


def standin_dense_moe(x: torch.Tensor, gate: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                      **routing) -> torch.Tensor:
    """STAND-IN for moe_ext.testing.dense_moe: every token through its experts, in fp32, one process."""
    weights, ids = standin_select_experts(x.float() @ gate.float().t(), top_k, **routing)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(gate.shape[0]):
        token, choice = torch.nonzero(ids == expert, as_tuple=True)
        if token.numel():
            out.index_add_(0, token, weights[token, choice, None] * _swiglu_mlp(x[token].float(), w13[expert].float(),
                                                                                 w2[expert].float()))
    return out.to(x.dtype)


class StandInMoELayer:
    """STAND-IN for moe_ext.moe.MoELayer: expert parallelism over an all-gather.

    Same placement semantics as the real layer: a token's choice of logical
    expert e goes to replica ``t % replicas[e]`` of e (t: the token's index in
    the local batch), slot s lives on rank ``s // slots_per_rank``. Every rank
    gathers all tokens, runs those routed to its slots, and a reduce-scatter
    (all-reduce + slice) brings each token's sum home.
    """

    def __init__(self, *, num_experts: int, top_k: int, placement: torch.Tensor, gate: torch.Tensor,
                 w13_slots: torch.Tensor, w2_slots: torch.Tensor, rank: int, world_size: int, group,
                 routing: dict):
        self.num_experts, self.top_k = num_experts, top_k
        self.rank, self.world_size, self.group = rank, world_size, group
        self.routing = routing
        self.gate = gate
        self.w13, self.w2 = w13_slots.contiguous(), w2_slots.contiguous()
        self.slots_per_rank = self.w13.shape[0]
        self.last_expert_load: Optional[torch.Tensor] = None
        self.last_comm_method = "allgather (stand-in)"
        self.set_placement(placement)

    def set_placement(self, placement: torch.Tensor) -> None:
        placement = placement.to(torch.int64).cpu()
        replicas = torch.bincount(placement, minlength=self.num_experts)
        table = torch.full((self.num_experts, int(replicas.max())), -1, dtype=torch.int64)
        filled = [0] * self.num_experts
        for slot, expert in enumerate(placement.tolist()):
            table[expert, filled[expert]] = slot
            filled[expert] += 1
        device = self.w13.device
        self.placement, self.table, self.replicas = placement.to(device), table.to(device), replicas.to(device)

    def expert_weight_tensors(self) -> list[torch.Tensor]:
        return [self.w13, self.w2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, logical = standin_select_experts(x.float() @ self.gate.float().t(), self.top_k, **self.routing)
        token = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        slots = self.table[logical, token % self.replicas[logical]]
        self.last_expert_load = torch.bincount(slots.reshape(-1), minlength=self.placement.numel())
        all_x = torch.empty((self.world_size * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        all_slots = torch.empty((self.world_size * slots.shape[0], slots.shape[1]), dtype=slots.dtype,
                                device=x.device)
        all_weights = torch.empty((self.world_size * weights.shape[0], weights.shape[1]), dtype=weights.dtype,
                                  device=x.device)
        for gathered, local in ((all_x, x.contiguous()), (all_slots, slots.contiguous()),
                                (all_weights, weights.contiguous())):
            dist.all_gather_into_tensor(gathered, local, group=self.group)
        out = torch.zeros(all_x.shape, dtype=torch.float32, device=x.device)
        first = self.rank * self.slots_per_rank
        for local_slot in range(self.slots_per_rank):
            token, choice = torch.nonzero(all_slots == first + local_slot, as_tuple=True)
            if token.numel():
                expert_out = _swiglu_mlp(all_x[token].float(), self.w13[local_slot].float(), self.w2[local_slot].float())
                out.index_add_(0, token, all_weights[token, choice, None] * expert_out)
        dist.all_reduce(out, group=self.group)
        mine = out[self.rank * x.shape[0]:(self.rank + 1) * x.shape[0]]
        return mine.to(x.dtype)


def standin_rearrange(old_placement: torch.Tensor, new_placement: torch.Tensor, tensors: list[torch.Tensor],
                      group, rank: int, world_size: int) -> int:
    """STAND-IN for moe_ext.eplb.rearrange_expert_weights_inplace: all-gather every slot, keep the new ones.

    Moves far more bytes than a planned P2P exchange; returns the rows a planned
    exchange would move (each (rank, expert) the rank lacks), for the report.
    """
    old, new = old_placement.tolist(), new_placement.tolist()
    slots_per_rank = len(old) // world_size
    source_slot = {}
    for slot, expert in enumerate(old):
        source_slot.setdefault(expert, slot)
    for tensor in tensors:
        gathered = torch.empty((world_size * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                               device=tensor.device)
        dist.all_gather_into_tensor(gathered, tensor.contiguous(), group=group)
        for local_slot in range(slots_per_rank):
            tensor[local_slot].copy_(gathered[source_slot[new[rank * slots_per_rank + local_slot]]])
    rows = 0
    for r in range(world_size):
        held = set(old[r * slots_per_rank:(r + 1) * slots_per_rank])
        rows += len(set(new[r * slots_per_rank:(r + 1) * slots_per_rank]) - held)
    return rows
