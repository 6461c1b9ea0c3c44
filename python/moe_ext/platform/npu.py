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


def _hccl_comm_name_of(process_group: Any, global_rank: int) -> str:
    return process_group._get_backend(torch.device("npu")).get_hccl_comm_name(global_rank)


@dataclass
class NpuRuntime:
    """The operator module and the facts about the chip that change how it is called.

    ``soc_version``: "A2" (Atlas 800T A2 class) or "A3" (Atlas A3 class): A3
    dispatch/combine take the TP arguments, and with the v2 operators the
    active-token mask. ``comm_name_fn(process_group, global_rank)`` gives the
    HCCL communicator name MC2 and the fused matmul operators take (see
    :func:`hccl_comm_name` for why the rank is the global one).
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
    def supports_active_mask(self) -> bool:
        # v2 on A3 takes a 1-D mask; v1 documents x_active_mask as "Reserved parameter, currently not
        # used"; on A2 the v2 mask exists only for the fullmesh algorithm, and comm_alg "" may pick
        # hierarchy (by environment variables), so A2 sends every token.
        return self.soc_version == "A3" and self.has_dispatch_v2

    def mc2_unsupported(self, *, ep_world_size: int, moe_expert_num: int, top_k: int, hidden: int,
                        batch: int) -> Optional[str]:
        """Why MC2 dispatch/combine of this runtime refuse these sizes (None when they take them).

        The documented limits of the pinned release (op-plugin 26.1.0 docs of
        npu_moe_distribute_dispatch[_v2] / combine[_v2]), for the algorithms moe_ext uses
        (v2: comm_alg "" = fullmesh on A2 without HCCL_INTRA_* set, fullmesh_v1 on A3).
        """
        a2, v2 = self.soc_version == "A2", self.has_dispatch_v2
        if v2:
            worlds = (set(range(2, 9)) | {16, 32, 64, 128, 256}) if a2 else set(range(2, 769))
        else:
            worlds = {16, 32, 64} if a2 else {8, 16, 32, 64, 128, 144, 256, 288}
        max_experts, max_batch = (1024 if v2 else 512), (256 if a2 else 512)
        max_k = (16 if a2 else 12) if v2 else (16 if a2 else 8)
        local = moe_expert_num // ep_world_size if ep_world_size else 0
        problems = [
            (ep_world_size not in worlds, f"EP world size {ep_world_size} not in the documented set"),
            (not 1 <= moe_expert_num <= max_experts or moe_expert_num % max(ep_world_size, 1),
             f"{moe_expert_num} experts (at most {max_experts}, divisible by the EP size)"),
            (a2 and local > 24, f"{local} experts per rank (at most 24 on A2)"),
            (not a2 and v2 and local * ep_world_size > 2048, "local experts * EP size above 2048"),
            (not 0 < top_k <= min(max_k, moe_expert_num), f"top-k {top_k} (at most {max_k})"),
            (not 0 < batch <= max_batch, f"batch {batch} per rank (at most {max_batch})"),
            (a2 and not (0 < hidden <= 7168 and hidden % 32 == 0), f"hidden {hidden} (A2: <= 7168, multiple of 32)"),
            (not a2 and not v2 and hidden != 7168, f"hidden {hidden} (A3 v1: 7168 only)"),
            (not a2 and v2 and not 1024 <= hidden <= 8192, f"hidden {hidden} (A3: [1024, 8192])"),
        ]
        reasons = [reason for bad, reason in problems if bad]
        return None if not reasons else f"MC2 on {self.soc_version} ({'v2' if v2 else 'v1'}): " + "; ".join(reasons)


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


def hccl_comm_name(runtime: NpuRuntime, process_group: Any, global_rank: Optional[int] = None) -> str:
    """The HCCL communicator name of ``process_group`` for this process (MC2's ``group_ep``, the fused
    matmuls' ``hcom``): ``get_hccl_comm_name(global_rank)``, with this process's global rank by default.

    Why the *global* rank, also for subgroups (issue 21): Ascend's documentation of
    ``ProcessGroup._get_backend(torch.device("npu")).get_hccl_comm_name(rankid, init_comm=True)``
    (op-plugin ``docs/en/custom_APIs/distributed/torch-distributed-distributed_c10d.md``, branch
    26.1.0, the release whose schemas moe_ext pins; the same sentence in the hiascend.com pages of
    Ascend Extension for PyTorch 6.0.0 and later) says: "The input is a global rank ID, which
    uniquely identifies a device across multiple servers", for default and ``new_group`` groups
    alike. torch_npu's own profiler and the operator plugin's MC2 examples pass global ranks for
    subgroups too (the example of ``npu_moe_distribute_dispatch`` calls
    ``ep_group...get_hccl_comm_name(rank)`` with the global rank). Engines disagree among
    themselves (one passes the EP rank for MC2; another the global rank for matmul + all-reduce
    and the group rank for matmul + reduce-scatter); the two agree only when the group is the
    whole world, so moe_ext follows the documentation at every call site, and the emulation
    refuses any other rank.
    """
    import torch.distributed as dist
    rank = dist.get_rank() if global_rank is None else int(global_rank)
    return runtime.comm_name_fn(process_group, rank)


# -- routing: npu_moe_init_routing_v2 / npu_moe_token_unpermute -------------------------------
def init_routing(runtime: NpuRuntime, hidden_states: torch.Tensor, expert_ids: torch.Tensor,
                 num_experts: int, active_expert_range: tuple[int, int], *, alignment: int = 1,
                 scales: Optional[torch.Tensor] = None):
    """Dropless routing over the active range, the NPU form of :func:`moe_ext.ops.moe_permute`.

    Returns a :class:`moe_ext.ops.PermuteResult` (unpacks as ``permuted,
    expanded_row_idx (gather form), expert_tokens (counts, int64)``; attributes
    ``expert_tokens_unpadded`` and ``permuted_scales``).

    ``npu_moe_init_routing_v2`` (torch_npu 7.x / 26.1.0) has neither an
    alignment nor block scales, and documents ``x`` as float16 / bfloat16 /
    float32 / int8. What this path does with each variant (issue 20, item 7):

    - **float8 rows**: moved as their bytes: ``x.view(torch.int8)`` through the
      operator in non-quantised mode (``quant_mode=-1``, which copies int8 rows
      unchanged), viewed back. Needs a torch_npu that holds float8 tensors.
    - **per-token scales** ``[T]`` / ``[T, 1]``: the operator's own ``scale``
      input (documented for non-quantised mode as 1-D ``(NUM_ROWS,)``; its
      ``expanded_scale`` output carries each row's token scale).
    - **per-128-column-block scales** ``[T, ceil(H/128)]``: composed with torch
      operators: one ``index_copy_`` of the scale rows to the positions of
      ``expanded_row_idx`` (the scales are ~1/128 of the row bytes).
    - **alignment** ``A > 1``: composed with torch operators, no host sync:
      padded block starts from the counts (``cumsum``), each valid row's
      padded position by ``searchsorted``, then **one extra copy** of the
      permuted rows into a zeroed buffer of the static bound ``T*K + L*(A-1)``
      rows (pad rows and the tail past the padded total zero). So on NPU the
      aligned permute is two passes over the rows, not one: a native AscendC
      kernel could fuse it (the AscendC issue inherits this answer).

    Ids: ``-1`` ("no expert") is dropped, as by ``moe_permute``; any other id
    outside the active range is dropped too (the operator's contract: remote
    slots mapped outside the range by the caller).
    """
    from moe_ext.ops import _checks
    from moe_ext.ops.routing import PermuteResult

    num_tokens, topk = expert_ids.shape
    start, end = int(active_expert_range[0]), int(active_expert_range[1])
    alignment, bound = _checks.permute_padded_tensors(hidden_states, scales, expert_ids, num_experts, None,
                                                      end - start, alignment)
    is_float8 = hidden_states.dtype in _checks.FLOAT8
    x = hidden_states.view(torch.int8) if is_float8 else hidden_states
    per_token = scales is not None and (scales.dim() == 1 or scales.shape[1] == 1)
    num_rows = expert_ids.numel()
    # -1 = "no expert" (padding slots, as moe_permute): the operator takes ids in [0, expert_num], and
    # num_experts lies outside every active range, so those rows are dropped like remote ones.
    ids = expert_ids.to(torch.int32)
    ids = torch.where(ids == -1, torch.full_like(ids, num_experts), ids)
    permuted, expanded_row_idx, expert_tokens, expanded_scale = runtime.ops.npu_moe_init_routing_v2(
        x, ids,
        scale=scales.reshape(-1) if per_token else None,
        active_num=num_rows, expert_num=num_experts,
        expert_tokens_num_type=1,  # counts, the group_list_type=1 of the grouped matmul
        expert_tokens_num_flag=True,
        active_expert_range=[start, end],
        quant_mode=-1)
    if is_float8:
        permuted = permuted.view(hidden_states.dtype)
    permuted_scales = None
    if per_token:
        permuted_scales = expanded_scale.reshape((num_rows,) + tuple(scales.shape[1:]))
    elif scales is not None:  # block scales: rows follow expanded_row_idx; dropped rows go to a scratch row
        target = torch.where(expanded_row_idx >= 0, expanded_row_idx.to(torch.int64),
                             torch.full_like(expanded_row_idx, num_rows, dtype=torch.int64))
        rows = scales.new_zeros((num_rows + 1, scales.shape[1]))
        rows.index_copy_(0, target, scales.repeat_interleave(topk, dim=0))
        permuted_scales = rows[:num_rows]
    if alignment == 1:
        return PermuteResult(permuted, expanded_row_idx, expert_tokens, None, permuted_scales)

    counts = expert_tokens.to(torch.int64)
    padded = (counts + alignment - 1) // alignment * alignment
    block_start = torch.cumsum(padded, 0) - padded
    ends = torch.cumsum(counts, 0)
    valid = ends[-1] if counts.numel() else counts.new_zeros(())
    # Row p < valid of the unpadded layout belongs to the expert whose count range holds it.
    position = torch.arange(num_rows, device=counts.device)
    expert = torch.searchsorted(ends, position, right=True).clamp_max(max(end - start - 1, 0))
    moved = position - (ends - counts)[expert] + block_start[expert] if counts.numel() else position
    destination = torch.where(position < valid, moved, torch.full_like(position, bound))  # tail: scratch row
    out = permuted.new_zeros((bound + 1, permuted.shape[1])) if not is_float8 else \
        x.new_zeros((bound + 1, permuted.shape[1]))
    out.index_copy_(0, destination, permuted.view(torch.int8) if is_float8 else permuted)
    out = out[:bound].view(hidden_states.dtype) if is_float8 else out[:bound]
    row_idx = expanded_row_idx.to(torch.int64)
    new_row_idx = torch.where(row_idx >= 0, destination[row_idx.clamp_min(0)], row_idx).to(torch.int32)
    if permuted_scales is not None:
        scale_rows = permuted_scales.reshape(num_rows, -1) if num_rows else permuted_scales.reshape(0, 1)
        padded_scales = scale_rows.new_zeros((bound + 1, scale_rows.shape[1]))
        padded_scales.index_copy_(0, destination, scale_rows)
        permuted_scales = padded_scales[:bound].reshape((bound,) + tuple(scales.shape[1:]))
    return PermuteResult(out, new_row_idx, padded, counts, permuted_scales)


def token_unpermute(runtime: NpuRuntime, permuted: torch.Tensor, sorted_indices: torch.Tensor,
                    probs: torch.Tensor) -> torch.Tensor:
    return runtime.ops.npu_moe_token_unpermute(permuted_tokens=permuted, sorted_indices=sorted_indices,
                                               probs=probs)


# -- experts: npu_grouped_matmul + npu_swiglu ----------------------------------------------
def _groups_covering_all_rows(group_list: torch.Tensor, group_list_type: int, num_rows: int) -> torch.Tensor:
    """Cumulative group ends (group_list_type 0) whose last entry is ``num_rows``.

    Issue 21, item 5. ``npu_grouped_matmul``'s documentation (op-plugin 26.1.0,
    ``torch_npu-npu_grouped_matmul.md``, group_type 0 "Single-Single-Single"): "When
    ``group_list_type`` is set to 0, its last value must be identical to the first dimension of
    the tensor in x. When ``group_list_type`` is set to 1, the sum of its values must be
    identical ...". The rows handed to the experts are padded: MC2 dispatch returns A = BS * W *
    min(L, K) rows of which only sum(counts) are valid, init_routing_v2 returns N * K rows of which
    only the local ones are valid. Slicing them to the group sum needs that sum on the host: a
    device-to-host sync on every MoE layer, which stalls the launch queue and cannot be captured
    in an NPU graph. That is not acceptable on the decode path, where MC2 runs. So the rows stay
    padded and the padding joins the last group: the call follows the documentation, costs no
    sync, and the price is the last expert's matmul over the padding rows (their outputs are
    never read: combine reads only the valid rows, and the all-gather path masks them).
    Engines instead pass a group_list that sums to less than the rows and rely on the
    undocumented behaviour that rows past it are left alone, which is cheaper but unverifiable.
    The cumulative form is used because the count form "cannot have length 1" (one local expert).
    """
    ends = torch.cumsum(group_list.to(torch.int64), 0) if group_list_type == 1 else group_list.to(torch.int64)
    return torch.cat([ends[:-1], ends.new_full((1,), num_rows)])


def grouped_gated_mlp(runtime: NpuRuntime, rows: torch.Tensor, group_list: torch.Tensor, group_list_type: int,
                      w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP on rows grouped by expert; w13 [L, H, 2I] (gate | up), w2 [L, I, H].

    ``group_list`` int [L]: rows per local expert (``group_list_type`` 1) or their cumulative sum
    (0), covering the first rows of ``rows``; rows past them are padding, computed by the last
    expert and meaningless in the output (see :func:`_groups_covering_all_rows`).
    """
    ends = _groups_covering_all_rows(group_list, group_list_type, rows.shape[0])
    gate_up = runtime.ops.npu_grouped_matmul([rows], [w13], group_list=ends, group_list_type=0, split_item=2,
                                             group_type=0)[0]
    activated = runtime.ops.npu_swiglu(gate_up, dim=-1)
    return runtime.ops.npu_grouped_matmul([activated], [w2], group_list=ends, group_list_type=0, split_item=2,
                                          group_type=0)[0]


