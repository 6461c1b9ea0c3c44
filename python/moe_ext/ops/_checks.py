"""Argument checks shared by the op wrappers and their fake (meta) kernels.

Why in Python, before dispatch: the dispatcher picks one kernel for all the
tensors of a call, so a meta tensor mixed with CPU ones reaches the fake kernel
with real CPU tensors (which then returns uninitialised CPU memory), and a
float where an int is meant is silently truncated by the schema. Checking here
gives one message per fault on every backend, in torch's dtype spelling
(``torch.int8``), and the fake kernels call the same functions, so meta and
real kernels refuse the same calls.

Rule (see :mod:`moe_ext.errors`): a wrong type raises :class:`TypeError`, a bad
value :class:`~moe_ext.errors.ArgumentError`; both name the op, the argument,
what was expected and what was received.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch

from moe_ext._loader import native_error
from moe_ext.errors import ArgumentError, check_int

INT32_MAX = 2**31 - 1
FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX = (torch.int32, torch.int64)
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_BLOCK = 128  # columns per block scale (DeepSeek-V3's 1x128 activation blocks)


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    names = [str(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def tensor(op: str, name: str, value: Any, *, optional: bool = False) -> Optional[torch.Tensor]:
    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{op}: {name} must be {expected}, got {type(value).__name__}")
    return value


def dtype(op: str, name: str, value: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if value.dtype not in allowed:
        raise TypeError(f"{op}: {name} must be {dtype_names(allowed)}, got {value.dtype}")


def dim(op: str, name: str, value: torch.Tensor, expected: int, what: str = "") -> None:
    if value.dim() != expected:
        raise ArgumentError(f"{op}: {name} must be {expected}-D{what}, got shape {tuple(value.shape)}")


def same_device(op: str, named: Sequence[tuple[str, Optional[torch.Tensor]]]) -> None:
    """All given tensors on one device; the message names the first two that differ."""
    first_name, first = None, None
    for name, value in named:
        if value is None:
            continue
        if first is None:
            first_name, first = name, value
        elif value.device != first.device:
            raise ArgumentError(f"{op}: all tensor arguments must be on one device, but {name} is on "
                                f"{value.device} and {first_name} is on {first.device}")


def int_arg(op: str, name: str, value: Any, *, minimum: Optional[int] = None,
            maximum: Optional[int] = None) -> int:
    """check_int with the op's name in the message."""
    try:
        return check_int(name, value, minimum=minimum, maximum=maximum)
    except TypeError as error:
        raise TypeError(f"{op}: {error}") from None
    except ArgumentError as error:
        raise ArgumentError(f"{op}: {error}") from None


def call_op(fn, *args):
    """Runs a torch op, re-raising the kernels' ValueError (a bad value inside a
    tensor, found on the host) as the package's ArgumentError, and a TypeError
    that crossed the stable ABI as RuntimeError (see moe_ext._loader.native_error)
    as TypeError."""
    try:
        return fn(*args)
    except ArgumentError:
        raise
    except ValueError as error:
        raise ArgumentError(str(error)) from None
    except RuntimeError as error:
        raise native_error(error) from None


# ---------------------------------------------------------------- moe_permute

def permute_range(num_experts: Any, active_expert_range: Any) -> tuple[int, int, int]:
    op = "moe_permute"
    num_experts = int_arg(op, "num_experts", num_experts, minimum=1, maximum=INT32_MAX)
    if active_expert_range is None:
        return num_experts, 0, num_experts
    if not isinstance(active_expert_range, (tuple, list)):
        raise TypeError(f"{op}: active_expert_range must be a (start, end) tuple of ints or None, got "
                        f"{type(active_expert_range).__name__} ({active_expert_range!r})")
    if len(active_expert_range) != 2:
        raise ArgumentError(f"{op}: active_expert_range must be (start, end), 2 ints, got "
                            f"{len(active_expert_range)} values {tuple(active_expert_range)!r}")
    start = int_arg(op, "active_expert_range[0] (start)", active_expert_range[0])
    end = int_arg(op, "active_expert_range[1] (end)", active_expert_range[1])
    if not 0 <= start <= end <= num_experts:
        raise ArgumentError(f"{op}: active_expert_range must satisfy 0 <= start <= end <= num_experts = "
                            f"{num_experts}, got ({start}, {end})")
    return num_experts, start, end


