"""Token routing: moe_permute, moe_unpermute, expert_histogram.

One contract on every backend, the dropless semantics of torch_npu's
``npu_moe_init_routing_v2`` (gather-form ``expanded_row_idx``), so that the
NPU path is a direct call and the CPU / CUDA kernels are drop-in
replacements. Integer outputs are identical on every backend, bit for bit.

Autograd: ``moe_permute``'s backward is an ``moe_unpermute`` without probs;
``moe_unpermute``'s backward gives the gradient of ``permuted`` and of
``probs``. Both are gathers or one-writer-per-row scatters: deterministic,
no atomics, fp32 sums.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch

from moe_ext.errors import ArgumentError, check_choice
from moe_ext.ops import _checks

__all__ = ["PermuteResult", "expert_histogram", "moe_permute", "moe_unpermute"]



class PermuteResult(NamedTuple):
    """What :func:`moe_permute` returns."""

    permuted: torch.Tensor
    """``[T*K, H]``: the valid rows first, sorted by (local) expert; rows past
    the valid count are not written and must not be read."""
    expanded_row_idx: torch.Tensor
    """int32 ``[T*K]``: row ``t*K + k``'s position in ``permuted``, or -1 if dropped."""
    expert_tokens: torch.Tensor
    """int64 ``[end - start]``: rows per active expert, or their inclusive cumsum."""


def moe_permute(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    active_expert_range: Optional[tuple[int, int]] = None,
    expert_map: Optional[torch.Tensor] = None,
    counts: Literal["count", "cumsum"] = "count",
) -> PermuteResult:
    """Copies each token's hidden state to the rows of the experts it is routed to.

    The layout is the dropless one of ``torch_npu.npu_moe_init_routing_v2``
    (``drop_pad_mode=0``, ``row_idx_type=0``):

    1. ``topk_ids`` is flattened token-major: row ``f = t * K + k``. An id of
       ``-1`` means "no expert" (the padding engines put in CUDA-graph and DP
       padding tokens): the row is dropped exactly like a row that
       ``expert_map`` sends to ``-1`` (``expanded_row_idx`` -1, not counted).
    2. Each row's key is its expert id, or ``expert_map[id]`` when a map is
       given (global id -> local id, ``-1`` = not on this rank).
    3. Rows whose key lies outside ``active_expert_range = (start, end)``
       (default ``(0, num_experts)``) are dropped - a map's ``-1`` always is.
    4. The remaining rows are stably sorted by key (ties keep flattened order)
       and ``permuted[i] = hidden_states[sorted_row[i] // K]`` for the first
       ``valid = expert_tokens.sum()`` rows. Rows at or past ``valid`` are
       **not written** (under expert parallelism writing them would cost more
       than the useful rows); nothing may read them, and
       :func:`moe_unpermute` never does.

    Args:
        hidden_states: ``[T, H]``, float32 / float16 / bfloat16 / float64.
        topk_ids: ``[T, K]`` int32 or int64 expert ids, each in ``[0, num_experts)``
            or ``-1`` (no expert: dropped).
        num_experts: number of global experts, an int in ``[1, 2^31)``.
        active_expert_range: ``(start, end)`` with ``0 <= start <= end <= num_experts``,
            in the key space (after ``expert_map``). With contiguous expert
            parallelism rank ``r`` of ``W`` passes ``(r * L, (r + 1) * L)``.
        expert_map: optional int32/int64 ``[num_experts]`` global -> local id
            map; keys outside the active range (``-1`` included) drop the row.
            With a map, pass ``active_expert_range=(0, num_local_experts)``.
            Every value a row looks up must be ``-1`` or in ``[0, num_experts)``
            (the key space of ``active_expert_range``): any other value is a
            corrupt map and is refused like a bad id (below), never used as an
            index or an offset.
        counts: ``"count"``: rows per active expert; ``"cumsum"``: their
            inclusive cumulative sum (what grouped GEMMs take as group_list).

    Returns:
        :class:`PermuteResult` ``(permuted [T*K, H], expanded_row_idx int32 [T*K],
        expert_tokens int64 [end - start])``, all on the input's device.
        Shapes depend only on the arguments' shapes and integers (no host
        synchronisation: CUDA graphs and ``torch.compile(fullgraph=True)`` work).

    Errors:
        A wrong type (a non-tensor, a float or str or bool where an int is
        meant, a wrong dtype) raises ``TypeError``; a bad value (shape, range,
        tensors on different devices, named both) raises
        :class:`moe_ext.errors.ArgumentError` (a ``ValueError``), naming the
        argument, the expected and the received value, before dispatch.
        An id outside ``[0, num_experts)`` other than -1, or an ``expert_map``
        value outside ``[-1, num_experts)``, raises ``ArgumentError`` on CPU
        before anything is written; on CUDA it stops the kernel with a
        device-side assert (surfacing at the next synchronisation, as torch's
        own index checks do) and the offending row is never used as an index,
        so nothing is written out of bounds.
        Non-contiguous inputs are accepted (copied to contiguous first).
        The CUDA kernel supports an active range of at most 8192 experts
        (``ValueError`` beyond).

    Autograd: the gradient of ``hidden_states`` is
    ``moe_unpermute(grad_permuted, expanded_row_idx, topk=K)`` (a per-token
    gather of the token's K rows, fp32 sums); dropped rows contribute nothing.
    """
    try:
        check_choice("counts", counts, ("count", "cumsum"))
    except TypeError as error:
        raise TypeError(f"moe_permute: {error}") from None
    except ArgumentError as error:
        raise ArgumentError(f"moe_permute: {error}") from None
    num_experts, start, end = _checks.permute_range(num_experts, active_expert_range)
    _checks.permute_tensors(hidden_states, topk_ids, num_experts, expert_map)
    permuted, expanded_row_idx, expert_tokens = _checks.call_op(
        torch.ops.moe_ext.moe_permute, hidden_states, topk_ids, num_experts, start, end, expert_map,
        counts == "cumsum")
    return PermuteResult(permuted, expanded_row_idx, expert_tokens)


