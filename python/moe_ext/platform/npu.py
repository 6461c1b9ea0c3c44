"""The torch_npu call sites of moe_ext, in one place.

Every function takes an :class:`NpuRuntime` whose ``ops`` is the module that
provides the operators: ``torch_npu`` on an Ascend machine, or the emulation
:mod:`moe_ext.testing.npu` in CI, which checks these calls against the
operators' documented contracts (not against the hardware). Keep every
torch_npu call here, so that the emulation tests execute all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = ["NpuRuntime", "DispatchState", "detect_npu_runtime", "soc_from_version_number", "hccl_comm_name",
           "init_routing", "token_unpermute", "grouped_gated_mlp", "distribute_dispatch", "distribute_combine"]


def _hccl_comm_name_of(process_group: Any, rank_in_group: int) -> str:
    # The rank only picks the device key; engines pass the group-local rank.
    return process_group._get_backend(torch.device("npu")).get_hccl_comm_name(rank_in_group)


@dataclass
class NpuRuntime:
    """The operator module and the facts about the chip that change how it is called.

    ``soc_version``: "A2" (Atlas 800T A2 class) or "A3" (Atlas A3 class): A3
    dispatch/combine take the TP arguments, and with the v2 operators the
    active-token mask. ``comm_name_fn(process_group, rank_in_group)`` gives the
    HCCL communicator name MC2 needs.
    """

    ops: Any
    soc_version: str
    comm_name_fn: Callable[[Any, int], str] = field(default=_hccl_comm_name_of)

    def __post_init__(self) -> None:
        if self.soc_version not in ("A2", "A3"):
            raise ValueError(f"NpuRuntime: soc_version must be 'A2' or 'A3', got {self.soc_version!r}")

    @property
    def has_dispatch_v2(self) -> bool:
        return hasattr(self.ops, "npu_moe_distribute_dispatch_v2")

    @property
    def needs_tp_arguments(self) -> bool:
        return self.soc_version == "A3"

    @property
    def supports_active_mask(self) -> bool:
        return self.soc_version == "A3" and self.has_dispatch_v2


def soc_from_version_number(version: int) -> Optional[str]:
    """torch_npu's numeric SoC version -> "A2" / "A3" (the ranges engines use), None for others."""
    if 220 <= version <= 225:
        return "A2"
    if 250 <= version <= 255:
        return "A3"
    return None


def detect_npu_runtime() -> Optional[NpuRuntime]:  # pragma: no cover - needs an Ascend machine
    """The real runtime on an Ascend machine, None elsewhere."""
    from moe_ext.platform import has_npu
    if not has_npu():
        return None
    import torch_npu
    soc = soc_from_version_number(int(torch_npu.npu.get_soc_version()))
    return NpuRuntime(torch_npu, soc) if soc else None


def hccl_comm_name(runtime: NpuRuntime, process_group: Any, rank_in_group: int) -> str:
    return runtime.comm_name_fn(process_group, rank_in_group)


# -- routing: npu_moe_init_routing_v2 / npu_moe_token_unpermute -------------------------------
def init_routing(runtime: NpuRuntime, hidden_states: torch.Tensor, expert_ids: torch.Tensor,
                 num_experts: int, active_expert_range: tuple[int, int]):
    """Dropless routing over the active range: (permuted, expanded_row_idx gather form, counts int64)."""
    num_rows = expert_ids.numel()
    permuted, expanded_row_idx, expert_tokens, _ = runtime.ops.npu_moe_init_routing_v2(
        hidden_states, expert_ids.to(torch.int32),
        active_num=num_rows, expert_num=num_experts,
        expert_tokens_num_type=1,  # counts, the group_list_type=1 of the grouped matmul
        expert_tokens_num_flag=True,
        active_expert_range=[int(active_expert_range[0]), int(active_expert_range[1])],
        quant_mode=-1)
    return permuted, expanded_row_idx, expert_tokens


def token_unpermute(runtime: NpuRuntime, permuted: torch.Tensor, sorted_indices: torch.Tensor,
                    probs: torch.Tensor) -> torch.Tensor:
    return runtime.ops.npu_moe_token_unpermute(permuted_tokens=permuted, sorted_indices=sorted_indices,
                                               probs=probs)


