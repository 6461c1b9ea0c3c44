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



class _PermuteFields(NamedTuple):
    permuted: torch.Tensor
    expanded_row_idx: torch.Tensor
    expert_tokens: torch.Tensor


class PermuteResult(_PermuteFields):
    """What :func:`moe_permute` returns: a named 3-tuple plus two attributes.

    Unpacks as ``permuted, expanded_row_idx, expert_tokens = moe_permute(...)``
    in every variant (default, aligned, fp8 with scales); the extra outputs of
    the variants are attributes, so existing three-field callers never change.
    (``_replace`` and pickling keep only the three fields.)

    Fields:
        permuted: ``[R, H]``, the valid rows first, grouped by (local) expert.
            Default: ``R = T*K``, rows at or past the valid count are not
            written and must not be read. With ``alignment=A > 1``: ``R = T*K +
            num_active_experts * (A - 1)`` (a static bound), each expert's block
            starts at a multiple of ``A`` and its pad rows are zero; rows past
            the padded total are not written.
        expanded_row_idx: int32 ``[T*K]``: row ``t*K + k``'s position in
            ``permuted`` (padded positions when aligned), or -1 if dropped.
        expert_tokens: int64 ``[end - start]``: rows per active expert in the
            layout (padded to a multiple of ``A`` when aligned: the group sizes a
            grouped GEMM takes), or their inclusive cumsum.

    Attributes:
        expert_tokens_unpadded: int64 ``[end - start]``: the routed rows per
            active expert before padding (count or cumsum form, as
            ``expert_tokens``); the same tensor as ``expert_tokens`` when not aligned.
        permuted_scales: float32 ``[R]`` / ``[R, S]`` (the shape of ``scales``
            with ``R`` rows): each row's scale row, pad rows zero; ``None``
            when no ``scales`` were given.
    """

    def __new__(cls, permuted, expanded_row_idx, expert_tokens, expert_tokens_unpadded=None,
                permuted_scales=None):
        self = super().__new__(cls, permuted, expanded_row_idx, expert_tokens)
        self.expert_tokens_unpadded = expert_tokens if expert_tokens_unpadded is None else expert_tokens_unpadded
        self.permuted_scales = permuted_scales
        return self