def moe_unpermute(
    permuted: torch.Tensor,
    expanded_row_idx: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    *,
    topk: Optional[int] = None,
) -> torch.Tensor:
    """Combines each token's expert rows: ``out[t] = sum_k probs[t,k] * permuted[expanded_row_idx[t*K+k]]``.

    Entries equal to ``-1`` (dropped rows) are skipped, so rows of
    ``permuted`` that no entry names are never read (they may hold garbage,
    e.g. the unwritten tail of :func:`moe_permute`). Sums run in fp32 (fp64
    for fp64 inputs) whatever the dtype, in order ``k = 0 .. K-1``, and are
    rounded once to ``permuted``'s dtype. One gather per token: deterministic.
    Same index form as ``torch_npu.npu_moe_token_unpermute``'s
    ``sorted_indices`` (which with ``probs=None`` uses ``topk=1``).

    Args:
        permuted: ``[R, H]`` float32 / float16 / bfloat16 / float64.
        expanded_row_idx: int32/int64 ``[T*K]`` (or ``[T, K]``), values in ``[-1, R)``.
        probs: optional ``[T, K]`` weights, float32 or ``permuted``'s dtype;
            ``None`` means weight 1.
        topk: ``K``; taken from ``probs`` or a 2-D ``expanded_row_idx`` when
            omitted, and required otherwise.

    Returns:
        ``[T, H]`` in ``permuted``'s dtype.

    Errors:
        ``ArgumentError`` (a ``ValueError``) when ``probs`` is not ``[T, K]``
        for the ``T * K`` of ``expanded_row_idx`` (K mismatch), for tensors on
        different devices or a bad ``topk``; ``TypeError`` for a wrong type or
        dtype; an index outside ``[-1, R)`` raises ``ArgumentError`` on CPU and
        a device-side assert on CUDA (never read out of bounds).

    Autograd: ``grad_permuted[row] = probs[t,k] * grad_out[t]`` for
    ``row = expanded_row_idx[t*K+k]``; rows no entry names are unspecified
    (CUDA leaves them unwritten, as :func:`moe_permute` leaves its tail, so the
    backward costs only the useful bytes under expert parallelism; CPU writes
    zeros): nothing may read them, and :func:`moe_permute`'s backward never does;
    ``grad_probs[t,k] = dot(grad_out[t], permuted[row])`` in fp32 (0 for
    dropped entries). The backward requires each row to be named at most once
    (true of :func:`moe_permute`'s output); a repeated row is refused
    (``ValueError`` on CPU, device-side assert on CUDA) rather than summed
    with atomics.
    """
    op = "moe_unpermute"
    _checks.tensor(op, "expanded_row_idx", expanded_row_idx)
    _checks.tensor(op, "probs", probs, optional=True)
    if topk is not None:
        topk = _checks.int_arg(op, "topk", topk, minimum=1, maximum=_checks.INT32_MAX)
    if expanded_row_idx.dim() == 2:
        if topk is not None and topk != expanded_row_idx.shape[1]:
            raise ArgumentError(f"moe_unpermute: topk={topk} but expanded_row_idx has shape "
                                f"{tuple(expanded_row_idx.shape)}")
        topk = expanded_row_idx.shape[1]
        if topk < 1:
            raise ArgumentError(f"moe_unpermute: a 2-D expanded_row_idx must be [T, K] with K >= 1, got "
                                f"shape {tuple(expanded_row_idx.shape)}")
        expanded_row_idx = expanded_row_idx.reshape(-1)
    if topk is None:
        if probs is None:
            raise ArgumentError("moe_unpermute: pass topk= (or probs) so that the K rows of each "
                                "token can be summed")
        if probs.dim() != 2 or probs.shape[1] < 1:
            raise ArgumentError(f"moe_unpermute: probs must be [T, K] with K >= 1, got shape "
                                f"{tuple(probs.shape)}")
        topk = probs.shape[1]
    _checks.unpermute_tensors(op, permuted, expanded_row_idx, probs, topk)
    return _checks.call_op(torch.ops.moe_ext.moe_unpermute, permuted, expanded_row_idx, probs, topk)