def permute_tensors(hidden_states: Any, topk_ids: Any, num_experts: int, expert_map: Any,
                    hidden_dtypes: Sequence[torch.dtype] = FLOATING) -> None:
    """Types, dtypes, shapes and devices of moe_permute (the wrapper and the fake kernel)."""
    op = "moe_permute"
    tensor(op, "hidden_states", hidden_states)
    tensor(op, "topk_ids", topk_ids)
    tensor(op, "expert_map", expert_map, optional=True)
    same_device(op, [("hidden_states", hidden_states), ("topk_ids", topk_ids), ("expert_map", expert_map)])
    dim(op, "hidden_states", hidden_states, 2, " [T, H]")
    dtype(op, "hidden_states", hidden_states, hidden_dtypes)
    dim(op, "topk_ids", topk_ids, 2, " [T, K]")
    dtype(op, "topk_ids", topk_ids, INDEX)
    if topk_ids.shape[0] != hidden_states.shape[0]:
        raise ArgumentError(f"{op}: topk_ids and hidden_states must have the same number of tokens, got "
                            f"{topk_ids.shape[0]} and {hidden_states.shape[0]}")
    topk = topk_ids.shape[1]
    if topk < 1:
        raise ArgumentError(f"{op}: topk_ids must have at least one column (K >= 1), got shape "
                            f"{tuple(topk_ids.shape)}")
    if topk_ids.shape[0] > (INT32_MAX + 1) // topk:
        raise ArgumentError(f"{op}: T * K = {topk_ids.shape[0]} * {topk} exceeds 2^31 rows "
                            "(expanded_row_idx is int32)")
    if expert_map is not None:
        dim(op, "expert_map", expert_map, 1, " [num_experts]")
        dtype(op, "expert_map", expert_map, INDEX)
        if expert_map.shape[0] != num_experts:
            raise ArgumentError(f"{op}: expert_map must have num_experts = {num_experts} entries, got "
                                f"{expert_map.shape[0]}")


