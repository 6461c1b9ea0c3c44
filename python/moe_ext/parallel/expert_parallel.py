"""Expert-parallel training: a grouped-experts module and the DTensor parallel styles that shard it.

The styles follow the training-framework design of seed 003 (torchtitan's
``expert_parallel.py`` before its 0.3 token dispatchers), applied with
``torch.distributed.tensor.parallel.parallelize_module``:

=========================  =====================  ======================================================
style                      mesh                   what it does to :class:`GroupedExperts`
=========================  =====================  ======================================================
:class:`TensorParallel`    1-D ``tp``             w1 / w3 column-sharded (``Shard(1)``), w2 row-sharded
                                                  (``Shard(2)``); the input's gradient is summed over
                                                  TP; the output is all-reduced (``reduce_output``)
:class:`ExpertParallel`    1-D ``ep``             experts sharded on dim 0; dispatch = count exchange,
                                                  token all-to-all, regroup by local expert padded to
                                                  ``alignment``; combine = the inverse
:class:`ExpertTensorParallel` 2-D ``[ep, tp]``    both of the above
:class:`ReordererSequenceParallel` 1-D            on a :class:`TokenReorderer`: each rank reorders its
                                                  share of the tokens; token indices offset to global
=========================  =====================  ======================================================

What moe_ext does differently from the seed, and why:

- The regroup after the all-to-all is one pass each way
  (:func:`moe_ext.ops.group_by_local_expert` / :func:`~moe_ext.ops.ungroup_by_local_expert`:
  one index launch, each row read once and written once) instead of a ``vstack`` of a
  zero row followed by an index gather and an index put, which move every row twice.
- The all-to-all is :func:`moe_ext.distributed.functional.all_to_all_single`, whose
  backward is correct on subgroups and on gloo (a DeviceMesh's ``get_group()`` of an
  ``ep`` sub-mesh is a subgroup).
- ``alignment`` (rows per expert block, for grouped GEMMs) is an argument of the style,
  not a module-level global that every caller shares.
- :class:`ReordererSequenceParallel` accepts token counts that do not divide by the
  mesh size: ranks take contiguous shares whose sizes differ by at most one (what
  ``torch.tensor_split`` gives). The seed refused; padding instead would route the pad
  tokens to real experts and spend compute and all-to-all bytes on them, while an
  uneven share needs nothing to unpad (the all-to-all carries counts anyway).
- The padded total that the seed's index kernel could overflow is refused by
  :func:`moe_ext.ops.generate_permute_indices` (it checks ``max_len``), so the
  regroup can never write past its buffer.

Per-call state is a value, never style or module state. :func:`dispatch_tokens` returns
a frozen :class:`DispatchMetadata` (split sizes, regroup indices) that
:func:`combine_tokens` takes, as torchtitan 0.3's token dispatchers do. A style runs them
in a forward pre-hook and a forward hook, and torch hands the forward hook the very
arguments the pre-hooks returned, so the pre-hook files its metadata under the first
tensor it gives the forward (a new tensor every call, held weakly) and the forward hook
takes it back from its own arguments. Two calls in flight at once on one module (micro-
batches on two threads, as overlapped schedules run them; a forward entered again from
inside; activation checkpointing's recomputation) each combine with their own dispatch,
in any order (tests/test_expert_parallel_overlap.py). A later pre-hook that replaces the
forward's first tensor breaks the link, and the forward hook then refuses by name.
Frameworks that call dispatch and combine as separate steps use the functions directly
or the token dispatcher: :mod:`moe_ext.parallel.torchtitan_dispatcher`.

Which one to choose: a torchtitan 0.3 user switches the MoE's ``token_dispatcher``
config entry to :class:`~moe_ext.parallel.torchtitan_dispatcher.MoeExtTokenDispatcher`;
code that composes its own MoE from a grouped-experts module and DTensor styles
(torchtitan before 0.3, or a custom trainer) uses these styles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.utils.weak import WeakIdKeyDictionary

from moe_ext.distributed import functional as dfn
from moe_ext.errors import ArgumentError, check_bool, check_int
from moe_ext.moe.experts import gated_mlp_grouped_mm, gated_mlp_loop, grouped_mm_applies
from moe_ext.ops import expert_histogram, group_by_local_expert, ungroup_by_local_expert

__all__ = ["GroupedExperts", "TokenReorderer", "TensorParallel", "ExpertParallel", "ExpertTensorParallel",
           "ReordererSequenceParallel", "DispatchMetadata", "dispatch_tokens", "combine_tokens"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (differentiable), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _grouped_mm_usable(x: torch.Tensor, w13: tuple[torch.Tensor, torch.Tensor], w2: torch.Tensor) -> bool:
    """torch._grouped_mm on CUDA sm90+ where :func:`moe_ext.moe.experts.grouped_mm_applies` holds (bf16,
    16-byte-aligned row strides: dim and the local hidden size multiples of 8); elsewhere the loop."""
    return x.is_cuda and grouped_mm_applies(x, w13, w2) and torch.cuda.get_device_capability(x.device)[0] >= 9


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU MLPs applied to rows grouped by expert.

    Parameters (seed 003's layout): ``w1`` ``[E, hidden_dim, dim]`` (gate), ``w2``
    ``[E, dim, hidden_dim]`` (down), ``w3`` ``[E, hidden_dim, dim]`` (up). Expert ``e``
    computes ``w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))``.

    ``forward(x, num_tokens_per_expert)``: ``x`` ``[N, dim]`` holds expert 0's rows, then
    expert 1's, ...; ``num_tokens_per_expert`` (int, ``[E_local]``, on any device) how many
    each has; rows past their sum come back as zeros. Under a parallel style the parameters
    are DTensors and their local shards are used: ``E_local`` experts, and under tensor
    parallelism ``hidden_dim / tp`` columns (the output then is this rank's partial sum).
    On CUDA in bf16 one ``torch._grouped_mm`` per projection (offsets from the counts, no
    host synchronisation); elsewhere a loop over experts (one host read of the counts).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, *, dtype: Optional[torch.dtype] = None,
                 device: Any = None) -> None:
        super().__init__()
        dim = check_int("dim", dim, minimum=1)
        hidden_dim = check_int("hidden_dim", hidden_dim, minimum=1)
        num_experts = check_int("num_experts", num_experts, minimum=1)
        factory = {"dtype": dtype, "device": device}
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        with torch.no_grad():
            for weight in (self.w1, self.w2, self.w3):
                nn.init.trunc_normal_(weight, std=std)

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = _local(self.w1), _local(self.w2), _local(self.w3)
        num_local = w1.shape[0]
        if x.dim() != 2 or x.shape[1] != w1.shape[2]:
            raise ArgumentError(f"GroupedExperts: x must be [N, {w1.shape[2]}], got {list(x.shape)}")
        if num_tokens_per_expert.shape != (num_local,):
            raise ArgumentError(f"GroupedExperts: num_tokens_per_expert must be [{num_local}] (the local "
                                f"experts), got {list(num_tokens_per_expert.shape)}")
        # moe.experts' implementation on the seed layout: w1 / w3 / w2 transposed are its (gate, up) pair and w2.
        w13, w2_t = (w1.transpose(-2, -1), w3.transpose(-2, -1)), w2.transpose(-2, -1)
        if _grouped_mm_usable(x, w13, w2_t):
            counts = num_tokens_per_expert.to(x.device)
            out = gated_mlp_grouped_mm(x, counts, w13, w2_t)
            # rows past the last offset are unspecified in _grouped_mm: zero them
            rows = torch.arange(x.shape[0], device=x.device)
            return torch.where((rows < counts.sum()).unsqueeze(1), out, out.new_zeros(()))
        total = int(num_tokens_per_expert.sum())
        if total > x.shape[0]:
            raise ArgumentError(f"GroupedExperts: num_tokens_per_expert sums to {total}, more than the "
                                f"{x.shape[0]} rows of x")
        return gated_mlp_loop(x, num_tokens_per_expert, w13, w2_t)


class TokenReorderer(nn.Module):
    """Sorts the routed (token, k) pairs by expert: what the experts' dispatch consumes.

    ``forward(top_scores [T, K], selected_experts_indices [T, K])`` returns
    ``(top_scores_experts_sorted [T*K], token_indices_experts_sorted [T*K] int64,
    num_tokens_per_expert [num_experts] int64)``: pairs in stable order of expert id
    (ties keep token order), the token of each, and the per-expert counts.
    """

    def __init__(self, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        self.top_k = check_int("top_k", top_k, minimum=1)

    def forward(self, top_scores: torch.Tensor, selected_experts_indices: torch.Tensor):
        if selected_experts_indices.dim() != 2 or selected_experts_indices.shape[1] != self.top_k:
            raise ArgumentError(f"TokenReorderer: selected_experts_indices must be [T, {self.top_k}], "
                                f"got {list(selected_experts_indices.shape)}")
        counts = expert_histogram(selected_experts_indices, self.num_experts)
        order = torch.argsort(selected_experts_indices.reshape(-1), stable=True)
        return top_scores.reshape(-1)[order], order // self.top_k, counts


# ---------------------------------------------------------------- dispatch and combine as values

@dataclass(frozen=True)
class DispatchMetadata:
    """What :func:`combine_tokens` needs from :func:`dispatch_tokens` of the same call (a value: frozen)."""

    input_splits: list[int]
    """Rows this rank sent to each EP rank (group rank order)."""
    output_splits: list[int]
    """Rows this rank received from each EP rank."""
    permuted_indices: torch.Tensor
    """The regroup's index: for each arrived row, its row in the grouped buffer."""
    num_arrived: int
    """Rows that arrived (the all-to-all's output length)."""


