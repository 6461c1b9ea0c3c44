"""Per-forward facts every comm method needs, computed once and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from moe_ext.errors import ArgumentError, check_bool, check_int
from moe_ext.moe.config import MoEConfig

__all__ = ["ForwardContext", "build_forward_context", "checked_forward_context", "validate_hidden_states",
           "DTYPE_CODES"]

#: dtypes by code, for the cross-rank call check (a code travels in an int64 all-reduce)
DTYPE_CODES = (None, torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
               torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_OTHER_DTYPE = len(DTYPE_CODES)


@dataclass
class ForwardContext:
    """Token counts of one forward pass.

    - ``num_tokens``: tokens this rank holds (identical on the ranks of one TP group);
    - ``max_tokens_across_dp``: the largest ``num_tokens`` of the DP group (the
      all-gather paths pad every rank to it);
    - ``padded_num_tokens``: ``max_tokens_across_dp`` rounded up to a multiple of
      ``tp_size`` and at least ``tp_size``, so that every EP rank hands MC2 the
      same batch size and every TP rank gets an equal, non-empty share;
    - ``mc2_mask``: bool [padded_num_tokens], True for this rank's real tokens
      (all trues first, as MC2's ``x_active_mask`` requires).
    """

    num_tokens: int
    max_tokens_across_dp: int
    padded_num_tokens: int
    mc2_mask: torch.Tensor

    def __post_init__(self) -> None:
        if not 0 <= self.num_tokens <= self.max_tokens_across_dp <= self.padded_num_tokens:
            raise ValueError("ForwardContext: need 0 <= num_tokens <= max_tokens_across_dp <= padded_num_tokens, got "
                             f"{self.num_tokens}, {self.max_tokens_across_dp}, {self.padded_num_tokens}")
        if tuple(self.mc2_mask.shape) != (self.padded_num_tokens,) or self.mc2_mask.dtype != torch.bool:
            raise ValueError(f"ForwardContext: mc2_mask must be bool [{self.padded_num_tokens}], got "
                             f"{self.mc2_mask.dtype} {tuple(self.mc2_mask.shape)}")


def _collective_device(device: torch.device | str) -> torch.device:
    # The vector travels on the collective's own device (NCCL needs CUDA tensors).
    return torch.device(device) if torch.device(device).type != "cpu" else torch.device("cpu")


def build_forward_context(config: MoEConfig, num_tokens: int, device: torch.device | str = "cpu",
                          max_tokens_across_dp: Optional[int] = None, *,
                          call_facts: Optional[Mapping[str, int]] = None, check_call: Optional[bool] = None,
                          refused: bool = False, describe: Optional[Mapping[str, Any]] = None
                          ) -> Optional[ForwardContext]:
    """The context of a forward pass over ``num_tokens`` local tokens.

    Without ``max_tokens_across_dp`` it is found with one all-reduce (max) over
    the DP group; engines that already know it (from their scheduler) pass it
    and skip the collective.

    Cross-rank call check (MoE reliability): ``call_facts`` maps names to ints
    that every rank of the EP group must agree on (hidden size, dtype code,
    comm method, grad mode: :func:`checked_forward_context` builds them). With
    ``check_call`` None, they are checked whenever the count all-reduce runs
    anyway (``max_tokens_across_dp`` not given): the facts ride in that one
    all-reduce, now over the EP group, so the check adds no collective; with
    ``check_call=True`` the all-reduce runs even when ``max_tokens_across_dp``
    is given or ``dp_size == 1`` (an extra collective: opt in, e.g. while
    debugging a deployment); ``False`` never checks. On a disagreement every
    rank raises :class:`~moe_ext.errors.ArgumentError` naming the fact.
    ``refused``: this rank found its own input bad; it takes part in the
    all-reduce (so the peers raise too, instead of waiting) and gets None
    back, to raise its own error.
    """
    num_tokens = check_int("build_forward_context: num_tokens", num_tokens, minimum=0)
    if max_tokens_across_dp is not None:
        max_tokens_across_dp = check_int("build_forward_context: max_tokens_across_dp", max_tokens_across_dp,
                                         minimum=num_tokens)
    if check_call is None:  # by default only where the count all-reduce runs anyway
        check_call = call_facts is not None and max_tokens_across_dp is None and config.dp_size > 1
    check = check_bool("build_forward_context: check_call", check_call) and config.ep_size > 1
    if check:
        if call_facts is None:
            raise ArgumentError("build_forward_context: check_call=True needs call_facts")
        # One all-reduce over the EP group (which holds the DP group: the same maximum),
        # carrying the count and each fact as (value, -value) so that MAX gives both the
        # largest and the smallest value of every fact: they differ iff some rank differs.
        names = list(call_facts)
        values = [int(call_facts[name]) for name in names]
        vector = torch.tensor([num_tokens, int(refused), *values, *(-v for v in values)], dtype=torch.int64,
                              device=_collective_device(device))
        dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=config.ep_group.process_group)
        got = vector.tolist()
        if max_tokens_across_dp is None:
            max_tokens_across_dp = got[0]
        if refused:
            return None  # the caller raises its own, local error
        count = len(names)
        for i, name in enumerate(names):
            highest, lowest = got[2 + i], -got[2 + count + i]
            if highest != lowest:
                decode = (describe or {}).get(name, str)
                raise ArgumentError(f"MoE forward: the ranks of the EP group disagree on {name}: this rank has "
                                    f"{decode(values[i])}, the group has values from {decode(lowest)} to "
                                    f"{decode(highest)}; every rank must call the layer alike")
        if got[1]:
            raise ArgumentError("MoE forward: another rank of the EP group refused its input (its error names "
                                "the argument); every rank stops here, so none waits in a collective")
    if max_tokens_across_dp is None:
        max_tokens_across_dp = num_tokens
        if config.dp_size > 1:
            count = torch.tensor([num_tokens], dtype=torch.int64, device=_collective_device(device))
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=config.dp_group.process_group)
            max_tokens_across_dp = int(count.item())
    tp = config.tp_size
    padded = max(tp, (max_tokens_across_dp + tp - 1) // tp * tp)
    mask = torch.arange(padded, device=device) < num_tokens
    return ForwardContext(num_tokens, max_tokens_across_dp, padded, mask)


def validate_hidden_states(caller: str, hidden_states: Any, hidden_size: int, dtype: torch.dtype,
                           device: torch.device) -> Optional[Exception]:
    """The error a bad layer input deserves (not raised), or None.

    ``hidden_states`` must be a tensor [T, hidden_size] of ``dtype`` (the
    expert weights' dtype: the matmuls need it) on ``device``.
    """
    if not isinstance(hidden_states, torch.Tensor):
        return TypeError(f"{caller}: hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != hidden_size:
        return ArgumentError(f"{caller}: hidden_states must have shape [T, {hidden_size}], got "
                             f"{list(hidden_states.shape)}")
    if hidden_states.dtype != dtype:
        return ArgumentError(f"{caller}: hidden_states must have dtype {dtype} (the expert weights' dtype), got "
                             f"{hidden_states.dtype}")
    if hidden_states.device != device:
        return ArgumentError(f"{caller}: hidden_states must be on {device} (where the layer's weights are), got "
                             f"{hidden_states.device}")
    return None


def _dtype_code(dtype: Optional[torch.dtype]) -> int:
    return DTYPE_CODES.index(dtype) if dtype in DTYPE_CODES else _OTHER_DTYPE


def _dtype_name(code: int) -> str:
    return str(DTYPE_CODES[code]) if 0 <= code < len(DTYPE_CODES) and code else "another dtype"


def checked_forward_context(caller: str, config: MoEConfig, hidden_states: Any, *, dtype: torch.dtype,
                            device: torch.device, comm_method: str, methods: tuple[str, ...],
                            context: Optional[ForwardContext] = None, check_call: Optional[bool] = None,
                            problem: Optional[Exception] = None) -> ForwardContext:
    """Validate a layer's input locally, then build (or take) the forward context, agreeing on the call.

    Local checks (:func:`validate_hidden_states`) come first; when the context
    is built here, the hidden size, dtype, comm method (``comm_method``, one
    of ``methods``; "auto" when chosen per forward) and grad mode travel in the
    context's all-reduce (see :func:`build_forward_context` for when that
    runs), so a rank whose input is bad or differs makes every rank raise at
    once instead of leaving its peers in a collective. A caller-supplied
    ``context`` is used as is (no cross-rank check: build it with
    ``call_facts`` to have one). ``problem``: an error the caller found in its
    other arguments or its own state on this rank (e.g. the MoE layer's routing
    arguments); it is handled like a bad ``hidden_states``: raised here, on
    every rank when the all-reduce runs.
    """
    problem = validate_hidden_states(caller, hidden_states, config.hidden_size, dtype, device) or problem
    if context is not None:
        if problem is not None:
            raise problem
        return context
    tensor = isinstance(hidden_states, torch.Tensor)
    facts = {
        "hidden size": int(hidden_states.shape[-1]) if tensor and hidden_states.dim() else -1,
        "hidden_states dtype": _dtype_code(hidden_states.dtype if tensor else None),
        "comm method": methods.index(comm_method) if comm_method in methods else len(methods),
        "grad mode": int(torch.is_grad_enabled()),
        "hidden_states.requires_grad": int(tensor and hidden_states.requires_grad),
    }
    describe = {"hidden_states dtype": _dtype_name,
                "comm method": lambda code: repr(methods[code]) if 0 <= code < len(methods) else "another method"}
    num_tokens = int(hidden_states.shape[0]) if problem is None else 0
    built = build_forward_context(config, num_tokens, device, call_facts=facts, check_call=check_call,
                                  refused=problem is not None, describe=describe)
    if problem is not None:
        raise problem
    return built