# -- experts: npu_grouped_matmul + npu_swiglu ----------------------------------------------
def grouped_gated_mlp(runtime: NpuRuntime, rows: torch.Tensor, group_list: torch.Tensor, group_list_type: int,
                      w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP on rows grouped by expert; w13 [L, H, 2I] (gate | up), w2 [L, I, H]."""
    group_list = group_list.to(torch.int64)
    gate_up = runtime.ops.npu_grouped_matmul(x=[rows], weight=[w13], group_list=group_list,
                                             group_list_type=group_list_type, split_item=2, group_type=0)[0]
    activated = runtime.ops.npu_swiglu(gate_up, dim=-1)
    return runtime.ops.npu_grouped_matmul(x=[activated], weight=[w2], group_list=group_list,
                                          group_list_type=group_list_type, split_item=2, group_type=0)[0]


def grouped_matmul(runtime: NpuRuntime, rows: torch.Tensor, group_list: torch.Tensor, group_list_type: int,
                   weight: torch.Tensor) -> torch.Tensor:
    """One grouped matmul ``rows[group g] @ weight[g]`` (``npu_grouped_matmul``); weight [L, K, N]."""
    return runtime.ops.npu_grouped_matmul(x=[rows], weight=[weight], group_list=group_list.to(torch.int64),
                                          group_list_type=group_list_type, split_item=2, group_type=0)[0]

# -- MC2: npu_moe_distribute_dispatch[_v2] / npu_moe_distribute_combine[_v2] ----------------------
@dataclass
class DispatchState:
    """What combine needs from its dispatch."""

    expert_ids: torch.Tensor
    assist_info: Any
    ep_recv_counts: torch.Tensor
    tp_recv_counts: Any
    active_mask: Optional[torch.Tensor]


def _common_mc2_kwargs(runtime: NpuRuntime, expert_ids, comm_name, ep_world_size, ep_rank_id, moe_expert_num,
                       active_mask) -> dict:
    kwargs = dict(expert_ids=expert_ids, expert_shard_type=0, shared_expert_rank_num=0,
                  moe_expert_num=moe_expert_num, global_bs=0, group_ep=comm_name,
                  ep_world_size=ep_world_size, ep_rank_id=ep_rank_id)
    if runtime.needs_tp_arguments:
        # TP inside MC2 stays off (the TP split is done outside, before dispatch).
        kwargs.update(group_tp=comm_name, tp_world_size=1, tp_rank_id=0)
    if runtime.supports_active_mask and active_mask is not None:
        kwargs.update(x_active_mask=active_mask)
    return kwargs


def distribute_dispatch(runtime: NpuRuntime, hidden_states: torch.Tensor, expert_ids: torch.Tensor, *,
                        comm_name: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
                        active_mask: Optional[torch.Tensor]):
    """Send each (token, expert) row to the rank of its expert.

    Returns ``(rows [A, H] grouped by local expert then source rank, counts
    int64 [L], state)``; only the first ``counts.sum()`` rows are meaningful.
    """
    expert_ids = expert_ids.to(torch.int32)
    kwargs = _common_mc2_kwargs(runtime, expert_ids, comm_name, ep_world_size, ep_rank_id, moe_expert_num,
                                active_mask)
    kwargs.update(x=hidden_states, scales=None, quant_mode=0)
    dispatch = (runtime.ops.npu_moe_distribute_dispatch_v2 if runtime.has_dispatch_v2
                else runtime.ops.npu_moe_distribute_dispatch)
    rows, _dynamic_scales, assist_info, expert_tokens, ep_recv_counts, tp_recv_counts = dispatch(**kwargs)[:6]
    state = DispatchState(expert_ids, assist_info, ep_recv_counts, tp_recv_counts, kwargs.get("x_active_mask"))
    return rows, expert_tokens, state


def distribute_combine(runtime: NpuRuntime, expert_output: torch.Tensor, expert_weights: torch.Tensor,
                       state: DispatchState, *, comm_name: str, ep_world_size: int, ep_rank_id: int,
                       moe_expert_num: int) -> torch.Tensor:
    """Bring expert outputs back and sum them per token with ``expert_weights`` (fp32)."""
    kwargs = _common_mc2_kwargs(runtime, state.expert_ids, comm_name, ep_world_size, ep_rank_id,
                                moe_expert_num, state.active_mask)
    kwargs.update(expand_x=expert_output, expert_scales=expert_weights.to(torch.float32),
                  ep_send_counts=state.ep_recv_counts)
    if runtime.has_dispatch_v2:
        kwargs.update(assist_info_for_combine=state.assist_info)
    else:
        kwargs.update(expand_idx=state.assist_info)
    if runtime.needs_tp_arguments:
        kwargs.update(tp_send_counts=state.tp_recv_counts)
    combine = (runtime.ops.npu_moe_distribute_combine_v2 if runtime.has_dispatch_v2
               else runtime.ops.npu_moe_distribute_combine)
    return combine(**kwargs)