def permute_padded_tensors(hidden_states: Any, scales: Any, topk_ids: Any, num_experts: int,
                           expert_map: Any, active_experts: int, alignment: Any) -> tuple[int, int]:
    """Checks of moe_permute_padded (wrapper and fake kernel); returns
    ``(alignment, bound)`` with ``bound = T*K + active_experts*(alignment-1)``, the
    static row count of ``permuted``."""
    op = "moe_permute"
    alignment = int_arg(op, "alignment", alignment, minimum=1, maximum=INT32_MAX)
    tensor(op, "hidden_states", hidden_states)
    tensor(op, "scales", scales, optional=True)
    permute_tensors(hidden_states, topk_ids, num_experts, expert_map, hidden_dtypes=FLOATING + FLOAT8)
    if scales is not None:
        same_device(op, [("hidden_states", hidden_states), ("scales", scales)])
        if scales.dtype != torch.float32:
            raise TypeError(f"{op}: scales must be torch.float32, got {scales.dtype}")
        num_tokens, hidden_size = hidden_states.shape
        blocks = -(-hidden_size // SCALE_BLOCK)
        shape = tuple(scales.shape)
        if shape not in ((num_tokens,), (num_tokens, 1), (num_tokens, blocks)):
            raise ArgumentError(
                f"{op}: scales must be [T] or [T, 1] (per token) or [T, ceil(H / {SCALE_BLOCK})] = "
                f"[{num_tokens}, {blocks}] (per {SCALE_BLOCK}-column block) for hidden_states of shape "
                f"{tuple(hidden_states.shape)}, got shape {shape}")
    rows = topk_ids.shape[0] * topk_ids.shape[1]
    bound = rows + active_experts * (alignment - 1)
    if bound > INT32_MAX + 1:
        raise ArgumentError(f"{op}: the padded layout needs up to T * K + num_active_experts * (alignment - 1) = "
                            f"{rows} + {active_experts} * {alignment - 1} = {bound} rows, more than 2^31 "
                            "(expanded_row_idx is int32)")
    return alignment, bound


# ---------------------------------------------------------------- moe_unpermute

def unpermute_tensors(op: str, permuted: Any, expanded_row_idx: Any, probs: Any, topk: int,
                      topk_from: str = "topk") -> int:
    """Checks of moe_unpermute (and its backward); returns T. ``topk`` is a checked int;
    ``topk_from`` says where it came from (``"topk"`` when passed, ``"probs"`` when
    read from ``probs.shape[1]``), so that messages name what the caller passed."""
    tensor(op, "permuted", permuted)
    tensor(op, "expanded_row_idx", expanded_row_idx)
    tensor(op, "probs", probs, optional=True)
    same_device(op, [("permuted", permuted), ("expanded_row_idx", expanded_row_idx), ("probs", probs)])
    dim(op, "permuted", permuted, 2, " [R, H]")
    if permuted.dtype in FLOAT8:
        raise TypeError(f"{op}: permuted is {permuted.dtype}; unpermute combines expert outputs in "
                        f"{dtype_names(FLOATING)} (fp8 rows are a dispatch format: dequantise, or pass the "
                        "experts' bf16/fp16/fp32 output)")
    dtype(op, "permuted", permuted, FLOATING)
    dim(op, "expanded_row_idx", expanded_row_idx, 1, " [T * K]")
    dtype(op, "expanded_row_idx", expanded_row_idx, INDEX)
    entries = expanded_row_idx.shape[0]
    if probs is not None:
        dim(op, "probs", probs, 2, " [T, K]")
    if entries % topk:
        if topk_from == "probs":
            raise ArgumentError(f"{op}: probs has shape {tuple(probs.shape)}, so K = {topk}, but expanded_row_idx "
                                f"has {entries} entries, not a multiple of {topk}: probs must be [T, K] with "
                                f"T * K = {entries}")
        raise ArgumentError(f"{op}: expanded_row_idx has {entries} entries, not a multiple of topk = {topk}")
    num_tokens = entries // topk
    if probs is not None:
        if tuple(probs.shape) != (num_tokens, topk):
            if topk_from == "probs":
                raise ArgumentError(f"{op}: probs must be [T, K] with T * K = {entries} (the entries of "
                                    f"expanded_row_idx), got shape {tuple(probs.shape)} "
                                    f"(T * K = {probs.shape[0] * probs.shape[1]})")
            source = (f"expanded_row_idx ({entries} entries) and topk = {topk}" if topk_from == "topk"
                      else f"expanded_row_idx of shape [T, K] = [{num_tokens}, {topk}]")
            raise ArgumentError(f"{op}: probs must be [T, K] = [{num_tokens}, {topk}] to match {source}, got "
                                f"shape {tuple(probs.shape)}")
        if probs.dtype not in (torch.float32, permuted.dtype):
            raise TypeError(f"{op}: probs must be torch.float32 or the dtype of permuted ({permuted.dtype}), "
                            f"got {probs.dtype}")
    return num_tokens


def unpermute_backward_tensors(grad_output: Any, permuted: Any, expanded_row_idx: Any, probs: Any,
                               topk: Any) -> int:
    op = "moe_unpermute_backward"
    topk = int_arg(op, "topk", topk, minimum=1, maximum=INT32_MAX)
    tensor(op, "grad_output", grad_output)
    num_tokens = unpermute_tensors(op, permuted, expanded_row_idx, probs, topk)
    same_device(op, [("permuted", permuted), ("grad_output", grad_output)])
    if grad_output.dim() != 2 or tuple(grad_output.shape) != (num_tokens, permuted.shape[1]):
        raise ArgumentError(f"{op}: grad_output must be [T, H] = [{num_tokens}, {permuted.shape[1]}], got "
                            f"shape {tuple(grad_output.shape)}")
    if grad_output.dtype != permuted.dtype:
        raise TypeError(f"{op}: grad_output must have the dtype of permuted ({permuted.dtype}), got "
                        f"{grad_output.dtype}")
    return num_tokens


# ---------------------------------------------------------------- histogram, rows, regroup

def histogram_args(topk_ids: Any, num_experts: Any) -> int:
    op = "expert_histogram"
    tensor(op, "topk_ids", topk_ids)
    dtype(op, "topk_ids", topk_ids, INDEX)
    return int_arg(op, "num_experts", num_experts, minimum=1, maximum=INT32_MAX)


def rows_tensors(op: str, x: Any, indices: Any) -> None:
    tensor(op, "x", x)
    tensor(op, "indices", indices)
    same_device(op, [("x", x), ("indices", indices)])
    dim(op, "x", x, 2, " [N, H]")
    dim(op, "indices", indices, 1)
    dtype(op, "indices", indices, INDEX)


def scatter_rows_args(x: Any, indices: Any, num_rows: Any) -> int:
    op = "scatter_rows"
    rows_tensors(op, x, indices)
    if indices.shape[0] != x.shape[0]:
        raise ArgumentError(f"{op}: indices must have one entry per row of x ({x.shape[0]}), got "
                            f"{indices.shape[0]}")
    # Row positions are int32 in the CUDA kernel's inverse index.
    return int_arg(op, "num_rows", num_rows, minimum=0, maximum=INT32_MAX)


def permute_indices_args(tokens_per_expert_group: Any, experts_per_rank: Any, num_ranks: Any,
                         max_len: Any, alignment: Any) -> tuple[int, int, int, int]:
    op = "generate_permute_indices"
    tensor(op, "tokens_per_expert_group", tokens_per_expert_group)
    dim(op, "tokens_per_expert_group", tokens_per_expert_group, 1)
    dtype(op, "tokens_per_expert_group", tokens_per_expert_group, INDEX)
    experts_per_rank = int_arg(op, "experts_per_rank", experts_per_rank, minimum=1)
    num_ranks = int_arg(op, "num_ranks", num_ranks, minimum=1)
    alignment = int_arg(op, "alignment", alignment, minimum=1, maximum=INT32_MAX)
    max_len = int_arg(op, "max_len", max_len, minimum=0, maximum=INT32_MAX + 1)
    if experts_per_rank > INT32_MAX // num_ranks:
        raise ArgumentError(f"{op}: num_ranks * experts_per_rank = {num_ranks} * {experts_per_rank} "
                            "overflows int32")
    if tokens_per_expert_group.shape[0] != num_ranks * experts_per_rank:
        raise ArgumentError(f"{op}: len(tokens_per_expert_group) must be num_ranks * experts_per_rank = "
                            f"{num_ranks} * {experts_per_rank} = {num_ranks * experts_per_rank}, got "
                            f"{tokens_per_expert_group.shape[0]}")
    return experts_per_rank, num_ranks, max_len, alignment


def host_values_readable(value: torch.Tensor) -> bool:
    """True when reading ``value``'s data costs no device sync and no graph break:
    a real CPU tensor outside torch.compile tracing."""
    if value.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover
        return True
    return not isinstance(value, FakeTensor)
