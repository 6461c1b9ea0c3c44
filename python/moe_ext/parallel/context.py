"""Per-forward facts the parallel linear ops need, passed explicitly (never a global).

An inference engine keeps these in a global "forward context"; here the caller
builds a :class:`LinearContext` once per forward pass and hands it to every
linear module that needs it (``module(x, ctx)``), as ``moe_ext.moe`` does with
its ``ForwardContext``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moe_ext.distributed.group import ParallelGroup
from moe_ext.errors import ArgumentError, check_bool, check_choice, check_int
from moe_ext.parallel import _collectives
from moe_ext.parallel.backend import FUSION_MODES

__all__ = ["LinearContext", "build_linear_context"]


@dataclass(frozen=True)
class LinearContext:
    """Padding and sequence-parallel state of one forward pass.

    Args:
        pad_size: rows of padding the ops append to their token dimension (and
            drop again where the result is unsharded along tokens), so that
            every member of a group holds the same number of rows and the
            token dimension divides by the group size. The token dimension is
            dim 0 of the 2-D ``[tokens, features]`` inputs.
        sequence_parallel: the hidden states between layers are sharded along
            tokens over the TP group (each rank holds ``(tokens + pad_size) /
            tp`` consecutive rows): the sequence-parallel ops all-gather before
            and reduce-scatter after, and the flashcomm2 O-proj keeps its
            output sharded.
        check_token_counts: before the first collective of an op that needs
            equal row counts on every member (the MLP-TP and O-proj TP ops,
            whose members are different DP replicas), exchange the counts (one
            small all-gather) and raise :class:`~moe_ext.errors.ArgumentError`
            on every member if they differ. Off by default: it costs one
            collective per call; engines that pad to the DP maximum
            (:func:`build_linear_context` with ``group``) do not need it.
        fusion: None (each op's ``LinearBackend.fusion``) or "auto" /
            "fused" / "unfused" for every op of this forward: the reference
            engine's per-forward matmul + reduce-scatter fusion switch, which
            engines turn on by batch size.
    """

    pad_size: int = 0
    sequence_parallel: bool = False
    check_token_counts: bool = False
    fusion: Optional[str] = None

    def __post_init__(self) -> None:
        check_int("LinearContext.pad_size", self.pad_size, minimum=0)
        check_bool("LinearContext.sequence_parallel", self.sequence_parallel)
        check_bool("LinearContext.check_token_counts", self.check_token_counts)
        if self.fusion is not None:
            check_choice("LinearContext.fusion", self.fusion, FUSION_MODES)


def build_linear_context(num_tokens: int, *, multiple_of: int = 1, group: Optional[ParallelGroup] = None,
                         sequence_parallel: bool = False, check_token_counts: bool = False,
                         fusion: Optional[str] = None) -> LinearContext:
    """The context for ``num_tokens`` local tokens.

    The padded count is the largest ``num_tokens`` of ``group`` (one
    all-reduce on its CPU group; ``None``: this rank's own count) rounded up to
    a multiple of ``multiple_of`` (the TP size for the sequence-parallel and
    flashcomm2 ops, 1 otherwise); ``pad_size`` is the difference.
    Raises ArgumentError for a negative count or ``multiple_of < 1``.
    """
    num_tokens = check_int("build_linear_context: num_tokens", num_tokens, minimum=0)
    multiple_of = check_int("build_linear_context: multiple_of", multiple_of, minimum=1)
    if group is not None and not isinstance(group, ParallelGroup):
        raise TypeError(f"build_linear_context: group must be a ParallelGroup or None, got {type(group).__name__}")
    largest = _collectives.max_over_group(num_tokens, group) if group is not None else num_tokens
    padded = -(-largest // multiple_of) * multiple_of
    if padded - num_tokens < 0:  # pragma: no cover - max() guarantees it
        raise ArgumentError("build_linear_context: internal padding error")
    return LinearContext(padded - num_tokens, sequence_parallel, check_token_counts, fusion)