def expert_histogram(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``topk_ids`` route to each expert: int64 ``[num_experts]``.

    What expert-load balancing records every step. ``topk_ids`` is int32 or
    int64 of any shape; ``num_experts`` an int in ``[1, 2^31)``. The ``-1`` of
    padded or masked tokens is not counted, exactly as :func:`moe_permute`
    drops it, so for any ids that :func:`moe_permute` accepts (without a map
    or range) its counts equal this histogram. Other ids outside
    ``[0, num_experts)`` are not counted either (a load counter must not stop
    serving), where :func:`moe_permute` refuses them. One pass, no host
    synchronisation (one launch up to 65536 ids; a memset and one launch above).
    """
    num_experts = _checks.histogram_args(topk_ids, num_experts)
    return _checks.call_op(torch.ops.moe_ext.expert_histogram, topk_ids, num_experts)


# ---------------------------------------------------------------- fake kernels
# The same checks as the wrappers (moe_ext.ops._checks), so that meta / fake
# tensors refuse exactly what the CPU and CUDA kernels refuse.

@torch.library.register_fake("moe_ext::moe_permute")
def _moe_permute_fake(hidden_states, topk_ids, num_experts, active_start, active_end, expert_map,
                      counts_cumsum):
    num_experts, start, end = _checks.permute_range(num_experts, (active_start, active_end))
    _checks.permute_tensors(hidden_states, topk_ids, num_experts, expert_map)
    rows = topk_ids.shape[0] * topk_ids.shape[1]
    return (hidden_states.new_empty((rows, hidden_states.shape[1])),
            topk_ids.new_empty((rows,), dtype=torch.int32),
            topk_ids.new_empty((end - start,), dtype=torch.int64))


@torch.library.register_fake("moe_ext::moe_unpermute")
def _moe_unpermute_fake(permuted, expanded_row_idx, probs, topk):
    topk = _checks.int_arg("moe_unpermute", "topk", topk, minimum=1, maximum=_checks.INT32_MAX)
    num_tokens = _checks.unpermute_tensors("moe_unpermute", permuted, expanded_row_idx, probs, topk)
    return permuted.new_empty((num_tokens, permuted.shape[1]))


@torch.library.register_fake("moe_ext::moe_unpermute_backward")
def _moe_unpermute_backward_fake(grad_output, permuted, expanded_row_idx, probs, topk,
                                 compute_grad_probs):
    num_tokens = _checks.unpermute_backward_tensors(grad_output, permuted, expanded_row_idx, probs, topk)
    grad_probs = (probs.new_empty((num_tokens, topk)) if probs is not None
                  else permuted.new_empty((0,)))
    return permuted.new_empty(permuted.shape), grad_probs


@torch.library.register_fake("moe_ext::expert_histogram")
def _expert_histogram_fake(topk_ids, num_experts):
    num_experts = _checks.histogram_args(topk_ids, num_experts)
    return topk_ids.new_empty((num_experts,), dtype=torch.int64)


# ---------------------------------------------------------------- autograd

def _permute_setup_context(ctx, inputs, output):
    _, topk_ids, *_ = inputs
    _, expanded_row_idx, _ = output
    ctx.save_for_backward(expanded_row_idx)
    ctx.topk = topk_ids.shape[1]


def _permute_backward(ctx, grad_permuted, grad_row_idx, grad_counts):
    grad_hidden = None
    if ctx.needs_input_grad[0]:
        (expanded_row_idx,) = ctx.saved_tensors
        grad_hidden = torch.ops.moe_ext.moe_unpermute(grad_permuted, expanded_row_idx, None, ctx.topk)
    return grad_hidden, None, None, None, None, None, None


torch.library.register_autograd("moe_ext::moe_permute", _permute_backward,
                                setup_context=_permute_setup_context)


def _unpermute_setup_context(ctx, inputs, output):
    permuted, expanded_row_idx, probs, topk = inputs
    ctx.save_for_backward(permuted, expanded_row_idx, probs)
    ctx.topk = topk


def _unpermute_backward(ctx, grad_output):
    permuted, expanded_row_idx, probs = ctx.saved_tensors
    want_permuted = ctx.needs_input_grad[0]
    want_probs = probs is not None and ctx.needs_input_grad[2]
    if not (want_permuted or want_probs):
        return None, None, None, None
    grad_permuted, grad_probs = torch.ops.moe_ext.moe_unpermute_backward(
        grad_output.to(permuted.dtype), permuted, expanded_row_idx, probs, ctx.topk, want_probs)
    return (grad_permuted if want_permuted else None, None, grad_probs if want_probs else None, None)


torch.library.register_autograd("moe_ext::moe_unpermute", _unpermute_backward,
                                setup_context=_unpermute_setup_context)