def padded_rows(num_rows: int, experts_per_rank: int, alignment: int) -> int:
    """Static size of the regrouped buffer: every block padded to ``alignment``, rounded up."""
    total = num_rows + experts_per_rank * alignment
    return -(-total // alignment) * alignment


def _dispatch_input_problem(routed_input: Any, num_tokens_per_expert: Any, ep: int, num_experts: Optional[int],
                            hidden_size: Optional[int]) -> Optional[Exception]:
    """What is wrong with a dispatch's arguments that needs no tensor values (None: nothing)."""
    for name, value in (("routed_input", routed_input), ("num_tokens_per_expert", num_tokens_per_expert)):
        if not isinstance(value, torch.Tensor):
            return TypeError(f"ExpertParallel: {name} must be a torch.Tensor, got {type(value).__name__}")
    if num_tokens_per_expert.dtype.is_floating_point or num_tokens_per_expert.dtype.is_complex \
            or num_tokens_per_expert.dtype == torch.bool:
        return TypeError(f"ExpertParallel: num_tokens_per_expert must be an integer tensor, got "
                         f"{num_tokens_per_expert.dtype}")
    expected = f"[{num_experts}] (every expert of the EP group)" if num_experts is not None else \
        f"1-D with a multiple of the EP size {ep} entries"
    if num_tokens_per_expert.dim() != 1 or (num_experts is not None and num_tokens_per_expert.shape[0] != num_experts) \
            or num_tokens_per_expert.shape[0] % ep or num_tokens_per_expert.shape[0] == 0:
        return ArgumentError(f"ExpertParallel: num_tokens_per_expert must be {expected}, got "
                             f"{list(num_tokens_per_expert.shape)}")
    columns = f", {hidden_size}" if hidden_size is not None else ", D"
    if routed_input.dim() != 2 or (hidden_size is not None and routed_input.shape[1] != hidden_size):
        return ArgumentError(f"ExpertParallel: routed_input must be [N{columns}] (rows sorted by expert), got "
                             f"{list(routed_input.shape)}")
    if routed_input.device != num_tokens_per_expert.device and num_tokens_per_expert.device.type != "cpu":
        return ArgumentError(f"ExpertParallel: num_tokens_per_expert must be on routed_input's device "
                             f"({routed_input.device}) or the CPU, got {num_tokens_per_expert.device}")
    return None


def dispatch_tokens(routed_input: torch.Tensor, num_tokens_per_expert: torch.Tensor, group: Any,
                    alignment: int, *, num_experts: Optional[int] = None,
                    hidden_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, DispatchMetadata]:
    """Expert-parallel dispatch: rows sorted by global expert go to the rank owning the expert.

    ``routed_input`` ``[N, D]`` sorted by global expert (contiguous experts per rank),
    ``num_tokens_per_expert`` int ``[E]`` (E = experts over the whole group, non-negative,
    summing to N). Exchanges the counts (one all-to-all; the row splits then need one host
    read, as in the seed), exchanges the rows (differentiable), and regroups them by local
    expert with each block padded to ``alignment`` rows. Returns ``(rows [M, D], m_sizes
    int32 [E / ep], metadata)``. Every rank enters the same two collectives whatever its
    counts (zero rows included).

    Bad input: with ``num_experts`` (E, the same on every rank; the styles and the
    torchtitan dispatcher pass it) a rank whose arguments are wrong (type, shape, ``D`` !=
    ``hidden_size`` when given, negative counts, counts not summing to N) sends counts of
    -1 in the count exchange instead of its counts: it raises its own error naming the
    argument, and every other rank raises ``ArgumentError`` naming the refusing rank,
    before any row moves and with no collective added (the ranks stay in step for the next
    call). Without ``num_experts`` a shape / type problem raises on that rank only, before
    the exchange (the others then wait in it until the group's timeout).
    """
    ep = dfn.group_size(group)
    if num_experts is not None:
        num_experts = check_int("dispatch_tokens: num_experts", num_experts, minimum=ep)
        if num_experts % ep:  # the same on every rank, so every rank raises here
            raise ArgumentError(f"dispatch_tokens: num_experts must be a multiple of the EP size {ep}, got "
                                f"{num_experts}")
    if hidden_size is not None:
        hidden_size = check_int("dispatch_tokens: hidden_size", hidden_size, minimum=1)
    problem = _dispatch_input_problem(routed_input, num_tokens_per_expert, ep, num_experts, hidden_size)
    if problem is not None and (num_experts is None or ep == 1):
        raise problem
    total_experts = num_experts if num_experts is not None else num_tokens_per_expert.shape[0]
    experts_per_rank = total_experts // ep
    device = routed_input.device if isinstance(routed_input, torch.Tensor) else torch.device("cpu")
    with torch.no_grad():
        if problem is None:
            counts = num_tokens_per_expert.to(device=device, dtype=torch.int64)
            own = torch.stack([counts.sum(), counts.min()])
            refused = (own[1] < 0) | (own[0] != routed_input.shape[0])
            sent = torch.where(refused, torch.full_like(counts, -1), counts)  # on the device: no host read here
        else:
            own = torch.zeros(2, dtype=torch.int64, device=device)
            sent = torch.full((total_experts,), -1, dtype=torch.int64, device=device)
        counts_group = dfn.all_to_all_single(sent.contiguous(), None, None, group) if ep > 1 else sent
        by_rank = counts_group.view(ep, experts_per_rank)
        host = torch.cat([own, sent.view(ep, -1).sum(1), by_rank.sum(1), by_rank.amin(1)]).cpu().tolist()
    own_sum, own_min = host[0], host[1]
    input_splits, output_splits, arrived_min = host[2:2 + ep], host[2 + ep:2 + 2 * ep], host[2 + 2 * ep:]
    if problem is not None:
        raise problem
    if own_min < 0 or own_sum != routed_input.shape[0]:
        raise ArgumentError(f"ExpertParallel: num_tokens_per_expert must be non-negative counts summing to "
                            f"routed_input's {routed_input.shape[0]} rows, got sum {own_sum}, smallest {own_min}")
    refusing = [rank for rank, smallest in enumerate(arrived_min) if smallest < 0]
    if refusing:
        raise ArgumentError(f"ExpertParallel: EP group rank{'s' if len(refusing) > 1 else ''} "
                            f"{', '.join(map(str, refusing))} refused {'their' if len(refusing) > 1 else 'its'} "
                            f"dispatch input (the error there names the argument); no rows were exchanged")
    arrived = dfn.all_to_all_single(routed_input.contiguous(), output_splits, input_splits, group)
    grouped = group_by_local_expert(arrived, counts_group, experts_per_rank, ep, alignment,
                                    padded_rows(arrived.shape[0], experts_per_rank, alignment))
    metadata = DispatchMetadata(input_splits, output_splits, grouped.permuted_indices, arrived.shape[0])
    return grouped.rows, grouped.m_sizes, metadata


def combine_tokens(routed_output: torch.Tensor, metadata: DispatchMetadata, group: Any) -> torch.Tensor:
    """The inverse of :func:`dispatch_tokens`: back to arrival order, then back to the sending ranks."""
    arrived = ungroup_by_local_expert(routed_output, metadata.permuted_indices, metadata.num_arrived)
    return dfn.all_to_all_single(arrived, metadata.input_splits, metadata.output_splits, group)


# ---------------------------------------------------------------- the styles

_Dispatch = Callable[[nn.Module, tuple, Any], tuple[tuple, Any]]
_Combine = Callable[[nn.Module, Any, Any, Any], Any]


def _distribute_with_hooks(style: str, module: nn.Module, mesh: DeviceMesh, partition_fn: Optional[Callable],
                           dispatch: _Dispatch, combine: _Combine) -> nn.Module:
    """``distribute_module`` plus a pre-hook / forward-hook pair that hands each call's value to its own combine.

    ``dispatch(module, args, mesh) -> (args for the forward, value)``; ``combine(module, output, value, mesh)
    -> output``. torch calls forward hooks with the args the pre-hooks returned, so the value is filed under
    the forward's first argument (a tensor the dispatch made for this call) and found again from it: calls
    in flight together never see each other's value, and a call that raised leaves nothing behind (weak keys).
    """
    distribute_module(module, mesh, partition_fn)
    in_flight = WeakIdKeyDictionary()

    def pre_hook(hooked: nn.Module, args: tuple) -> tuple:
        args, value = dispatch(hooked, args, mesh)
        if args[0] in in_flight:  # each dispatch makes a new tensor: a repeat would overwrite a call's value
            raise RuntimeError(f"{style}: internal error: the dispatch returned a tensor already in flight")
        in_flight[args[0]] = (value,)  # boxed, so a value of None is told apart from a missing entry
        return args

    def forward_hook(hooked: nn.Module, args: tuple, output: Any) -> Any:
        key = args[0] if args else None
        entry = in_flight.pop(key, None) if isinstance(key, torch.Tensor) else None
        if entry is None:
            raise RuntimeError(
                f"{style}: the forward hook found no pre-hook dispatch for this call: the forward's first "
                f"argument is not the tensor the {style} pre-hook returned (a pre-hook registered after the "
                f"style replaced it, or the forward was called without the pre-hook)")
        return combine(hooked, output, entry[0], mesh)

    module.register_forward_pre_hook(pre_hook)
    module.register_forward_hook(forward_hook)
    return module


def _global_experts(module: nn.Module) -> Optional[int]:
    """E over the whole EP group: dim 0 of the (DTensor, global-shaped) ``w1``, else ``num_experts``."""
    weight = getattr(module, "w1", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 3:
        return int(weight.shape[0])
    experts = getattr(module, "num_experts", None)
    return experts if isinstance(experts, int) else None


def _hidden_size(module: nn.Module) -> Optional[int]:
    """D of the rows the experts take (dim 2 of ``w1 [E, hidden, D]``), or None if the module has no w1."""
    weight = getattr(module, "w1", None)
    return int(weight.shape[2]) if isinstance(weight, torch.Tensor) and weight.dim() == 3 else None


def _check_mesh(style: str, mesh: DeviceMesh, ndim: int) -> None:
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != ndim:
        raise ArgumentError(f"{style}: needs a {ndim}-D DeviceMesh, got "
                            f"{getattr(mesh, 'ndim', type(mesh).__name__)}-D")


def _check_alignment(alignment: Any) -> int:
    return check_int("alignment", alignment, minimum=1)


class TensorParallel(ParallelStyle):
    """Column / row sharding of :class:`GroupedExperts` over a 1-D mesh.

    w1, w3 ``Shard(1)`` (hidden columns), w2 ``Shard(2)`` (hidden rows). The input
    (replicated over the mesh) gets the sum of the ranks' partial gradients in backward.
    ``reduce_output=True`` all-reduces the partial outputs, so the module's output equals
    the unsharded module's on every rank; ``False`` returns this rank's partial sum (the
    seed's behaviour, for callers that reduce later, e.g. together with a combine).
    """

    def __init__(self, *, reduce_output: bool = True) -> None:
        super().__init__()
        self.reduce_output = check_bool("reduce_output", reduce_output)

    @staticmethod
    def _partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:
            return
        module.register_parameter("w1", nn.Parameter(distribute_tensor(module.w1, mesh, [Shard(1)])))
        module.register_parameter("w2", nn.Parameter(distribute_tensor(module.w2, mesh, [Shard(2)])))
        module.register_parameter("w3", nn.Parameter(distribute_tensor(module.w3, mesh, [Shard(1)])))

    def _prepare_input(self, module, inputs, mesh):
        routed_input, num_tokens_per_expert = inputs
        return dfn.copy_to_group(routed_input, mesh.get_group()), num_tokens_per_expert

    def _prepare_output(self, module, output, mesh):
        return dfn.all_reduce(output, mesh.get_group()) if self.reduce_output else output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_mesh("TensorParallel", device_mesh, 1)
        return distribute_module(module, device_mesh, self._partition, self._prepare_input,
                                 self._prepare_output)


class ExpertParallel(ParallelStyle):
    """Experts sharded on dim 0 over a 1-D mesh, tokens moved by all-to-all.

    The wrapped module is called as ``module(routed_input [N, D], num_tokens_per_expert [E])``
    with rows sorted by global expert; each rank computes its ``E / ep`` experts on the rows
    every rank sent them (regrouped by local expert, blocks padded to ``alignment`` rows, the
    padded counts passed on), and the output comes back in the caller's row order.
    """

    def __init__(self, *, alignment: int = 1) -> None:
        super().__init__()
        self.alignment = _check_alignment(alignment)

    @staticmethod
    def _partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(param_name, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))

    def _dispatch(self, module, inputs, mesh) -> tuple[tuple, DispatchMetadata]:
        routed_input, num_tokens_per_expert = inputs
        rows, counts, metadata = dispatch_tokens(routed_input, num_tokens_per_expert, mesh.get_group(),
                                                 self.alignment, num_experts=_global_experts(module),
                                                 hidden_size=_hidden_size(module))
        return (rows, counts), metadata

    def _combine(self, module, routed_output, metadata: DispatchMetadata, mesh):
        return combine_tokens(routed_output, metadata, mesh.get_group())

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_mesh("ExpertParallel", device_mesh, 1)
        return _distribute_with_hooks("ExpertParallel", module, device_mesh, self._partition, self._dispatch,
                                      self._combine)


class ExpertTensorParallel(ExpertParallel):
    """:class:`ExpertParallel` over mesh dim ``ep`` and :class:`TensorParallel` over ``tp``, on a 2-D mesh.

    The mesh's dims are taken in order ``[ep, tp]`` (names are not required). Parameters:
    w1, w3 ``[Shard(0), Shard(1)]``, w2 ``[Shard(0), Shard(2)]``. The input is replicated
    over ``tp`` (gradient summed over it); dispatch and combine run over ``ep``; with
    ``reduce_output`` the partial outputs are all-reduced over ``tp`` after the combine.
    """

    def __init__(self, *, alignment: int = 1, reduce_output: bool = True) -> None:
        super().__init__(alignment=alignment)
        self.reduce_output = check_bool("reduce_output", reduce_output)

    @staticmethod
    def _partition_2d(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:
            return
        module.register_parameter("w1", nn.Parameter(distribute_tensor(module.w1, mesh, [Shard(0), Shard(1)])))
        module.register_parameter("w2", nn.Parameter(distribute_tensor(module.w2, mesh, [Shard(0), Shard(2)])))
        module.register_parameter("w3", nn.Parameter(distribute_tensor(module.w3, mesh, [Shard(0), Shard(1)])))

    def _dispatch(self, module, inputs, mesh) -> tuple[tuple, DispatchMetadata]:
        routed_input, num_tokens_per_expert = inputs
        routed_input = dfn.copy_to_group(routed_input, mesh.get_group(1))
        return super()._dispatch(module, (routed_input, num_tokens_per_expert), _Sub(mesh, 0))

    def _combine(self, module, routed_output, metadata: DispatchMetadata, mesh):
        out = super()._combine(module, routed_output, metadata, _Sub(mesh, 0))
        return dfn.all_reduce(out, mesh.get_group(1)) if self.reduce_output else out

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_mesh("ExpertTensorParallel", device_mesh, 2)
        return _distribute_with_hooks("ExpertTensorParallel", module, device_mesh, self._partition_2d,
                                      self._dispatch, self._combine)


class _Sub:
    """One dim of a mesh, seen through the ``get_group()`` the 1-D code paths call."""

    def __init__(self, mesh: DeviceMesh, dim: int) -> None:
        self._mesh, self._dim = mesh, dim

    def get_group(self):
        return self._mesh.get_group(self._dim)


def token_share(num_tokens: int, size: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of rank's contiguous share; sizes differ by at most one (torch.tensor_split's rule)."""
    base, extra = divmod(num_tokens, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ReordererSequenceParallel(ParallelStyle):
    """Each rank of a 1-D mesh reorders its contiguous share of the tokens (:class:`TokenReorderer`).

    Input ``(top_scores [T, K], selected_experts_indices [T, K])``, identical on every rank;
    rank ``r`` keeps tokens ``[start_r, end_r)`` (shares differ by at most one token when
    ``T`` does not divide) and its output token indices are offset by ``start_r``, so they
    index the full ``[T, D]`` hidden states. The scores' gradient flows back to the rows
    this rank kept (the other ranks own the rest).
    """

    def _prepare_input(self, module, inputs, mesh) -> tuple[tuple, int]:
        top_scores, selected = inputs
        start, end = token_share(selected.shape[0], mesh.size(), mesh.get_local_rank())
        return (top_scores[start:end], selected[start:end]), start

    def _prepare_output(self, module, outputs, start: int, mesh):
        scores, token_indices, counts = outputs
        return scores, token_indices + start, counts

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_mesh("ReordererSequenceParallel", device_mesh, 1)
        if not hasattr(module, "top_k"):
            raise ArgumentError("ReordererSequenceParallel: the module must have a top_k attribute "
                                "(a TokenReorderer), got " + type(module).__name__)
        return _distribute_with_hooks("ReordererSequenceParallel", module, device_mesh, None,
                                      self._prepare_input, self._prepare_output)
