"""An emulation, on CPU and any torch.distributed backend, of the torch_npu operators moe_ext calls.

Written from the operators' documented contracts (see docs/moe_layer.md):
row orders, outputs, counts, the received-token layout of MC2 dispatch. It
checks moe_ext's *wiring* of those calls — argument names, dtypes, shapes,
what is passed from dispatch to combine, which rows are read — against the
documentation, not against the hardware. Where the documentation leaves
something open the emulation is loud instead of guessing:

- rows an operator leaves unwritten or undefined (past the valid count of
  ``npu_moe_init_routing_v2``, past the last group of ``npu_grouped_matmul``,
  past the received rows of dispatch) are filled with NaN, so reading them
  shows up;
- combine output rows of tokens masked out by ``x_active_mask`` are NaN;
- ``assist_info_for_combine`` is an opaque token that combine accepts only
  from the matching dispatch;
- quantisation modes, ``row_idx_type``/count types beyond the documented
  ones, TP inside MC2 (``tp_world_size > 1``), shared experts and
  ``global_bs`` raise ``NotImplementedError``;
- documented limits (batch size, hidden size, top-k, world sizes, duplicate
  experts in a row, mask shape) raise ``ValueError``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_ext.platform.npu import NpuRuntime

__all__ = ["EmulatedTorchNpu", "emulated_runtime"]

_A2_WORLD_SIZES = set(range(2, 9)) | {16, 32, 64, 128, 256}


def _unwritten(shape, dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, -(2 ** 31) + 7, dtype=dtype)  # an implausible value for int rows


class _AssistInfo:
    """Opaque stand-in for ``assist_info_for_combine`` (its contents are not documented)."""

    def __init__(self, dispatch_id: int):
        self.dispatch_id = dispatch_id


@dataclass
class _DispatchRecord:
    dispatch_id: int
    expert_ids: torch.Tensor
    active: torch.Tensor          # [BS*K] bool: entries that were sent
    expand_idx: torch.Tensor      # [BS*K] int32
    ep_recv_counts: torch.Tensor
    block_sizes: torch.Tensor     # [L, W] rows this rank received per (local expert, source)
    sent_per_expert: torch.Tensor  # [E] rows this rank sent per expert
    assist: Any


class EmulatedTorchNpu:
    """Stands in for the ``torch_npu`` module in :class:`NpuRuntime`.

    ``soc_version`` "A2" or "A3" selects the documented limits and argument
    sets; ``with_v2`` whether the ``_v2`` dispatch/combine operators exist.
    Process groups used by MC2 are registered with :meth:`comm_name`.
    """

    def __init__(self, soc_version: str = "A3", with_v2: bool = True):
        self.soc_version = soc_version
        self.with_v2 = with_v2
        self._groups: dict[str, Any] = {}
        self._records: dict[str, _DispatchRecord] = {}
        self._ids = itertools.count(1)
        if with_v2:
            self.npu_moe_distribute_dispatch_v2 = self._dispatch_v2
            self.npu_moe_distribute_combine_v2 = self._combine_v2
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    # -- HCCL communicator names ---------------------------------------------------------
    def comm_name(self, process_group: Any, rank_in_group: int) -> str:
        name = f"emulated_hccl_{id(process_group):x}"
        self._groups[name] = process_group
        return name

    def _group(self, name: str):
        if name not in self._groups:
            raise ValueError(f"emulated torch_npu: unknown HCCL communicator name {name!r}")
        return self._groups[name]

    # -- npu_moe_init_routing_v2 ---------------------------------------------------------
    def npu_moe_init_routing_v2(self, x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                                expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                                expert_tokens_num_flag=False, quant_mode=-1, active_expert_range=(),
                                row_idx_type=0):
        self._count("npu_moe_init_routing_v2")
        if expert_idx.dtype != torch.int32 or expert_idx.dim() != 2 or x.dim() != 2 or \
                x.shape[0] != expert_idx.shape[0]:
            raise ValueError(f"npu_moe_init_routing_v2: expert_idx must be int32 [N, K] matching x [N, H], got "
                             f"{expert_idx.dtype} {tuple(expert_idx.shape)} and x {tuple(x.shape)}")
        if drop_pad_mode != 0 or quant_mode != -1 or scale is not None or offset is not None:
            raise NotImplementedError("emulated npu_moe_init_routing_v2: only dropless, unquantised, no scale")
        if expert_tokens_num_type not in (0, 1) or row_idx_type not in (0, 1):
            raise NotImplementedError("emulated npu_moe_init_routing_v2: count types 0/1 and row_idx_type 0/1 only")
        start, end = (list(active_expert_range) or [0, expert_num])
        num_tokens, top_k = expert_idx.shape
        flat = expert_idx.reshape(-1).to(torch.int64)
        in_range = (flat >= start) & (flat < end)
        key = torch.where(in_range, flat, torch.full_like(flat, 2 ** 40))  # below start and at/after end: last
        order = torch.sort(key, stable=True).indices
        avail = int(in_range.sum())
        valid = active_num if 0 < active_num < avail else avail
        out_rows = min(active_num, num_tokens * top_k) if active_num > 0 else num_tokens * top_k
        expanded_x = _unwritten((out_rows, x.shape[1]), x.dtype)
        expanded_x[:valid] = x[order[:valid] // top_k]
        if row_idx_type == 0:
            row_idx = torch.full((num_tokens * top_k,), -1, dtype=torch.int32)
            row_idx[order[:valid]] = torch.arange(valid, dtype=torch.int32)
        else:
            row_idx = order.to(torch.int32)
        counts = torch.bincount(flat[in_range] - start, minlength=end - start).to(torch.int64)
        if expert_tokens_num_type == 0:
            counts = torch.cumsum(counts, 0)
        return expanded_x, row_idx, (counts if expert_tokens_num_flag else None), None

    # -- npu_moe_token_unpermute ---------------------------------------------------------
    def npu_moe_token_unpermute(self, permuted_tokens, sorted_indices, probs=None, padded_mode=False,
                                restore_shape=None):
        self._count("npu_moe_token_unpermute")
        if padded_mode:
            raise NotImplementedError("npu_moe_token_unpermute: padded_mode=True is unsupported")
        top_k = probs.shape[1] if probs is not None else 1
        index = sorted_indices.to(torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= permuted_tokens.shape[0]):
            raise ValueError(f"npu_moe_token_unpermute: sorted_indices must lie in [0, {permuted_tokens.shape[0]}), "
                             f"got [{int(index.min())}, {int(index.max())}]")
        if torch.unique(index).numel() != index.numel():
            raise ValueError("npu_moe_token_unpermute: sorted_indices must not repeat")
        rows = permuted_tokens.index_select(0, index).float().view(-1, top_k, permuted_tokens.shape[1])
        if probs is not None:
            rows = rows * probs.float().unsqueeze(2)
        return rows.sum(1).to(permuted_tokens.dtype)

    # -- npu_grouped_matmul / npu_swiglu -------------------------------------------------
    def npu_grouped_matmul(self, x, weight, *, bias=None, group_list=None, split_item=0, group_type=None,
                           group_list_type=0, **unsupported):
        self._count("npu_grouped_matmul")
        if unsupported or bias is not None:
            raise NotImplementedError(f"emulated npu_grouped_matmul: unsupported arguments {sorted(unsupported)}")
        if len(x) != 1 or len(weight) != 1 or weight[0].dim() != 3 or group_type != 0 or split_item not in (2, 3):
            raise NotImplementedError("emulated npu_grouped_matmul: only the MoE form x=[X], weight=[W (E,K,N)], "
                                      "group_type=0, split_item 2/3")
        rows, w = x[0], weight[0]
        if group_list is None or group_list.dtype != torch.int64 or tuple(group_list.shape) != (w.shape[0],):
            raise ValueError(f"npu_grouped_matmul: group_list must be int64 [{w.shape[0]}]")
        if group_list_type not in (0, 1):
            raise ValueError(f"npu_grouped_matmul: group_list_type must be 0 or 1, got {group_list_type}")
        ends = group_list if group_list_type == 0 else torch.cumsum(group_list, 0)
        if ends.numel() and int(ends[-1]) > rows.shape[0]:
            raise ValueError(f"npu_grouped_matmul: groups cover {int(ends[-1])} rows, x has {rows.shape[0]}")
        out = _unwritten((rows.shape[0], w.shape[2]), rows.dtype)  # rows past the last group: random on NPU
        start = 0
        for group, end in enumerate(ends.tolist()):
            if end > start:
                out[start:end] = (rows[start:end].float() @ w[group].float()).to(rows.dtype)
            start = end
        return [out]

    def npu_swiglu(self, x, dim=-1):
        self._count("npu_swiglu")
        a, b = x.chunk(2, dim=dim)
        return (F.silu(a.float()) * b.float()).to(x.dtype)

    # -- MC2 dispatch -------------------------------------------------------------------
    def npu_moe_distribute_dispatch(self, **kwargs):
        self._count("npu_moe_distribute_dispatch")
        if "x_active_mask" in kwargs:
            raise TypeError("npu_moe_distribute_dispatch (v1) takes no x_active_mask")
        return self._dispatch(v2=False, **kwargs)

    def _dispatch_v2(self, **kwargs):
        self._count("npu_moe_distribute_dispatch_v2")
        return self._dispatch(v2=True, **kwargs)

    def _check_common(self, v2, x_shape, expert_ids, ep_world_size, moe_expert_num, group_tp, tp_world_size,
                      expert_shard_type, shared_expert_rank_num, global_bs):
        batch, top_k = expert_ids.shape
        hidden = x_shape[1] if x_shape is not None else None
        if expert_ids.dtype != torch.int32:
            raise ValueError(f"MC2: expert_ids must be int32, got {expert_ids.dtype}")
        if expert_shard_type != 0 or shared_expert_rank_num != 0 or global_bs != 0:
            raise NotImplementedError("emulated MC2: shared experts and global_bs are not emulated")
        if moe_expert_num % ep_world_size:
            raise ValueError(f"MC2: moe_expert_num {moe_expert_num} must divide by ep_world_size {ep_world_size}")
        if top_k > 16:
            raise ValueError(f"MC2: K must be <= 16, got {top_k}")
        if self.soc_version == "A2":
            if batch > 256 or ep_world_size not in _A2_WORLD_SIZES:
                raise ValueError(f"MC2 on A2: BS <= 256 and W in {sorted(_A2_WORLD_SIZES)}, got BS={batch}, "
                                 f"W={ep_world_size}")
            if hidden is not None and (hidden > 7168 or hidden % 32):
                raise ValueError(f"MC2 on A2: H must be <= 7168 and a multiple of 32, got {hidden}")
        else:
            if batch > 512 or not 2 <= ep_world_size <= 768 or moe_expert_num > 1024:
                raise ValueError(f"MC2 on A3: BS <= 512, W in [2, 768], experts <= 1024; got BS={batch}, "
                                 f"W={ep_world_size}, experts={moe_expert_num}")
            if v2 and hidden is not None and not 1024 <= hidden <= 8192:
                raise ValueError(f"MC2 v2 on A3: H must be in [1024, 8192], got {hidden}")
            if not group_tp or tp_world_size < 1:
                raise ValueError("MC2 on A3: group_tp, tp_world_size and tp_rank_id must be passed")
        if tp_world_size > 1:
            raise NotImplementedError("emulated MC2: the layout with tp_world_size > 1 is not documented")
        if batch and (torch.sort(expert_ids, 1).values.diff(dim=1) == 0).any():
            raise ValueError("MC2: a token's expert_ids must not repeat")
        if batch and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= moe_expert_num):
            raise ValueError(f"MC2: expert_ids must lie in [0, {moe_expert_num})")

    def _dispatch(self, *, v2, x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales=None,
                  x_active_mask=None, group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                  shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0, global_bs=0,
                  expert_token_nums_type=1):
        self._check_common(v2, tuple(x.shape), expert_ids, ep_world_size, moe_expert_num, group_tp, tp_world_size,
                           expert_shard_type, shared_expert_rank_num, global_bs)
        if quant_mode != 0 or scales is not None:
            raise NotImplementedError("emulated MC2 dispatch: quantisation is not emulated")
        if expert_token_nums_type not in (0, 1):
            raise ValueError(f"MC2 dispatch: expert_token_nums_type must be 0 or 1, got {expert_token_nums_type}")
        group = self._group(group_ep)
        world = dist.get_world_size(group)
        if world != ep_world_size or dist.get_rank(group) != ep_rank_id:
            raise ValueError(f"MC2 dispatch: ep_world_size/ep_rank_id {ep_world_size}/{ep_rank_id} do not match "
                             f"the group ({world}/{dist.get_rank(group)})")
        batch, top_k = expert_ids.shape
        hidden = x.shape[1]
        num_local = moe_expert_num // world
        device = x.device

        active_tokens = torch.ones(batch, dtype=torch.bool, device=device)
        if x_active_mask is not None:
            if x_active_mask.dtype != torch.bool or tuple(x_active_mask.shape) != (batch,):
                raise ValueError(f"MC2 dispatch: x_active_mask must be bool [{batch}], got "
                                 f"{x_active_mask.dtype} {tuple(x_active_mask.shape)}")
            num_true = int(x_active_mask.sum())
            if not bool(x_active_mask[:num_true].all()):
                raise ValueError("MC2 dispatch: x_active_mask must have all trues before any false")
            active_tokens = x_active_mask
        # global_bs = 0 means BS * W: every rank must bring the same BS.
        batches = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(batches, torch.tensor([batch], dtype=torch.int64, device=device), group=group)
        if any(int(b) != batch for b in batches):
            raise ValueError(f"MC2 dispatch: with global_bs=0 every rank needs the same BS, got "
                             f"{[int(b) for b in batches]}")

        flat = expert_ids.reshape(-1).to(torch.int64)
        active = active_tokens.repeat_interleave(top_k)
        # expand_idx: earlier active entries of this rank with the same expert.
        expand_idx = torch.full((batch * top_k,), -1, dtype=torch.int32, device=device)
        seen = torch.zeros(moe_expert_num, dtype=torch.int64)
        for f in range(batch * top_k):
            if bool(active[f]):
                expand_idx[f] = int(seen[flat[f]])
                seen[flat[f]] += 1
        sent_per_expert = seen
        order = torch.sort(torch.where(active, flat, torch.full_like(flat, moe_expert_num)), stable=True).indices
        order = order[: int(active.sum())]
        send_rows = x.index_select(0, order // top_k)
        send_counts = sent_per_expert.to(device)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)  # [W*L]: source s, local expert le
        input_splits = send_counts.view(world, num_local).sum(1).tolist()
        output_splits = recv_counts.view(world, num_local).sum(1).tolist()
        received = x.new_empty((sum(output_splits), hidden))
        dist.all_to_all_single(received, send_rows.contiguous(), output_splits, input_splits, group=group)

        block_sizes = recv_counts.view(world, num_local).t().contiguous()  # [L, W]
        rows_out = batch * world * min(num_local, top_k)
        expand_x = _unwritten((rows_out, hidden), x.dtype).to(device)
        source_start = torch.cumsum(torch.tensor([0] + output_splits[:-1]), 0).tolist()
        inside_source = [0] * world
        write = 0
        for le in range(num_local):
            for s in range(world):
                size = int(block_sizes[le, s])
                begin = source_start[s] + inside_source[s]
                expand_x[write:write + size] = received[begin:begin + size]
                inside_source[s] += size
                write += size
        expert_token_nums = block_sizes.sum(1).to(torch.int64)
        if expert_token_nums_type == 0:
            expert_token_nums = torch.cumsum(expert_token_nums, 0)
        ep_recv_counts = torch.cumsum(block_sizes.reshape(-1), 0).to(torch.int32)
        if self.soc_version == "A2":  # larger on A2; what the extra entries hold is not documented
            ep_recv_counts = torch.cat([ep_recv_counts, torch.full((world,), -1, dtype=torch.int32)])
        tp_recv_counts = (torch.tensor([write], dtype=torch.int32) if self.soc_version == "A3"
                          else torch.empty(0, dtype=torch.int32))
        dispatch_id = next(self._ids)
        assist = _AssistInfo(dispatch_id) if v2 else expand_idx
        self._records[group_ep] = _DispatchRecord(dispatch_id, expert_ids.clone(), active, expand_idx,
                                                  ep_recv_counts.clone(), block_sizes, sent_per_expert, assist)
        dynamic_scales = torch.full((rows_out,), float("nan"), dtype=torch.float32)
        expand_scales = torch.full((rows_out,), float("nan"), dtype=torch.float32)
        return (expand_x, dynamic_scales, assist, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales)

    # -- MC2 combine --------------------------------------------------------------------
    def npu_moe_distribute_combine(self, *, expand_idx, **kwargs):
        self._count("npu_moe_distribute_combine")
        if "x_active_mask" in kwargs:
            raise TypeError("npu_moe_distribute_combine (v1) takes no x_active_mask")
        return self._combine(v2=False, handle=expand_idx, **kwargs)

    def _combine_v2(self, *, assist_info_for_combine, **kwargs):
        self._count("npu_moe_distribute_combine_v2")
        return self._combine(v2=True, handle=assist_info_for_combine, **kwargs)

    def _combine(self, *, v2, handle, expand_x, expert_ids, expert_scales, ep_send_counts, group_ep, ep_world_size,
                 ep_rank_id, moe_expert_num, x_active_mask=None, tp_send_counts=None, group_tp="", tp_world_size=0,
                 tp_rank_id=0, expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, global_bs=0,
                 shared_expert_x=None):
        self._check_common(v2, tuple(expand_x.shape) if expand_x.dim() == 2 else None, expert_ids, ep_world_size,
                           moe_expert_num, group_tp, tp_world_size, expert_shard_type, shared_expert_rank_num,
                           global_bs)
        record = self._records.get(group_ep)
        if record is None:
            raise ValueError("MC2 combine: no dispatch on this communicator to combine")
        if v2 and not (isinstance(handle, _AssistInfo) and handle is record.assist):
            raise ValueError("MC2 combine_v2: assist_info_for_combine must be the one its dispatch_v2 returned")
        if not v2 and not torch.equal(handle, record.expand_idx):
            raise ValueError("MC2 combine: expand_idx must be the one its dispatch returned")
        if not torch.equal(expert_ids, record.expert_ids) or not torch.equal(ep_send_counts, record.ep_recv_counts):
            raise ValueError("MC2 combine: expert_ids and ep_send_counts must be those of the dispatch")
        if self.soc_version == "A3" and tp_send_counts is None:
            raise ValueError("MC2 combine on A3: tp_send_counts must be passed")
        if shared_expert_x is not None:
            raise NotImplementedError("emulated MC2 combine: shared_expert_x is not emulated")
        if expert_scales.dtype != torch.float32 or expert_scales.shape != expert_ids.shape:
            raise ValueError(f"MC2 combine: expert_scales must be fp32 {tuple(expert_ids.shape)}")
        group = self._group(group_ep)
        world = ep_world_size
        num_local = moe_expert_num // world
        batch, top_k = expert_ids.shape
        hidden = expand_x.shape[1]
        # Destination side: block (le, s) starts at the exclusive cumsum of ep_send_counts.
        block_ends = ep_send_counts[: world * num_local].to(torch.int64)
        block_starts = (block_ends - torch.diff(block_ends, prepend=block_ends.new_zeros(1))).view(num_local, world)
        sizes = record.block_sizes
        back = [torch.cat([expand_x[int(block_starts[le, s]):int(block_starts[le, s]) + int(sizes[le, s])]
                           for le in range(num_local)]) for s in range(world)]
        output_splits = record.sent_per_expert.view(world, num_local).sum(1).tolist()
        returned = expand_x.new_empty((sum(output_splits), hidden))
        dist.all_to_all_single(returned, torch.cat(back).contiguous(), output_splits,
                               [b.shape[0] for b in back], group=group)
        # Source side: out[t] = sum_k scale * Y_dest[offset(le, s) + expand_idx[t*K+k]].
        chunk_start = torch.cumsum(torch.tensor([0] + output_splits[:-1]), 0)
        per_expert = record.sent_per_expert.view(world, num_local)
        start_in_chunk = torch.cumsum(per_expert, 1) - per_expert
        out = torch.zeros((batch, hidden), dtype=torch.float32)
        flat = expert_ids.reshape(-1).to(torch.int64)
        for f in range(batch * top_k):
            if not bool(record.active[f]):
                continue
            dest, le = divmod(int(flat[f]), num_local)
            row = int(chunk_start[dest]) + int(start_in_chunk[dest, le]) + int(record.expand_idx[f])
            out[f // top_k] += float(expert_scales.view(-1)[f]) * returned[row].float()
        inactive_tokens = ~record.active.view(batch, top_k).any(1)
        out[inactive_tokens] = float("nan")  # combine output of masked tokens is not documented
        return out.to(expand_x.dtype)


def emulated_runtime(soc_version: str = "A3", with_v2: bool = True) -> NpuRuntime:
    """An :class:`NpuRuntime` backed by :class:`EmulatedTorchNpu` (CPU tensors)."""
    ops = EmulatedTorchNpu(soc_version, with_v2)
    return NpuRuntime(ops, soc_version, comm_name_fn=ops.comm_name)


# -- fused matmul + collective: npu_mm_all_reduce_base / npu_mm_reduce_scatter_base --------------------------
# Written from the Ascend op-plugin documentation of the two operators (see
# moe_ext.platform.npu for the limits). They are attached to EmulatedTorchNpu from
# here so that this block stays in one place. The signatures carry every argument of
# torch-npu 2.14's schemas by name (the reduce-scatter's first argument is the schema's
# ``self``, called ``self_`` here), so they take a direct call and a schema-bound one alike;
# arguments the emulation does not model must keep their defaults. Value errors raise
# ArgumentError (a ValueError), tensor dtype errors TypeError. Arithmetic: the local
# matmul in float32 (float64 for int8 inputs: exact), the collective in float32, then one
# rounding to the output dtype; the hardware's accumulation order is not emulated.


def _mm_refuse(op: str, message: str) -> None:
    from moe_ext.errors import ArgumentError
    raise ArgumentError(f"{op}: {message}")


def _mm_not_modelled(op: str, **arguments) -> None:
    changed = sorted(name for name, value in arguments.items()
                     if value is not None and (isinstance(value, torch.Tensor) or value != 0))
    if changed:
        raise NotImplementedError(f"emulated {op}: arguments {changed} are not emulated (only their defaults)")


def _emulated_mm_all_reduce_base(self, x1, x2, hcom, *, reduce_op="sum", bias=None, antiquant_scale=None,
                                 antiquant_offset=None, x3=None, dequant_scale=None, pertoken_scale=None,
                                 comm_quant_scale_1=None, comm_quant_scale_2=None, antiquant_group_size=0,
                                 comm_turn=0, group_sizes=None, y_dtype=None, x1_dtype=None, x2_dtype=None,
                                 dequant_scale_dtype=None, pertoken_scale_dtype=None, comm_quant_mode=0,
                                 comm_mode=None):
    op = "npu_mm_all_reduce_base"
    if hasattr(self, "_count"):
        self._count(op)
    from moe_ext.platform.npu import MM_ALL_REDUCE_WORLD_SIZES, MM_FLOAT_DTYPES
    _mm_not_modelled(op, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                     dequant_scale=dequant_scale, pertoken_scale=pertoken_scale, comm_quant_scale_1=comm_quant_scale_1,
                     comm_quant_scale_2=comm_quant_scale_2, antiquant_group_size=antiquant_group_size,
                     group_sizes=group_sizes, y_dtype=y_dtype, x1_dtype=x1_dtype, x2_dtype=x2_dtype,
                     dequant_scale_dtype=dequant_scale_dtype, pertoken_scale_dtype=pertoken_scale_dtype,
                     comm_quant_mode=comm_quant_mode, comm_mode=comm_mode)
    if self.soc_version != "A2":
        raise RuntimeError(f"{op}: supported on Atlas A2 only, this is {self.soc_version}")
    if reduce_op != "sum" or comm_turn != 0:
        _mm_refuse(op, f"reduce_op must be 'sum' and comm_turn 0, got {reduce_op!r}, {comm_turn}")
    if x1.dtype not in MM_FLOAT_DTYPES or x2.dtype != x1.dtype:
        raise TypeError(f"{op}: x1 and x2 must be float16/bfloat16 of one dtype, got {x1.dtype}, {x2.dtype}")
    if x1.dim() not in (2, 3) or x2.dim() != 2 or x1.shape[-1] != x2.shape[0]:
        _mm_refuse(op, f"x1 must be (m, k) or (s, m, k) and x2 (k, n), got {tuple(x1.shape)} and {tuple(x2.shape)}")
    n = x2.shape[1]
    if bias is not None and (bias.dtype != x1.dtype or tuple(bias.shape) != (n,)):
        _mm_refuse(op, f"bias must be {x1.dtype} [{n}], got {bias.dtype} {tuple(bias.shape)}")
    out_shape = tuple(x1.shape[:-1]) + (n,)
    if x3 is not None and (x3.dtype != x1.dtype or tuple(x3.shape) != out_shape):
        _mm_refuse(op, f"x3 must be {x1.dtype} {out_shape}, got {x3.dtype} {tuple(x3.shape)}")
    group = self._groups.get(hcom)
    if group is None:
        _mm_refuse(op, f"unknown HCCL communicator name {hcom!r}")
    world = dist.get_world_size(group)
    if world not in MM_ALL_REDUCE_WORLD_SIZES:
        _mm_refuse(op, f"the communicator must have {MM_ALL_REDUCE_WORLD_SIZES} ranks, got {world}")
    local = x1.float() @ x2.float()
    if bias is not None:
        local = local + bias.float()
    if x3 is not None:
        local = local + x3.float()
    local = local.contiguous()
    dist.all_reduce(local, group=group)
    return local.to(x1.dtype)


def _emulated_mm_reduce_scatter_base(self, self_, x2, hcom, world_size, *, reduce_op="sum", bias=None,
                                     x1_scale=None, x2_scale=None, comm_turn=0, output_dtype=None, comm_mode=None):
    op = "npu_mm_reduce_scatter_base"
    if hasattr(self, "_count"):
        self._count(op)
    from moe_ext.platform.npu import MM_FLOAT_DTYPES, MM_REDUCE_SCATTER_K_RANGE, MM_REDUCE_SCATTER_WORLD_SIZES
    x1 = self_
    if reduce_op != "sum" or comm_turn != 0:
        _mm_refuse(op, f"reduce_op must be 'sum' and comm_turn 0, got {reduce_op!r}, {comm_turn}")
    if bias is not None:
        _mm_refuse(op, "bias is not supported (must be None)")
    if x1_scale is not None:
        raise NotImplementedError(f"emulated {op}: x1_scale (per-token) is not emulated")
    if comm_mode not in (None, "aiv", "ai_cpu"):
        _mm_refuse(op, f"comm_mode must be None, 'aiv' or 'ai_cpu', got {comm_mode!r}")
    sizes = MM_REDUCE_SCATTER_WORLD_SIZES[self.soc_version]
    group = self._groups.get(hcom)
    if group is None:
        _mm_refuse(op, f"unknown HCCL communicator name {hcom!r}")
    if world_size not in sizes or world_size != dist.get_world_size(group):
        _mm_refuse(op, f"world_size must be in {sizes} on {self.soc_version} and equal the communicator's size "
                       f"{dist.get_world_size(group)}, got {world_size}")
    if x1.dim() != 2 or x2.dim() != 2 or x1.shape[1] != x2.shape[0]:
        _mm_refuse(op, f"input must be (m, k) and x2 (k, n), got {tuple(x1.shape)} and {tuple(x2.shape)}")
    m, k = x1.shape
    n = x2.shape[1]
    low, high = MM_REDUCE_SCATTER_K_RANGE
    if not low <= k < high or m % world_size:
        _mm_refuse(op, f"k must lie in [{low}, {high}) and m divide by world_size {world_size}, got m={m}, k={k}")
    if x1.dtype == torch.int8:
        if x2.dtype != torch.int8:
            raise TypeError(f"{op}: the int8 form needs an int8 x2, got {x2.dtype}")
        if comm_mode != "aiv":
            _mm_refuse(op, f"the int8 form needs comm_mode='aiv', got {comm_mode!r}")
        if x2_scale is None or x2_scale.dtype != torch.float32 or tuple(x2_scale.shape) not in ((n,), (1,)):
            raise NotImplementedError(f"emulated {op}: the int8 form is emulated with a float32 x2_scale of shape "
                                      f"[{n}] or [1] only (the int64-encoded scale is not documented here)")
        if output_dtype not in MM_FLOAT_DTYPES:
            _mm_refuse(op, f"the int8 form needs output_dtype float16/bfloat16, got {output_dtype}")
        local = ((x1.double() @ x2.double()) * x2_scale.double()).float()
        out_dtype = output_dtype
    else:
        if x1.dtype not in MM_FLOAT_DTYPES or x2.dtype != x1.dtype:
            raise TypeError(f"{op}: input and x2 must be float16/bfloat16 (or int8) of one dtype, got {x1.dtype}, "
                            f"{x2.dtype}")
        if x2_scale is not None or output_dtype not in (None, x1.dtype):
            _mm_refuse(op, "x2_scale and another output_dtype belong to the int8 form")
        local = x1.float() @ x2.float()
        out_dtype = x1.dtype
    out = local.new_empty((m // world_size, n))
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, local.contiguous(), group=group)
    return out.to(out_dtype)


EmulatedTorchNpu.npu_mm_all_reduce_base = _emulated_mm_all_reduce_base
EmulatedTorchNpu.npu_mm_reduce_scatter_base = _emulated_mm_reduce_scatter_base
