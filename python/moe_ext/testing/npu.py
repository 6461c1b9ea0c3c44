"""An emulation, on CPU and any torch.distributed backend, of the torch_npu operators moe_ext calls.

What is checked, and against what:

- **binding** — every emulated operator is reached only through the real
  schema of torch-npu :data:`~moe_ext.testing.npu_schemas.TORCH_NPU_VERSION`
  (:mod:`moe_ext.testing.npu_schemas`): torch's schema matcher binds the call
  exactly as it binds ``torch_npu.npu_X`` (a wrong keyword, a keyword-only
  argument passed by position, a missing argument or a wrong type fails), and
  checks that the emulation returns the declared number and kind of outputs;
- **behaviour** — emulated from the operators' documentation: Ascend's
  op-plugin documentation of the pinned release (branch ``26.1.0`` of
  Ascend/op-plugin, whose ``op_plugin_functions.yaml`` declares exactly the
  wheel's schemas for these operators) and the output shapes of torch_npu's
  own meta functions (``torch_npu/op_plugin/meta/_meta_registrations.py`` in
  the wheel). Documented dtypes and limits are refused as the operator refuses
  them: :class:`~moe_ext.errors.ArgumentError` (a ``ValueError``) for a value,
  ``TypeError`` for a tensor dtype;
- never run on Ascend hardware: nothing here says how the hardware behaves
  where the documentation is silent.

Where the documentation leaves something open the emulation is loud instead
of guessing:

- rows an operator leaves unwritten (past the valid count of
  ``npu_moe_init_routing_v2``, past the received rows of MC2 dispatch) are
  NaN, so reading them shows up;
- combine output rows of tokens masked out by ``x_active_mask`` are NaN;
- ``expand_idx`` / ``assist_info_for_combine`` / ``ep_recv_counts`` /
  ``expand_scales`` / ``tp_recv_counts`` are accepted by combine only as the
  very tensors its dispatch returned (the documentation: pass them on, depend
  on nothing in them);
- quantisation, shared / special experts, TP inside MC2, ``global_bs`` other
  than ``0`` or ``BS * W``, the hierarchy and fullmesh_v2 MC2 algorithms,
  key-value expert counts and the ``int[]`` overload of the grouped matmul
  raise ``NotImplementedError``.

One behaviour is assumed rather than documented: several MC2 dispatches may
be in flight on one communicator (two micro-batches), each combine matched
to its own dispatch by the handle that dispatch returned. The documentation
only says a dispatch is paired with a combine; whether the HCCL window allows
a second dispatch before the first combine on the hardware is unverified.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_ext.errors import ArgumentError
from moe_ext.platform.npu import NpuRuntime
from moe_ext.testing import npu_schemas

__all__ = ["EmulatedTorchNpu", "emulated_runtime"]

_FLOAT_16 = (torch.bfloat16, torch.float16)
# MC2 EP world sizes (torch_npu docs, op-plugin 26.1.0, npu_moe_distribute_dispatch[_v2]).
_V1_WORLD_SIZES = {"A2": {16, 32, 64}, "A3": {8, 16, 32, 64, 128, 144, 256, 288}}
_V2_A2_FULLMESH_WORLD_SIZES = set(range(2, 9)) | {16, 32, 64, 128, 256}


def _unwritten(shape, dtype, device=None) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    # an implausible value for int rows (int8 rows too: fp8 dispatch moves its bytes as int8)
    return torch.full(shape, torch.iinfo(dtype).min + 7, dtype=dtype, device=device)


def _same_tensor(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _require_dtype(op: str, name: str, tensor: torch.Tensor, allowed) -> None:
    if tensor.dtype not in allowed:
        raise TypeError(f"{op}: {name} must be {' or '.join(str(d) for d in allowed)}, got {tensor.dtype}")


def _refuse(op: str, message: str) -> None:
    raise ArgumentError(f"{op}: {message}")


@dataclass
class _DispatchRecord:
    dispatch_id: int
    v2: bool
    batch: int
    rows_out: int                 # A: the rows of expand_x
    expert_ids: torch.Tensor
    active: torch.Tensor          # [BS*K] bool: entries that were sent
    expand_idx: torch.Tensor      # [BS*K] int32 (v1 output)
    assist: torch.Tensor          # what dispatch returned as expand_idx / assist_info_for_combine
    ep_recv_counts: torch.Tensor
    tp_recv_counts: torch.Tensor
    expand_scales: torch.Tensor
    mask: Optional[torch.Tensor]  # the x_active_mask dispatch honoured (v2), None otherwise
    block_sizes: torch.Tensor     # [L, W] rows this rank received per (local expert, source)
    sent_per_expert: torch.Tensor  # [E] rows this rank sent per expert


class _BoundOperator:
    """``torch_npu.npu_X`` as the call sites see it: the pinned schema binds, the emulation computes."""

    def __init__(self, emulation: "EmulatedTorchNpu", packet: str):
        self._emulation = emulation
        self._packet = packet
        self.__name__ = packet

    def __call__(self, *args, **kwargs):
        operators = npu_schemas.bound_operators()
        with npu_schemas.calling(self._emulation._run):
            return getattr(operators, self._packet)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<emulated torch_npu.{self._packet}, bound to torch-npu {npu_schemas.TORCH_NPU_VERSION}'s schema>"


def _implementations(cls) -> dict:
    """packet -> implementation: methods ``_npu_X`` (and public ``npu_X``) of the class."""
    found = {}
    for name in dir(cls):
        if name.startswith("_npu_"):
            found[name[1:]] = getattr(cls, name)
        elif name.startswith("npu_") and callable(getattr(cls, name)):
            found[name] = getattr(cls, name)
    return found


class EmulatedTorchNpu:
    """Stands in for the ``torch_npu`` module in :class:`NpuRuntime`.

    ``soc_version`` "A2" or "A3" selects the documented limits and argument
    sets; ``with_v2`` whether the ``_v2`` dispatch/combine operators exist
    (torch_npu 2.14 always has them; older releases did not). Every operator
    attribute is a :class:`_BoundOperator`. Implementations are methods named
    ``_npu_X`` (or ``npu_X``) taking every schema argument by name (a schema
    argument called ``self`` arrives as ``self_``). Process groups are
    registered by :meth:`comm_name`. ``calls`` counts the bound calls per
    operator.
    """

    _V2_ONLY = ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2")

    def __init__(self, soc_version: str = "A3", with_v2: bool = True):
        if soc_version not in ("A2", "A3"):
            raise ArgumentError(f"EmulatedTorchNpu: soc_version must be 'A2' or 'A3', got {soc_version!r}")
        self.soc_version = soc_version
        self.with_v2 = bool(with_v2)
        self._groups: dict[str, Any] = {}
        # Dispatches not yet combined, per communicator, oldest first: several may be in flight
        # (two micro-batches); combine finds its own by the handle dispatch returned.
        self._records: dict[str, list[_DispatchRecord]] = {}
        self._ids = itertools.count(1)
        self.calls: dict[str, int] = {}
        packets = set(npu_schemas.SCHEMAS_BY_PACKET)
        for packet in _implementations(type(self)):
            if packet not in packets:
                raise AssertionError(f"EmulatedTorchNpu.{packet}: no pinned schema in moe_ext.testing.npu_schemas")
            if packet in self._V2_ONLY and not self.with_v2:
                continue
            setattr(self, packet, _BoundOperator(self, packet))

    def _run(self, packet: str, overload: str, arguments: dict):
        self.calls[packet] = self.calls.get(packet, 0) + 1
        if overload:
            raise NotImplementedError(f"emulated {packet}.{overload}: only the default overload is emulated")
        implementation = _implementations(type(self))[packet]
        return implementation(self, **{("self_" if name == "self" else name): value
                                       for name, value in arguments.items()})

    @staticmethod
    def _only_defaults(op: str, arguments: dict) -> None:
        """Arguments the emulation does not model must keep their schema defaults."""
        defaults = npu_schemas.schema_defaults(op)
        changed = sorted(name for name, value in arguments.items() if value is not None and value != defaults[name])
        changed += sorted(name for name, value in arguments.items() if value is None and defaults[name] is not None)
        if changed:
            raise NotImplementedError(f"emulated {op}: arguments {changed} are not emulated (only their defaults)")

    # -- HCCL communicator names ---------------------------------------------------------
    def comm_name(self, process_group: Any, global_rank: int) -> str:
        """``get_hccl_comm_name(rankid)``: ``rankid`` is this process's *global* rank (see platform/npu.py)."""
        if global_rank != dist.get_rank():
            raise ArgumentError(f"get_hccl_comm_name: rankid must be this process's global rank {dist.get_rank()} "
                                f"(Ascend's documentation: 'The input is a global rank ID'), got {global_rank}")
        if global_rank not in dist.get_process_group_ranks(process_group):
            raise ArgumentError(f"get_hccl_comm_name: rank {global_rank} is not a member of the group "
                                f"{dist.get_process_group_ranks(process_group)}")
        name = f"emulated_hccl_{id(process_group):x}"
        self._groups[name] = process_group
        return name

    def _group(self, op: str, name: str):
        if name not in self._groups:
            _refuse(op, f"unknown HCCL communicator name {name!r}")
        return self._groups[name]

    # -- npu_moe_init_routing_v2 ---------------------------------------------------------
    def _npu_moe_init_routing_v2(self, x, expert_idx, scale, offset, active_num, expert_capacity, expert_num,
                                 drop_pad_mode, expert_tokens_num_type, expert_tokens_num_flag, quant_mode,
                                 active_expert_range, row_idx_type, x_dtype):
        op = "npu_moe_init_routing_v2"
        self._only_defaults(op, dict(offset=offset, expert_capacity=expert_capacity,
                                     drop_pad_mode=drop_pad_mode, quant_mode=quant_mode, x_dtype=x_dtype))
        # Non-quantised mode (quant_mode -1) with a scale: torch_npu 7.0.0 docs, "scale ... 非量化场景下
        # ... 如果输入则要求为1D的Tensor, shape为(NUM_ROWS,)"; the meta function gives expanded_scale
        # [expanded rows] float32: each row's token scale follows the row.
        if scale is not None:
            _require_dtype(op, "scale", scale, (torch.float32,))
            if scale.dim() != 1 or scale.shape[0] != x.shape[0]:
                _refuse(op, f"scale must be 1-D (NUM_ROWS,) = ({x.shape[0]},) in non-quantised mode, got "
                            f"{tuple(scale.shape)}")
        _require_dtype(op, "x", x, (torch.float16, torch.bfloat16, torch.float32, torch.int8))
        _require_dtype(op, "expert_idx", expert_idx, (torch.int32,))
        if x.dim() != 2 or expert_idx.dim() != 2 or x.shape[0] != expert_idx.shape[0]:
            _refuse(op, f"x must be [N, H] and expert_idx [N, K], got {tuple(x.shape)} and {tuple(expert_idx.shape)}")
        # torch_npu 7.1.0-7.3.0 documentation: "expert_tokens_num_type ... 当前仅支持1和2" and
        # "expert_tokens_num_flag ... 当前仅支持True"; 26.x admits more. Enforced so calls work on both.
        if expert_tokens_num_type not in (1, 2):
            _refuse(op, f"expert_tokens_num_type must be 1 (count) or 2 (key-value), got {expert_tokens_num_type}")
        if expert_tokens_num_flag is not True:
            _refuse(op, f"expert_tokens_num_flag must be True, got {expert_tokens_num_flag}")
        if expert_tokens_num_type == 2:
            raise NotImplementedError("emulated npu_moe_init_routing_v2: key-value counts are not emulated")
        if row_idx_type not in (0, 1):
            _refuse(op, f"row_idx_type must be 0 or 1, got {row_idx_type}")
        if not 0 <= expert_num <= 10240:
            _refuse(op, f"expert_num must be in [0, 10240], got {expert_num}")
        if active_num < -1:
            _refuse(op, f"active_num must be >= -1, got {active_num}")
        start, end = list(active_expert_range) or [0, expert_num]
        if not 0 <= start < end <= expert_num:
            _refuse(op, f"active_expert_range must satisfy 0 <= start < end <= expert_num {expert_num}, "
                        f"got {list(active_expert_range)}")
        num_tokens, top_k = expert_idx.shape
        flat = expert_idx.reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > expert_num):
            _refuse(op, f"expert ids must lie in [0, expert_num {expert_num}], got [{int(flat.min())}, "
                        f"{int(flat.max())}]")
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
        # [expanded rows] (torch_npu's meta function); values undefined without scale (documented).
        expanded_scale = _unwritten((out_rows,), torch.float32)
        if scale is not None:
            expanded_scale[:valid] = scale[order[:valid] // top_k]
        return expanded_x, row_idx, counts, expanded_scale

    # -- npu_moe_token_unpermute ---------------------------------------------------------
    def _npu_moe_token_unpermute(self, permuted_tokens, sorted_indices, probs, padded_mode, restore_shape):
        op = "npu_moe_token_unpermute"
        if padded_mode or restore_shape is not None:
            raise NotImplementedError(f"emulated {op}: padded_mode=True / restore_shape are not emulated")
        _require_dtype(op, "permuted_tokens", permuted_tokens, (torch.bfloat16, torch.float16, torch.float32))
        _require_dtype(op, "sorted_indices", sorted_indices, (torch.int32,))
        top_k = probs.shape[1] if probs is not None else 1
        if permuted_tokens.dim() != 2 or sorted_indices.dim() != 1 or (probs is not None and probs.dim() != 2):
            _refuse(op, "permuted_tokens must be 2-D, sorted_indices 1-D and probs 2-D")
        if probs is not None and sorted_indices.numel() != probs.numel():
            _refuse(op, f"sorted_indices must have probs.numel() = {probs.numel()} entries, got "
                        f"{sorted_indices.numel()}")
        index = sorted_indices.to(torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= permuted_tokens.shape[0]):
            _refuse(op, f"sorted_indices must lie in [0, {permuted_tokens.shape[0]}), got "
                        f"[{int(index.min())}, {int(index.max())}]")
        if torch.unique(index).numel() != index.numel():
            _refuse(op, "sorted_indices must not repeat")
        rows = permuted_tokens.index_select(0, index).float().view(-1, top_k, permuted_tokens.shape[1])
        if probs is not None:
            rows = rows * probs.float().unsqueeze(2)
        return rows.sum(1).to(permuted_tokens.dtype)

    # -- npu_grouped_matmul / npu_swiglu -------------------------------------------------
    def _npu_grouped_matmul(self, x, weight, group_list, split_item, group_type, group_list_type, **rest):
        op = "npu_grouped_matmul"
        self._only_defaults(op, rest)
        # The MoE form (docs, group_type 0, "Single-Single-Single"): x [M, K], weight [E, K, N], y [M, N].
        if len(x) != 1 or len(weight) != 1 or weight[0].dim() != 3 or x[0].dim() != 2 or group_type != 0 or \
                split_item not in (2, 3):
            raise NotImplementedError(f"emulated {op}: only x=[X (M, K)], weight=[W (E, K, N)], group_type=0, "
                                      f"split_item 2/3 is emulated")
        rows, w = x[0], weight[0]
        _require_dtype(op, "x", rows, (torch.float16, torch.bfloat16, torch.float32))
        if w.dtype != rows.dtype or rows.shape[1] != w.shape[1]:
            _refuse(op, f"weight must be {rows.dtype} [E, {rows.shape[1]}, N], got {w.dtype} {tuple(w.shape)}")
        if group_list is None:
            _refuse(op, "group_list must be passed for group_type 0")
        _require_dtype(op, "group_list", group_list, (torch.int64,))
        if tuple(group_list.shape) != (w.shape[0],) or w.shape[0] > 1024:
            _refuse(op, f"group_list must be 1-D with one entry per weight group ({w.shape[0]}, at most 1024), got "
                        f"{tuple(group_list.shape)}")
        if group_list_type not in (0, 1):
            raise NotImplementedError(f"emulated {op}: group_list_type {group_list_type} (0 cumsum, 1 counts only)")
        values = group_list.tolist()
        if any(v < 0 for v in values):
            _refuse(op, f"group_list must be non-negative, got {values}")
        if group_list_type == 0:
            if any(b < a for a, b in zip(values, values[1:])):
                _refuse(op, f"group_list (cumsum, type 0) must be non-decreasing, got {values}")
            total = values[-1]
            ends = values
        else:
            if len(values) == 1:
                _refuse(op, "group_list (counts, type 1) must not have length 1")
            total = sum(values)
            ends = list(itertools.accumulate(values))
        # Documented: the last cumsum / the sum of the counts must equal x's first dimension.
        if total != rows.shape[0]:
            _refuse(op, f"group_list must cover x's {rows.shape[0]} rows exactly, it covers {total}")
        out = torch.empty((rows.shape[0], w.shape[2]), dtype=rows.dtype)
        start = 0
        for group, end in enumerate(ends):
            if end > start:
                out[start:end] = (rows[start:end].float() @ w[group].float()).to(rows.dtype)
            start = end
        return [out]

    def _npu_swiglu(self, self_, dim):
        a, b = self_.chunk(2, dim=dim)
        return (F.silu(a.float()) * b.float()).to(self_.dtype)

    # -- MC2 ---------------------------------------------------------------------------
    def _npu_moe_distribute_dispatch(self, **arguments):
        return self._dispatch("npu_moe_distribute_dispatch", False, **arguments)

    def _npu_moe_distribute_dispatch_v2(self, *, elastic_info, performance_info, comm_alg, zero_expert_num,
                                        copy_expert_num, const_expert_num, y_dtype, x_dtype, scales_dtype,
                                        **arguments):
        op = "npu_moe_distribute_dispatch_v2"
        self._only_defaults(op, dict(elastic_info=elastic_info, performance_info=performance_info,
                                     zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num,
                                     const_expert_num=const_expert_num, y_dtype=y_dtype, x_dtype=x_dtype,
                                     scales_dtype=scales_dtype))
        return self._dispatch(op, True, comm_alg=comm_alg, **arguments)

    def _algorithm(self, op: str, v2: bool, comm_alg: str) -> str:
        """The MC2 algorithm a call runs: only the fullmesh ones are emulated."""
        if not v2:
            return "fullmesh"
        if self.soc_version == "A2":
            if comm_alg == "":  # documented: "" picks hierarchy under these two variables, else fullmesh
                hierarchy = (os.environ.get("HCCL_INTRA_PCIE_ENABLE") == "1"
                             and os.environ.get("HCCL_INTRA_ROCE_ENABLE") == "0")
                comm_alg = "hierarchy" if hierarchy else "fullmesh"
            if comm_alg not in ("fullmesh", "hierarchy"):
                _refuse(op, f"comm_alg on A2 must be '', 'fullmesh' or 'hierarchy', got {comm_alg!r}")
        elif comm_alg not in ("", "fullmesh_v1", "fullmesh_v2", "hierarchy"):
            _refuse(op, f"comm_alg on A3 must be '', 'fullmesh_v1', 'fullmesh_v2' or 'hierarchy', got {comm_alg!r}")
        if comm_alg in ("hierarchy", "fullmesh_v2"):
            raise NotImplementedError(f"emulated {op}: the {comm_alg} algorithm is not emulated")
        return comm_alg

    def _check_mc2(self, op: str, v2: bool, comm_alg: str, *, tokens: torch.Tensor, expert_ids, group_ep,
                   ep_world_size, ep_rank_id, moe_expert_num, group_tp, tp_world_size, tp_rank_id,
                   expert_shard_type, shared_expert_num, shared_expert_rank_num, global_bs) -> None:
        """The documented argument limits dispatch and combine share (op-plugin 26.1.0 docs)."""
        a2 = self.soc_version == "A2"
        _require_dtype(op, "x" if "dispatch" in op else "expand_x", tokens, _FLOAT_16)
        _require_dtype(op, "expert_ids", expert_ids, (torch.int32,))
        if tokens.dim() != 2 or expert_ids.dim() != 2:
            _refuse(op, f"tokens and expert_ids must be 2-D, got {tuple(tokens.shape)} and {tuple(expert_ids.shape)}")
        batch, top_k = expert_ids.shape
        hidden = tokens.shape[1]
        if shared_expert_rank_num != 0 or expert_shard_type != 0 or shared_expert_num != 1:
            raise NotImplementedError(f"emulated {op}: shared experts are not emulated")
        if global_bs not in (0, batch * ep_world_size):
            raise NotImplementedError(f"emulated {op}: global_bs other than 0 or BS * ep_world_size")
        if not isinstance(group_ep, str) or not 1 <= len(group_ep) < 128:
            _refuse(op, f"group_ep must be a communicator name of length [1, 128), got {group_ep!r}")
        # group_tp / tp_world_size / tp_rank_id: A2 has no TP domain ("use the default value" in eager
        # mode); A3 takes "" when there is no TP domain, a name different from group_ep otherwise.
        if a2 and (group_tp != "" or tp_world_size != 0 or tp_rank_id != 0):
            _refuse(op, f"on A2 group_tp, tp_world_size and tp_rank_id must keep their defaults ('', 0, 0), got "
                        f"{group_tp!r}, {tp_world_size}, {tp_rank_id}")
        if not a2:
            if group_tp == group_ep:
                _refuse(op, f"group_tp must differ from group_ep, both are {group_ep!r}")
            if not 0 <= tp_world_size <= 2:
                _refuse(op, f"tp_world_size must be in [0, 2], got {tp_world_size}")
            if tp_world_size == 2:
                raise NotImplementedError(f"emulated {op}: TP inside MC2 (tp_world_size 2) is not emulated")
            if tp_rank_id != 0:
                _refuse(op, f"tp_rank_id must be 0 without a TP domain, got {tp_rank_id}")
        if v2:
            sizes = _V2_A2_FULLMESH_WORLD_SIZES if a2 else set(range(2, 769))
        else:
            sizes = _V1_WORLD_SIZES[self.soc_version]
        if ep_world_size not in sizes:
            _refuse(op, f"ep_world_size on {self.soc_version} must be one of "
                        f"{sorted(sizes) if len(sizes) < 20 else '[2, 768]'}, got {ep_world_size}")
        if not 0 <= ep_rank_id < ep_world_size:
            _refuse(op, f"ep_rank_id must be in [0, {ep_world_size}), got {ep_rank_id}")
        max_experts = 1024 if v2 else 512
        if not 1 <= moe_expert_num <= max_experts or moe_expert_num % ep_world_size:
            _refuse(op, f"moe_expert_num must be in [1, {max_experts}] and divisible by ep_world_size "
                        f"{ep_world_size}, got {moe_expert_num}")
        local = moe_expert_num // ep_world_size
        # "moe_expert_num / (ep_world_size - shared_expert_rank_num) <= 24" on A2 (v1 docs; the v2 docs
        # of torch_npu 7.x say the same, 26.x dropped it for v2: enforced for both).
        if a2 and local > 24:
            _refuse(op, f"on A2 at most 24 experts per rank, got {local}")
        if not a2 and v2 and local * ep_world_size > 2048:
            _refuse(op, f"on A3 local_expert_num * ep_world_size must be <= 2048, got {local * ep_world_size}")
        if a2 and not (0 < hidden <= 7168 and hidden % 32 == 0):
            _refuse(op, f"on A2 H must be in (0, 7168] and a multiple of 32, got {hidden}")
        if not a2 and not v2 and hidden != 7168:
            _refuse(op, f"on A3 (v1 operators) H must be 7168, got {hidden}")
        if not a2 and v2 and not 1024 <= hidden <= 8192:
            _refuse(op, f"on A3 H must be in [1024, 8192], got {hidden}")
        max_batch = 256 if a2 else 512
        if not 0 < batch <= max_batch:
            _refuse(op, f"on {self.soc_version} BS must be in (0, {max_batch}], got {batch}")
        if v2:
            max_k = 12 if comm_alg == "" else 16  # "When comm_alg is set to "" ..., 0 < K <= 12"
        else:
            max_k = 16 if a2 else 8
        if not 0 < top_k <= min(max_k, moe_expert_num):
            _refuse(op, f"K must be in (0, {min(max_k, moe_expert_num)}], got {top_k}")
        if (torch.sort(expert_ids, 1).values.diff(dim=1) == 0).any():
            _refuse(op, "a token's expert_ids must not repeat")
        if int(expert_ids.min()) < 0 or int(expert_ids.max()) >= moe_expert_num:
            _refuse(op, f"expert_ids must lie in [0, {moe_expert_num})")

    def _dispatch(self, op, v2, *, x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales,
                  x_active_mask, expert_scales, group_tp, tp_world_size, tp_rank_id, expert_shard_type,
                  shared_expert_num, shared_expert_rank_num, quant_mode, global_bs, expert_token_nums_type,
                  comm_alg=""):
        comm_alg = self._algorithm(op, v2, comm_alg)
        self._check_mc2(op, v2, comm_alg, tokens=x, expert_ids=expert_ids, group_ep=group_ep,
                        ep_world_size=ep_world_size, ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num,
                        group_tp=group_tp, tp_world_size=tp_world_size, tp_rank_id=tp_rank_id,
                        expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                        shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs)
        if quant_mode != 0 or scales is not None:
            raise NotImplementedError(f"emulated {op}: quantisation is not emulated")
        if expert_token_nums_type not in (0, 1):
            _refuse(op, f"expert_token_nums_type must be 0 or 1, got {expert_token_nums_type}")
        batch, top_k = expert_ids.shape
        if expert_scales is not None:
            if self.soc_version == "A3":
                _refuse(op, "expert_scales is not supported on A3 (documented: keep the default None)")
            _require_dtype(op, "expert_scales", expert_scales, (torch.float32,))
            if tuple(expert_scales.shape) != (batch, top_k):
                _refuse(op, f"expert_scales must be [BS, K] = [{batch}, {top_k}], got {tuple(expert_scales.shape)}")
        mask = None
        if x_active_mask is not None and v2:  # v1: "Reserved parameter, currently not used"
            _require_dtype(op, "x_active_mask", x_active_mask, (torch.bool,))
            if x_active_mask.dim() == 2:
                raise NotImplementedError(f"emulated {op}: the 2-D (BS, K) x_active_mask is not emulated")
            if tuple(x_active_mask.shape) != (batch,):
                _refuse(op, f"x_active_mask must be bool [{batch}], got {tuple(x_active_mask.shape)}")
            num_true = int(x_active_mask.sum())
            if not bool(x_active_mask[:num_true].all()):
                _refuse(op, "x_active_mask must have all trues before any false")
            mask = x_active_mask
        group = self._group(op, group_ep)
        world = dist.get_world_size(group)
        if world != ep_world_size or dist.get_rank(group) != ep_rank_id:
            _refuse(op, f"ep_world_size/ep_rank_id {ep_world_size}/{ep_rank_id} do not match the group "
                        f"({world}/{dist.get_rank(group)})")
        num_local = moe_expert_num // world
        hidden = x.shape[1]
        device = x.device
        # global_bs = 0 means BS * W: every rank must bring the same BS.
        batches = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(batches, torch.tensor([batch], dtype=torch.int64, device=device), group=group)
        if any(int(b) != batch for b in batches):
            _refuse(op, f"with global_bs=0 every rank needs the same BS, got {[int(b) for b in batches]}")

        active_tokens = mask if mask is not None else torch.ones(batch, dtype=torch.bool, device=device)
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
        # Each row travels with its fp32 weight when expert_scales is given (documented: expand_scales is
        # "the output after the alltoallv operation is performed on expert_scales and x").
        weights = (expert_scales.reshape(-1)[order].float() if expert_scales is not None
                   else torch.zeros(order.numel(), dtype=torch.float32))
        send_rows = torch.cat([x.index_select(0, order // top_k).float(), weights.unsqueeze(1)], 1)
        send_counts = sent_per_expert.to(device)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)  # [W*L]: source s, local expert le
        input_splits = send_counts.view(world, num_local).sum(1).tolist()
        output_splits = recv_counts.view(world, num_local).sum(1).tolist()
        received = send_rows.new_empty((sum(output_splits), hidden + 1))
        dist.all_to_all_single(received, send_rows.contiguous(), output_splits, input_splits, group=group)

        block_sizes = recv_counts.view(world, num_local).t().contiguous()  # [L, W]
        rows_out = batch * world * min(num_local, top_k)
        expand_x = _unwritten((rows_out, hidden), x.dtype, device)
        expand_scales = (_unwritten((rows_out,), torch.float32) if expert_scales is not None
                         else torch.empty(0, dtype=torch.float32))
        source_start = torch.cumsum(torch.tensor([0] + output_splits[:-1]), 0).tolist()
        inside_source = [0] * world
        write = 0
        for le in range(num_local):
            for s in range(world):
                size = int(block_sizes[le, s])
                begin = source_start[s] + inside_source[s]
                expand_x[write:write + size] = received[begin:begin + size, :hidden].to(x.dtype)
                if expert_scales is not None:
                    expand_scales[write:write + size] = received[begin:begin + size, hidden]
                inside_source[s] += size
                write += size
        expert_token_nums = block_sizes.sum(1).to(torch.int64)
        if expert_token_nums_type == 0:
            expert_token_nums = torch.cumsum(expert_token_nums, 0)
        ep_recv_counts = torch.cumsum(block_sizes.reshape(-1), 0).to(torch.int32)
        if expert_scales is not None:  # shape of torch_npu's meta function; what the extra entries hold is opaque
            extra = batch * world * 2 * top_k * (world // 8)
            ep_recv_counts = torch.cat([ep_recv_counts, _unwritten((extra,), torch.int32)])
        tp_recv_counts = torch.zeros(tp_world_size, dtype=torch.int32)
        dispatch_id = next(self._ids)
        if v2:  # opaque: (max(BS*K, A*128),) int32 per torch_npu's meta function
            assist = _unwritten((max(batch * top_k, rows_out * 128),), torch.int32)
            assist[0] = dispatch_id
        else:
            assist = expand_idx
        self._records.setdefault(group_ep, []).append(_DispatchRecord(
            dispatch_id, v2, batch, rows_out, expert_ids.clone(), active, expand_idx, assist, ep_recv_counts,
            tp_recv_counts, expand_scales, mask, block_sizes, sent_per_expert))
        dynamic_scales = _unwritten((rows_out,), torch.float32)
        return (expand_x, dynamic_scales, assist, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales)

    def _npu_moe_distribute_combine(self, *, expand_idx, activation_scale, weight_scale, group_list, out_dtype,
                                    group_list_type, **arguments):
        op = "npu_moe_distribute_combine"
        self._only_defaults(op, dict(activation_scale=activation_scale, weight_scale=weight_scale,
                                     group_list=group_list, out_dtype=out_dtype, group_list_type=group_list_type))
        return self._combine(op, False, handle=expand_idx, **arguments)

    def _npu_moe_distribute_combine_v2(self, *, assist_info_for_combine, elastic_info, ori_x, const_expert_alpha_1,
                                       const_expert_alpha_2, const_expert_v, performance_info, comm_alg,
                                       zero_expert_num, copy_expert_num, const_expert_num, **arguments):
        op = "npu_moe_distribute_combine_v2"
        self._only_defaults(op, dict(elastic_info=elastic_info, ori_x=ori_x, const_expert_alpha_1=const_expert_alpha_1,
                                     const_expert_alpha_2=const_expert_alpha_2, const_expert_v=const_expert_v,
                                     performance_info=performance_info, zero_expert_num=zero_expert_num,
                                     copy_expert_num=copy_expert_num, const_expert_num=const_expert_num))
        return self._combine(op, True, handle=assist_info_for_combine, comm_alg=comm_alg, **arguments)

    def _combine(self, op, v2, *, handle, expand_x, expert_ids, ep_send_counts, expert_scales, group_ep,
                 ep_world_size, ep_rank_id, moe_expert_num, tp_send_counts, x_active_mask, expand_scales,
                 shared_expert_x, group_tp, tp_world_size, tp_rank_id, expert_shard_type, shared_expert_num,
                 shared_expert_rank_num, global_bs, comm_quant_mode, comm_alg=""):
        comm_alg = self._algorithm(op, v2, comm_alg)
        self._check_mc2(op, v2, comm_alg, tokens=expand_x, expert_ids=expert_ids, group_ep=group_ep,
                        ep_world_size=ep_world_size, ep_rank_id=ep_rank_id, moe_expert_num=moe_expert_num,
                        group_tp=group_tp, tp_world_size=tp_world_size, tp_rank_id=tp_rank_id,
                        expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                        shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs)
        if shared_expert_x is not None or comm_quant_mode != 0:
            raise NotImplementedError(f"emulated {op}: shared_expert_x and communication quantisation")
        in_flight = [r for r in self._records.get(group_ep, []) if r.v2 == v2]
        if not in_flight:
            _refuse(op, "no matching dispatch on this communicator to combine")
        # Documented: pass dispatch's outputs to combine as they are; depend on nothing in them.
        record = next((r for r in in_flight if _same_tensor(handle, r.assist)), None)
        if record is None:
            _refuse(op, f"{'assist_info_for_combine' if v2 else 'expand_idx'} must be the tensor its dispatch "
                        f"returned")
        if not torch.equal(expert_ids, record.expert_ids) or not _same_tensor(ep_send_counts, record.ep_recv_counts):
            _refuse(op, "expert_ids and ep_send_counts must be those of the dispatch (ep_send_counts = its "
                        "ep_recv_counts)")
        if self.soc_version == "A2":
            if tp_send_counts is not None:
                _refuse(op, "tp_send_counts must be None on A2 (no TP domain)")
            if expand_scales is None or record.expand_scales.numel() == 0:
                _refuse(op, "expand_scales is required on A2: pass expert_scales to dispatch and its "
                            "expand_scales output to combine")
            if not _same_tensor(expand_scales, record.expand_scales):
                _refuse(op, "expand_scales must be the tensor its dispatch returned")
        else:
            if expand_scales is not None:
                _refuse(op, "expand_scales is not supported on A3 (documented: keep the default None)")
            if tp_send_counts is not None and not _same_tensor(tp_send_counts, record.tp_recv_counts):
                _refuse(op, "tp_send_counts must be its dispatch's tp_recv_counts")
        if v2 and not ((x_active_mask is None and record.mask is None) or
                       (x_active_mask is not None and record.mask is not None and
                        torch.equal(x_active_mask, record.mask))):
            _refuse(op, "x_active_mask must be the mask its dispatch was given")
        _require_dtype(op, "expert_scales", expert_scales, (torch.float32,))
        if expert_scales.shape != expert_ids.shape:
            _refuse(op, f"expert_scales must be [BS, K] {tuple(expert_ids.shape)}, got {tuple(expert_scales.shape)}")
        if expand_x.shape[0] != record.rows_out:
            _refuse(op, f"expand_x must have dispatch's A = {record.rows_out} rows, got {expand_x.shape[0]}")
        group = self._group(op, group_ep)
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
        scales = expert_scales.detach().reshape(-1)  # inference operators: no gradient flows through them
        for f in range(batch * top_k):
            if not bool(record.active[f]):
                continue
            dest, le = divmod(int(flat[f]), num_local)
            row = int(chunk_start[dest]) + int(start_in_chunk[dest, le]) + int(record.expand_idx[f])
            out[f // top_k] += float(scales[f]) * returned[row].float()
        inactive_tokens = ~record.active.view(batch, top_k).any(1)
        out[inactive_tokens] = float("nan")  # combine output of masked tokens is not documented
        self._records[group_ep] = [r for r in self._records[group_ep] if r is not record]
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