def moe_permute(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    active_expert_range: Optional[tuple[int, int]] = None,
    expert_map: Optional[torch.Tensor] = None,
    counts: Literal["count", "cumsum"] = "count",
    alignment: int = 1,
    scales: Optional[torch.Tensor] = None,
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
        alignment: ``A`` in ``[1, 2^31)``; ``A > 1`` pads each active expert's
            block to a multiple of ``A`` rows for grouped GEMMs that need
            aligned groups (FP8 / block-scaled GEMMs, ``torch._grouped_mm`` on
            strided layouts), in the same pass (rows are copied straight to
            their padded positions; no second copy). Block sizes are the counts
            rounded up to a multiple of ``A``; an expert with no rows keeps an
            empty block (TransformerEngine's padded permute; torchtitan's
            ``generate_permute_indices`` instead gives it ``A`` rows). Pad rows
            are **zero** (and their scales zero), so a GEMM over the whole block
            reads defined values. ``permuted`` has the static row count
            ``T*K + (end - start) * (A - 1)``; rows past the padded total
            (``expert_tokens.sum()``) are not written.
        scales: optional float32 row scales moving with their rows (DeepSeek-style
            fp8 dispatch): ``[T]`` or ``[T, 1]`` per token, or ``[T, ceil(H / 128)]``
            per 128-column block; returned as ``result.permuted_scales``.
            ``hidden_states`` may then (or without scales, e.g. with a
            per-tensor scale held by the caller) be ``float8_e4m3fn`` /
            ``float8_e5m2``: rows are moved as bytes, bit for bit.

    Returns:
        :class:`PermuteResult` ``(permuted [R, H], expanded_row_idx int32 [T*K],
        expert_tokens int64 [end - start])`` with attributes
        ``expert_tokens_unpadded`` and ``permuted_scales``, all on the input's
        device (``R = T*K`` unless aligned).
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
        (``ValueError`` beyond). ``alignment`` outside ``[1, 2^31)``, a padded
        bound ``T*K + (end - start) * (alignment - 1)`` above ``2^31`` rows,
        ``scales`` of another shape than above or not float32 are refused
        before dispatch (``ArgumentError`` / ``TypeError``).

    Autograd: the gradient of ``hidden_states`` is
    ``moe_unpermute(grad_permuted, expanded_row_idx, topk=K)`` (a per-token
    gather of the token's K rows, fp32 sums); dropped rows and pad rows
    contribute nothing. The gradient of ``scales`` is the same sum of the
    gradients of its K scale rows. float8 ``hidden_states`` carry no gradient
    (fp8 is a dispatch format here: they are detached, so ``permuted`` does
    not require grad through them, and no gradient reaches whatever produced
    them; fp8 training recipes feed the bf16 gradient by their own backward).

    NPU: ``torch_npu.npu_moe_init_routing_v2`` has no alignment and no block
    scales; see :func:`moe_ext.platform.npu.init_routing` for what the NPU
    path does with each.
    """
    try:
        check_choice("counts", counts, ("count", "cumsum"))
    except TypeError as error:
        raise TypeError(f"moe_permute: {error}") from None
    except ArgumentError as error:
        raise ArgumentError(f"moe_permute: {error}") from None
    num_experts, start, end = _checks.permute_range(num_experts, active_expert_range)
    alignment, _ = _checks.permute_padded_tensors(hidden_states, scales, topk_ids, num_experts, expert_map,
                                                  end - start, alignment)
    if alignment > 1 or scales is not None or hidden_states.dtype in _checks.FLOAT8:
        if hidden_states.dtype in _checks.FLOAT8:
            hidden_states = hidden_states.detach()  # fp8 rows carry no gradient (docstring)
        permuted, permuted_scales, expanded_row_idx, expert_tokens, unpadded = _checks.call_op(
            torch.ops.moe_ext.moe_permute_padded, hidden_states, scales, topk_ids, num_experts, start, end,
            expert_map, counts == "cumsum", alignment)
        return PermuteResult(permuted, expanded_row_idx, expert_tokens, unpadded,
                             permuted_scales if scales is not None else None)
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
        permuted: ``[R, H]`` float32 / float16 / bfloat16 / float64 (any row
            count: the padded layout of an aligned :func:`moe_permute` works
            as is, pad rows and rows past the total are never read). A float8
            ``permuted`` is refused (``TypeError``): combine the experts'
            bf16/fp16/fp32 output.
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
    zeros): nothing may read them, and :func:`moe_permute`'s backward never
    does; except for the padded layout of an aligned :func:`moe_permute` (more
    rows than entries), where the unnamed rows of ``grad_permuted`` are zero on
    every backend, because its pad rows sit inside the grouped GEMM's groups
    (their weight gradient reads them);
    ``grad_probs[t,k] = dot(grad_out[t], permuted[row])`` in fp32 (0 for
    dropped entries). The backward requires each row to be named at most once
    (true of :func:`moe_permute`'s output); a repeated row is refused
    (``ValueError`` on CPU, device-side assert on CUDA) rather than summed
    with atomics.
    """
    op = "moe_unpermute"
    topk_from = "topk"
    _checks.tensor(op, "expanded_row_idx", expanded_row_idx)
    _checks.tensor(op, "probs", probs, optional=True)
    if topk is not None:
        topk = _checks.int_arg(op, "topk", topk, minimum=1, maximum=_checks.INT32_MAX)
    if expanded_row_idx.dim() == 2:
        if topk is not None and topk != expanded_row_idx.shape[1]:
            raise ArgumentError(f"moe_unpermute: topk={topk} but expanded_row_idx has shape "
                                f"{tuple(expanded_row_idx.shape)}")
        topk, topk_from = expanded_row_idx.shape[1], "expanded_row_idx"
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
        topk, topk_from = probs.shape[1], "probs"
    _checks.unpermute_tensors(op, permuted, expanded_row_idx, probs, topk, topk_from)
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


@torch.library.register_fake("moe_ext::moe_permute_padded")
def _moe_permute_padded_fake(hidden_states, scales, topk_ids, num_experts, active_start, active_end, expert_map,
                             counts_cumsum, alignment):
    num_experts, start, end = _checks.permute_range(num_experts, (active_start, active_end))
    _, bound = _checks.permute_padded_tensors(hidden_states, scales, topk_ids, num_experts, expert_map,
                                              end - start, alignment)
    rows = topk_ids.shape[0] * topk_ids.shape[1]
    if scales is None:
        permuted_scales = hidden_states.new_empty((0,), dtype=torch.float32)
    else:
        permuted_scales = scales.new_empty((bound,) + tuple(scales.shape[1:]))
    return (hidden_states.new_empty((bound, hidden_states.shape[1])), permuted_scales,
            topk_ids.new_empty((rows,), dtype=torch.int32),
            topk_ids.new_empty((end - start,), dtype=torch.int64),
            topk_ids.new_empty((end - start,), dtype=torch.int64))


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


def _permute_padded_setup_context(ctx, inputs, output):
    hidden_states, scales, topk_ids, *_ = inputs
    _, _, expanded_row_idx, _, _ = output
    ctx.save_for_backward(expanded_row_idx)
    ctx.topk = topk_ids.shape[1]
    ctx.hidden_dtype = hidden_states.dtype
    ctx.scales_1d = scales is not None and scales.dim() == 1


def _permute_padded_backward(ctx, grad_permuted, grad_scales, grad_row_idx, grad_counts, grad_unpadded):
    (expanded_row_idx,) = ctx.saved_tensors
    grad_hidden = grad_scale_rows = None
    if ctx.needs_input_grad[0]:
        # float8 rows carry no gradient (documented in moe_permute; the wrapper detaches them).
        if ctx.hidden_dtype not in _checks.FLOAT8:
            grad_hidden = torch.ops.moe_ext.moe_unpermute(grad_permuted, expanded_row_idx, None, ctx.topk)
    if ctx.needs_input_grad[1] and grad_scales is not None:
        rows = grad_scales.unsqueeze(1) if ctx.scales_1d else grad_scales
        grad_scale_rows = torch.ops.moe_ext.moe_unpermute(rows, expanded_row_idx, None, ctx.topk)
        if ctx.scales_1d:
            grad_scale_rows = grad_scale_rows.squeeze(1)
    return grad_hidden, grad_scale_rows, None, None, None, None, None, None, None


torch.library.register_autograd("moe_ext::moe_permute_padded", _permute_padded_backward,
                                setup_context=_permute_padded_setup_context)


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
    if want_permuted and permuted.shape[0] > expanded_row_idx.shape[0] and permuted.device.type != "cpu":
        # More rows than entries: the padded layout of an aligned moe_permute. Its pad rows sit inside the
        # experts' groups, so a grouped GEMM's weight gradient reads them (0 * garbage can be NaN): they must
        # be zero, while the kernel may leave unnamed rows unwritten. One masked pass, no host sync.
        named = torch.zeros(permuted.shape[0] + 1, dtype=torch.bool, device=permuted.device)
        rows = torch.where(expanded_row_idx >= 0, expanded_row_idx.to(torch.int64),
                           torch.full_like(expanded_row_idx, permuted.shape[0], dtype=torch.int64))
        named.index_fill_(0, rows, True)
        grad_permuted = torch.where(named[:-1, None], grad_permuted, torch.zeros_like(grad_permuted))
    return (grad_permuted if want_permuted else None, None, grad_probs if want_probs else None, None)


torch.library.register_autograd("moe_ext::moe_unpermute", _unpermute_backward,
                                setup_context=_unpermute_setup_context)