def grouped_matmul(runtime: NpuRuntime, rows: torch.Tensor, group_list: torch.Tensor, group_list_type: int,
                   weight: torch.Tensor) -> torch.Tensor:
    """One grouped matmul ``rows[group g] @ weight[g]`` (``npu_grouped_matmul``); weight [L, K, N].

    As :func:`grouped_gated_mlp`: the padding rows past the groups (MC2's and
    init_routing's outputs are padded) join the last group, so the group list
    covers every row as documented (see :func:`_groups_covering_all_rows`).
    """
    ends = _groups_covering_all_rows(group_list, group_list_type, rows.shape[0])
    return runtime.ops.npu_grouped_matmul(x=[rows], weight=[weight], group_list=ends, group_list_type=0,
                                          split_item=2, group_type=0)[0]

# -- MC2: npu_moe_distribute_dispatch[_v2] / npu_moe_distribute_combine[_v2] ----------------------
# The arguments follow the operators' documentation of the pinned release (op-plugin 26.1.0:
# torch_npu-npu_moe_distribute_dispatch[_v2].md, torch_npu-npu_moe_distribute_combine[_v2].md):
# - no TP domain inside MC2 (the TP split is done before dispatch), so group_tp / tp_world_size /
#   tp_rank_id keep their defaults ("", 0, 0) on both chips. Issue 21, item 3: passing group_tp equal
#   to group_ep broke "group_tp ... must differ from group_ep. An empty value is supported only when
#   there is no TP domain" (A3) and "In eager mode, use the default value" (A2).
# - expand_scales (issue 21, item 4): combine on A2 "Required. ... corresponds to the expand_scales
#   output of dispatch", and dispatch fills expand_scales only when it is given expert_scales ("the
#   output after the alltoallv operation is performed on expert_scales and x"; torch_npu's meta
#   function returns a 0-element tensor otherwise). So on A2 dispatch gets the routing weights and
#   combine its expand_scales; on A3 both are "not supported, retain the default".
# - tp_send_counts: "pass these tensors directly to the corresponding parameters of combine" on A3;
#   on A2 "The TP communication domain is not supported. Use the default value".
# v2 is used whenever the module has it (torch_npu 2.14 always does); v1 remains for older releases.
@dataclass
class DispatchState:
    """What combine needs from its dispatch (passed on untouched, as the documentation requires)."""

    expert_ids: torch.Tensor
    assist_info: torch.Tensor
    ep_recv_counts: torch.Tensor
    tp_recv_counts: torch.Tensor
    expand_scales: torch.Tensor
    active_mask: Optional[torch.Tensor]


def _common_mc2_kwargs(expert_ids, comm_name, ep_world_size, ep_rank_id, moe_expert_num) -> dict:
    return dict(expert_ids=expert_ids, group_ep=comm_name, ep_world_size=ep_world_size, ep_rank_id=ep_rank_id,
                moe_expert_num=moe_expert_num, expert_shard_type=0, shared_expert_rank_num=0, global_bs=0)


def distribute_dispatch(runtime: NpuRuntime, hidden_states: torch.Tensor, expert_ids: torch.Tensor, *,
                        comm_name: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
                        active_mask: Optional[torch.Tensor], expert_weights: Optional[torch.Tensor] = None):
    """Send each (token, expert) row to the rank of its expert.

    ``hidden_states`` [BS, H] bf16/fp16, ``expert_ids`` [BS, K] (made int32),
    ``expert_weights`` [BS, K] (the routing weights; required on A2, where
    combine needs the ``expand_scales`` that dispatch derives from them),
    ``active_mask`` bool [BS] (honoured where the runtime supports it).
    Returns ``(rows [A, H] grouped by local expert then source rank, counts
    int64 [L], state)``; only the first ``counts.sum()`` rows are meaningful.
    """
    expert_ids = expert_ids.to(torch.int32)
    kwargs = _common_mc2_kwargs(expert_ids, comm_name, ep_world_size, ep_rank_id, moe_expert_num)
    if runtime.soc_version == "A2":
        if expert_weights is None:
            raise ValueError("distribute_dispatch: expert_weights must be given on A2 (combine needs expand_scales)")
        kwargs.update(expert_scales=expert_weights.to(torch.float32))
    mask = active_mask if runtime.supports_active_mask else None
    if mask is not None:
        kwargs.update(x_active_mask=mask)
    dispatch = (runtime.ops.npu_moe_distribute_dispatch_v2 if runtime.has_dispatch_v2
                else runtime.ops.npu_moe_distribute_dispatch)
    rows, _dynamic_scales, assist_info, expert_tokens, ep_recv_counts, tp_recv_counts, expand_scales = dispatch(
        hidden_states, quant_mode=0, **kwargs)
    state = DispatchState(expert_ids, assist_info, ep_recv_counts, tp_recv_counts, expand_scales, mask)
    return rows, expert_tokens, state


def distribute_combine(runtime: NpuRuntime, expert_output: torch.Tensor, expert_weights: torch.Tensor,
                       state: DispatchState, *, comm_name: str, ep_world_size: int, ep_rank_id: int,
                       moe_expert_num: int) -> torch.Tensor:
    """Bring expert outputs back and sum them per token with ``expert_weights`` [BS, K] (as fp32).

    ``expert_output`` [A, H]: the rows of dispatch, in its order. Returns [BS, H] in its dtype.
    """
    kwargs = _common_mc2_kwargs(state.expert_ids, comm_name, ep_world_size, ep_rank_id, moe_expert_num)
    kwargs.update(expand_x=expert_output, expert_scales=expert_weights.to(torch.float32),
                  ep_send_counts=state.ep_recv_counts)
    if runtime.has_dispatch_v2:
        kwargs.update(assist_info_for_combine=state.assist_info)
        if state.active_mask is not None:
            kwargs.update(x_active_mask=state.active_mask)
    else:
        kwargs.update(expand_idx=state.assist_info)
    if runtime.soc_version == "A2":
        kwargs.update(expand_scales=state.expand_scales)
    else:
        kwargs.update(tp_send_counts=state.tp_recv_counts)
    combine = (runtime.ops.npu_moe_distribute_combine_v2 if runtime.has_dispatch_v2
               else runtime.ops.npu_moe_distribute_combine)
    return combine(**kwargs)


# -- fused matmul + collective: npu_mm_all_reduce_base / npu_mm_reduce_scatter_base (moe_ext.parallel) --------
# Documented limits (Ascend op-plugin docs for torch_npu.npu_mm_all_reduce_base and
# torch_npu.npu_mm_reduce_scatter_base): reduce_op 'sum' only, comm_turn 0 only;
# matmul + all-reduce exists on A2 only; matmul + reduce-scatter takes a 2-D (m, k) input
# with m divisible by world_size, k in [256, 65535), world_size in {2, 4, 8} on A2 and
# {2, 4, 8, 16, 32} on A3, and no bias; both take float16 / bfloat16 (int8 when quantised).
MM_ALL_REDUCE_WORLD_SIZES = (1, 2, 4, 8)
MM_REDUCE_SCATTER_WORLD_SIZES = {"A2": (2, 4, 8), "A3": (2, 4, 8, 16, 32)}
MM_FLOAT_DTYPES = (torch.float16, torch.bfloat16)
MM_REDUCE_SCATTER_K_RANGE = (256, 65535)  # [low, high)

__all__ += ["MM_ALL_REDUCE_WORLD_SIZES", "MM_REDUCE_SCATTER_WORLD_SIZES", "mm_all_reduce_unsupported",
            "mm_all_reduce", "mm_reduce_scatter_unsupported", "mm_reduce_scatter", "quantize_per_tensor"]


def mm_all_reduce_unsupported(runtime: NpuRuntime, x: torch.Tensor, weight_t: torch.Tensor,
                              world_size: int) -> Optional[str]:
    """Why ``npu_mm_all_reduce_base`` cannot take this call (None when it can)."""
    if runtime.soc_version != "A2":
        return f"npu_mm_all_reduce_base exists on A2 only, this runtime is {runtime.soc_version}"
    if world_size not in MM_ALL_REDUCE_WORLD_SIZES:
        return f"npu_mm_all_reduce_base takes world sizes {MM_ALL_REDUCE_WORLD_SIZES}, got {world_size}"
    if x.dtype not in MM_FLOAT_DTYPES or weight_t.dtype != x.dtype:
        return f"npu_mm_all_reduce_base takes float16/bfloat16 x1 and x2 of one dtype, got {x.dtype}, {weight_t.dtype}"
    if x.dim() not in (2, 3) or weight_t.dim() != 2 or x.shape[-1] != weight_t.shape[0]:
        return (f"npu_mm_all_reduce_base takes x1 (m, k) or (s, m, k) and x2 (k, n), got {tuple(x.shape)} and "
                f"{tuple(weight_t.shape)}")
    return None


def mm_all_reduce(runtime: NpuRuntime, x: torch.Tensor, weight_t: torch.Tensor, comm_name: str, *,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``all_reduce_sum(x @ weight_t + bias)`` in one fused operator.

    ``x`` [m, k] or [s, m, k], ``weight_t`` [k, n] (the transposed linear
    weight), ``bias`` [n] or None: the operator adds it on every rank, so pass
    it on one rank of the group only. Returns [..., n] in ``x``'s dtype.
    """
    return runtime.ops.npu_mm_all_reduce_base(x, weight_t, comm_name, reduce_op="sum", bias=bias, comm_turn=0)


def mm_reduce_scatter_unsupported(runtime: NpuRuntime, x: torch.Tensor, weight_t: torch.Tensor,
                                  world_size: int) -> Optional[str]:
    """Why ``npu_mm_reduce_scatter_base`` cannot take this call (None when it can)."""
    sizes = MM_REDUCE_SCATTER_WORLD_SIZES[runtime.soc_version]
    if world_size not in sizes:
        return f"npu_mm_reduce_scatter_base on {runtime.soc_version} takes world sizes {sizes}, got {world_size}"
    quantised = x.dtype == torch.int8
    if not quantised and x.dtype not in MM_FLOAT_DTYPES:
        return f"npu_mm_reduce_scatter_base takes float16/bfloat16/int8 input, got {x.dtype}"
    if weight_t.dtype != x.dtype:
        return f"npu_mm_reduce_scatter_base takes input and x2 of one dtype, got {x.dtype} and {weight_t.dtype}"
    if x.dim() != 2 or weight_t.dim() != 2 or x.shape[1] != weight_t.shape[0]:
        return (f"npu_mm_reduce_scatter_base takes input (m, k) and x2 (k, n), got {tuple(x.shape)} and "
                f"{tuple(weight_t.shape)}")
    low, high = MM_REDUCE_SCATTER_K_RANGE
    if not low <= x.shape[1] < high:
        return f"npu_mm_reduce_scatter_base takes k in [{low}, {high}), got {x.shape[1]}"
    if x.shape[0] % world_size:
        return f"npu_mm_reduce_scatter_base takes m divisible by world_size {world_size}, got {x.shape[0]}"
    return None


def mm_reduce_scatter(runtime: NpuRuntime, x: torch.Tensor, weight_t: torch.Tensor, comm_name: str,
                      world_size: int, *, x2_scale: Optional[torch.Tensor] = None,
                      output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """This rank's rows of ``sum over the group of x @ weight_t``, in one fused operator.

    ``x`` [m, k], ``weight_t`` [k, n]; returns [m / world_size, n] (rank r gets
    rows [r*m/ws, (r+1)*m/ws)). The operator takes no bias: add it to the
    result. Quantised (the w8a8 path): ``x`` and ``weight_t`` int8,
    ``x2_scale`` float32 [n] (per-channel dequantisation scale) and
    ``output_dtype`` (bfloat16): returns ``x2_scale * (x @ weight_t)`` summed
    and scattered, in ``output_dtype``.
    """
    kwargs = dict(reduce_op="sum", bias=None, comm_turn=0, comm_mode="aiv")
    if x2_scale is not None:
        kwargs.update(x2_scale=x2_scale, output_dtype=output_dtype)
    return runtime.ops.npu_mm_reduce_scatter_base(x, weight_t, comm_name, world_size, **kwargs)


def quantize_per_tensor(x: torch.Tensor, scale_reciprocal: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8 quantisation: ``clamp(round(x * scale_reciprocal + offset), -128, 127)``.

    The activation quantisation of the w8a8 path (round half to even, as
    ``torch.round``); plain torch, so it runs on every backend.
    """
    q = torch.round(x.float() * scale_reciprocal.float() + offset.float())
    return q.clamp_(-128, 127).to(torch.int8)
