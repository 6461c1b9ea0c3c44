"""The expert-parallel MoE layer: router -> top-k -> comm method -> experts (+ shared experts) -> back."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moe_ext.errors import ArgumentError, check_bool, check_int
from moe_ext.moe import weights as _weights
from moe_ext.moe.comm.base import MoECommMethod
from moe_ext.moe.config import MoEConfig
from moe_ext.moe.context import ForwardContext, checked_forward_context
from moe_ext.moe.experts import ExpertActivation, run_local_experts
from moe_ext.moe.select import COMM_METHODS, FORCE_ENV, make_comm_method, select_comm_method
from moe_ext.moe.topk import check_routing_options, select_experts

__all__ = ["MoELayer", "load_recording_disabled", "logical_to_physical_table"]


def _as_placement(physical_to_logical: Any, num_slots: int, num_experts: int, caller: str) -> torch.Tensor:
    """A checked int64 CPU copy of a placement (logical expert of each physical slot)."""
    if isinstance(physical_to_logical, torch.Tensor):
        if physical_to_logical.dtype.is_floating_point or physical_to_logical.dtype == torch.bool \
                or physical_to_logical.is_complex():
            raise TypeError(f"{caller}: placement must be an integer tensor, got {physical_to_logical.dtype}")
        placement = physical_to_logical.detach().to("cpu", torch.int64).clone()
    else:
        try:
            placement = torch.as_tensor(physical_to_logical)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{caller}: placement must be a tensor or a list of ints, got "
                            f"{type(physical_to_logical).__name__}") from error
        if placement.dtype.is_floating_point or placement.dtype == torch.bool:
            raise TypeError(f"{caller}: placement must hold ints, got {placement.dtype}")
        placement = placement.to(torch.int64)
    if tuple(placement.shape) != (num_slots,):
        raise ArgumentError(f"{caller}: placement must have shape ({num_slots},) (one logical expert per physical "
                            f"slot), got {tuple(placement.shape)}")
    logical_to_physical_table(placement, num_experts, caller=caller)  # range and coverage checks
    return placement


def logical_to_physical_table(physical_to_logical: torch.Tensor, num_experts: int, *, caller: str = "placement"):
    """From a placement (logical expert of each physical slot) to ``(table [E, R] padded with -1, replicas [E])``.

    Raises ArgumentError when a slot holds an id outside ``[0, num_experts)`` or
    a logical expert has no slot.
    """
    physical_to_logical = physical_to_logical.to(torch.int64).cpu()
    if physical_to_logical.numel() and (int(physical_to_logical.min()) < 0
                                        or int(physical_to_logical.max()) >= num_experts):
        bad = physical_to_logical[(physical_to_logical < 0) | (physical_to_logical >= num_experts)]
        raise ArgumentError(f"{caller}: every slot must hold a logical expert in [0, {num_experts}), got "
                            f"{bad[:8].tolist()}")
    replicas = torch.bincount(physical_to_logical, minlength=num_experts)
    if int(replicas.min()) == 0:
        missing = torch.nonzero(replicas == 0).flatten().tolist()
        raise ArgumentError(f"{caller}: every logical expert needs a slot; missing {missing[:8]}")
    table = torch.full((num_experts, int(replicas.max())), -1, dtype=torch.int64)
    filled = [0] * num_experts
    for slot, expert in enumerate(physical_to_logical.tolist()):
        table[expert, filled[expert]] = slot
        filled[expert] += 1
    return table, replicas


@contextlib.contextmanager
def load_recording_disabled(module: nn.Module) -> Iterator[None]:
    """Within the block, the MoE layers in ``module`` (or ``module`` itself) hand no loads to their recorder.

    For forwards that are not traffic: warm-up, profiling, CUDA-graph capture,
    dummy batches of idle DP ranks. ``last_expert_load`` is still updated.
    """
    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    saved = [layer.record_load for layer in layers]
    for layer in layers:
        layer.record_load = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.record_load = value


#: the token dtypes torch_npu's MC2 dispatch / combine take
_MC2_DTYPES = (torch.bfloat16, torch.float16)


def _float_arg(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    return float(value)


class MoELayer(nn.Module):
    """A routed-experts MoE block with expert parallelism, optional shared experts.

    Parameters (``config.dtype`` unless said):

    - router: ``gate_weight`` [E, H] (``config.router_dtype``), ``gate_bias``
      [E] with ``router_bias`` (GPT-OSS), ``correction_bias`` [E] fp32 with
      ``use_correction_bias`` (DeepSeek-V3 ``e_score_correction_bias``: the
      choice only, not trained by backward);
    - this rank's expert slots: ``w13`` [L, H, 2I] (gate/up in
      ``gate_up_layout``), ``w2`` [L, I, H], and with ``expert_bias``
      ``w13_bias`` [L, 2I], ``w2_bias`` [L, H];
    - shared experts (with ``num_shared_experts`` > 0 or
      ``shared_intermediate_size``): one gated MLP of intermediate size
      ``S = shared_intermediate_size or num_shared_experts * I`` (the shared
      experts of DeepSeek-V3 are one MLP that wide) ``shared_w13`` [H, 2S]
      (concatenated), ``shared_w2`` [S, H], and with ``shared_expert_gate``
      ``shared_gate_weight`` [1, H]: the shared output is scaled by
      ``sigmoid(x @ shared_gate_weight.T)`` (Qwen2-MoE). Replicated on every
      rank, run on each rank's own tokens: their gradients need the usual
      data-parallel all-reduce, like any replicated parameter.

    Routing options are named as in the model configs (see
    :mod:`moe_ext.moe.topk` and docs/moe_layer.md for each family's values):
    ``scoring``, ``renormalize``, ``num_expert_group``, ``topk_group``,
    ``group_score``, ``use_correction_bias``, ``routed_scaling_factor``,
    ``router_bias``. ``apply_router_weight_on_input`` (Llama 4; needs
    ``top_k == 1``): each token is scaled by its routing weight before the
    experts and the expert outputs are combined unweighted.

    Expert MLP: ``activation`` ("silu", "gelu", "gelu_tanh", "relu",
    "swigluoai", or a Hugging Face ``hidden_act`` alias), ``gate_up_layout``
    ("concatenated" or "interleaved"), ``swiglu_alpha`` / ``swiglu_limit``
    ("swigluoai" only), ``expert_bias``.

    ``placement``: the logical expert of each physical slot (EPLB's
    phy2log), default identity; change it with :meth:`set_placement`. It is
    saved in the state_dict (see :meth:`load_state_dict` behaviour in
    docs/moe_layer.md). A token's choice of logical expert ``e`` goes to
    replica ``t % replicas[e]`` of ``e`` (``t`` its index in the local batch):
    deterministic, and spreading the tokens of a batch over replicas.

    ``comm_method``: "auto" (decided per forward by
    :func:`select_comm_method`), a method name, or an instance.

    ``load_recorder``: a ``moe_ext.eplb.LoadRecorder`` (its ``record_layer``)
    or a callable, called each forward as ``(layer_index, tokens_per_expert)``
    with int64 [num_experts] counts of this rank's real tokens per *logical*
    expert (identical on the ranks of one TP group; the sum over the DP group is
    the global load). Logical counts do not depend on the placement, so a
    window that spans a :meth:`set_placement` stays meaningful. Forwards run
    under :func:`load_recording_disabled` (or with ``record_load = False``) are
    not handed to the recorder. ``last_expert_load`` [E] and
    ``last_slot_load`` [num_physical_experts] keep the last forward's counts.
    """

    def __init__(self, config: MoEConfig, *, scoring: str = "softmax", renormalize: bool = True,
                 num_expert_group: Optional[int] = None, topk_group: Optional[int] = None,
                 group_score: Optional[str] = None, use_correction_bias: bool = False,
                 routed_scaling_factor: float = 1.0, router_bias: bool = False,
                 apply_router_weight_on_input: bool = False,
                 activation: str = "silu", gate_up_layout: str = "concatenated", swiglu_alpha: float = 1.702,
                 swiglu_limit: float = 7.0, expert_bias: bool = False,
                 num_shared_experts: int = 0, shared_intermediate_size: Optional[int] = None,
                 shared_expert_gate: bool = False,
                 comm_method: Any = "auto", npu=None, placement: Optional[torch.Tensor] = None,
                 load_recorder: Optional[Callable[[int, torch.Tensor], None]] = None, layer_index: int = 0,
                 reduce_results: bool = True, expert_backend: Optional[str] = None,
                 device: Optional[torch.device | str] = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer: config must be a MoEConfig, got {type(config).__name__}")
        check_int("MoELayer: config.intermediate_size", config.intermediate_size, minimum=1)
        routed_scaling_factor = _float_arg("MoELayer: routed_scaling_factor", routed_scaling_factor)
        check_routing_options(config.num_experts, config.top_k, scoring=scoring, renormalize=renormalize,
                              num_expert_group=num_expert_group, topk_group=topk_group, group_score=group_score,
                              routed_scaling_factor=routed_scaling_factor, caller="MoELayer")
        for name, flag in (("use_correction_bias", use_correction_bias), ("router_bias", router_bias),
                           ("apply_router_weight_on_input", apply_router_weight_on_input),
                           ("expert_bias", expert_bias), ("shared_expert_gate", shared_expert_gate),
                           ("reduce_results", reduce_results)):
            check_bool(f"MoELayer: {name}", flag)
        if apply_router_weight_on_input and config.top_k != 1:
            raise ArgumentError(f"MoELayer: apply_router_weight_on_input needs top_k == 1 (one weight per token to "
                                f"scale its input by), got top_k={config.top_k}")
        self.config = config
        self.scoring, self.renormalize = scoring, renormalize
        self.num_expert_group, self.topk_group, self.group_score = num_expert_group, topk_group, group_score
        self.routed_scaling_factor = routed_scaling_factor
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.activation = ExpertActivation(activation, gate_up_layout, _float_arg("swiglu_alpha", swiglu_alpha),
                                           _float_arg("swiglu_limit", swiglu_limit))
        # The shared experts are stored by this layer, always [gate | up].
        self.shared_activation = dataclasses.replace(self.activation, gate_up_layout="concatenated")
        self.npu = npu
        self.load_recorder = load_recorder
        self.record_load = True
        self.layer_index = check_int("MoELayer: layer_index", layer_index, minimum=0)
        self.reduce_results = reduce_results
        self.expert_backend = expert_backend
        self.last_expert_load: Optional[torch.Tensor] = None
        self.last_slot_load: Optional[torch.Tensor] = None
        self.last_comm_method: Optional[str] = None
        hidden, inter, local = config.hidden_size, config.intermediate_size, config.num_local_experts
        dtype = config.dtype
        self.gate_weight = nn.Parameter(torch.empty(config.num_experts, hidden, dtype=config.router_dtype,
                                                    device=device))
        self.gate_bias = (nn.Parameter(torch.zeros(config.num_experts, dtype=config.router_dtype, device=device))
                          if router_bias else None)
        self.correction_bias = (nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32, device=device),
                                             requires_grad=False) if use_correction_bias else None)
        self.w13 = nn.Parameter(torch.empty(local, hidden, 2 * inter, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(local, inter, hidden, dtype=dtype, device=device))
        self.w13_bias = nn.Parameter(torch.zeros(local, 2 * inter, dtype=dtype, device=device)) if expert_bias \
            else None
        self.w2_bias = nn.Parameter(torch.zeros(local, hidden, dtype=dtype, device=device)) if expert_bias else None

        num_shared_experts = check_int("MoELayer: num_shared_experts", num_shared_experts, minimum=0)
        if shared_intermediate_size is not None:
            shared_intermediate_size = check_int("MoELayer: shared_intermediate_size", shared_intermediate_size,
                                                 minimum=1)
        elif num_shared_experts:
            shared_intermediate_size = num_shared_experts * inter
        self.shared_intermediate_size = shared_intermediate_size or 0
        if shared_expert_gate and not self.shared_intermediate_size:
            raise ArgumentError("MoELayer: shared_expert_gate needs shared experts (num_shared_experts > 0 or "
                                "shared_intermediate_size), got neither")
        if self.shared_intermediate_size:
            size = self.shared_intermediate_size
            self.shared_w13 = nn.Parameter(torch.empty(hidden, 2 * size, dtype=dtype, device=device))
            self.shared_w2 = nn.Parameter(torch.empty(size, hidden, dtype=dtype, device=device))
        else:
            self.shared_w13 = self.shared_w2 = None
        self.shared_gate_weight = (nn.Parameter(torch.empty(1, hidden, dtype=dtype, device=device))
                                   if shared_expert_gate else None)

        if placement is None:
            if config.num_physical_experts != config.num_experts:
                raise ArgumentError(f"MoELayer: a placement is needed when num_physical_experts "
                                    f"({config.num_physical_experts}) != num_experts ({config.num_experts})")
            placement = torch.arange(config.num_experts)
        placement = _as_placement(placement, config.num_physical_experts, config.num_experts, "MoELayer")
        first, last = config.local_expert_range
        # Persistent: a state_dict records which logical expert each saved row holds (see _load_from_state_dict).
        self.register_buffer("placement", placement.to(device))
        self.register_buffer("local_slots", torch.arange(first, last, dtype=torch.int64, device=device))
        self.register_buffer("logical_to_physical", torch.empty(0, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("replica_count", torch.empty(0, dtype=torch.int64, device=device), persistent=False)
        self._apply_placement(placement)
        # What has been written (see weights.missing_weights): the parameters start as uninitialised memory, and
        # a forward over them is refused rather than returning whatever that memory holds (often zeros).
        self._loaded_parts: dict[Any, set[str]] = {}
        self._param_versions = _weights.parameter_versions(self)
        self._weights_ready = False
        self._fixed_comm: Optional[MoECommMethod] = None
        self._comm_cache: dict[str, MoECommMethod] = {}
        fixed_name = comm_method.name if isinstance(comm_method, MoECommMethod) else comm_method
        if fixed_name == "mc2" and config.dtype not in _MC2_DTYPES:
            raise ArgumentError(f"MoELayer: comm_method 'mc2' moves float16 / bfloat16 tokens (torch_npu's "
                                f"npu_moe_distribute_dispatch / combine), the layer's dtype is {config.dtype}: build "
                                f"it with MoEConfig(dtype=torch.bfloat16) or use comm_method='allgather'")
        if isinstance(comm_method, MoECommMethod):
            self._fixed_comm = comm_method
        elif comm_method != "auto":
            self._fixed_comm = make_comm_method(comm_method, config, npu)

    # ------------------------------------------------------------------ placement (EPLB)
    def _apply_placement(self, placement: torch.Tensor) -> None:
        table, replicas = logical_to_physical_table(placement, self.config.num_experts)
        device = self.w13.device
        self.placement = placement.to(device)
        self.logical_to_physical = table.to(device)
        self.replica_count = replicas.to(device)

    @property
    def local_logical_experts(self) -> torch.Tensor:
        """int64 [L]: the logical expert held by each of this rank's slots."""
        first, last = self.config.local_expert_range
        return self.placement[first:last]

    def expert_weights(self) -> list[torch.Tensor]:
        """This rank's per-slot expert tensors, each [L, ...]: what ``rearrange_expert_weights_inplace`` moves.

        ``[w13, w2]`` plus ``[w13_bias, w2_bias]`` with expert biases (the
        parameters' ``.data``: moved in place, autograd history untouched). Pass
        ``[layer.expert_weights() for layer in layers]`` as its ``expert_weights``.
        """
        tensors = [self.w13, self.w2] + ([self.w13_bias, self.w2_bias] if self.w13_bias is not None else [])
        return [tensor.data for tensor in tensors]

    def set_placement(self, physical_to_logical: Any, *, move_weights: bool = True, ep_group: Any = None,
                      **rearrange_options: Any) -> None:
        """Switch to the placement ``physical_to_logical`` (int [num_physical_experts], EPLB's phy2log).

        With ``move_weights`` (collective over the EP group: every rank calls it
        with the same placement), the expert rows move first, through
        :func:`moe_ext.eplb.rearrange_expert_weights_inplace` (``ep_group``:
        default the layer's EP group; ``rearrange_options`` are passed on), then
        the routing switches. Without it the caller has moved the rows already
        (e.g. all layers in one rearrange call) and only the routing switches.

        Atomic and agreed: the placement is checked (shape, ids, every expert
        placed) and, at EP > 1, compared across the EP group (one all-reduce of
        the placement and ``move_weights``, with either value of
        ``move_weights``: this call is collective) before anything changes. A
        placement refused on any rank, or different on some rank, raises on
        every rank with no weight moved and the old placement kept. At EP > 1
        moving weights needs every expert row of every rank loaded (a row moves
        without its loaded record). Raises TypeError / ArgumentError naming the
        problem.
        """
        config = self.config
        group = ep_group if ep_group is not None else (config.ep_group.process_group if config.ep_size > 1 else None)
        new, problem = None, None
        try:
            check_bool("MoELayer.set_placement: move_weights", move_weights)
            new = _as_placement(physical_to_logical, config.num_physical_experts, config.num_experts,
                                "MoELayer.set_placement")
            if move_weights and group is not None and not torch.equal(new, self.placement.cpu()):
                unloaded = [item for item in self.missing_weights(required_to_run=True) if item.startswith("expert")]
                if unloaded:
                    # Rows travel between ranks without their loaded/not-loaded record: load first.
                    raise ArgumentError(f"MoELayer.set_placement: this rank's expert rows are not all loaded "
                                        f"({unloaded[:4]}); load every expert before moving weights between ranks")
        except (TypeError, ArgumentError) as error:
            problem = error
        if group is not None:
            # Every rank of the group checks the others' placement and move_weights before anything moves.
            self._agree_on_placement(new, bool(move_weights) if problem is None else False, problem,
                                     getattr(group, "device_group", group))
        elif problem is not None:
            raise problem
        old = self.placement.cpu()
        if move_weights and not torch.equal(new, old):
            if config.ep_size == 1 and ep_group is None:
                # One rank holds every slot: a local gather, no process group needed.
                source_slot = self.logical_to_physical[:, 0].cpu()[new]
                with torch.no_grad():
                    for tensor in self.expert_weights():
                        tensor.copy_(tensor.index_select(0, source_slot.to(tensor.device)))
                _weights.note_direct_writes(self)
                parts = {row: set(self._loaded_parts.get(int(source), set()))
                         for row, source in enumerate(source_slot.tolist())}
                self._loaded_parts = {**{k: v for k, v in self._loaded_parts.items() if k == "layer"}, **parts}
            else:
                from moe_ext.eplb import rearrange_expert_weights_inplace
                rearrange_expert_weights_inplace(old.reshape(1, -1), new.reshape(1, -1), [self.expert_weights()],
                                                 ep_group=getattr(group, "device_group", group), **rearrange_options)
        self._apply_placement(new)

    def _agree_on_placement(self, new: Optional[torch.Tensor], move_weights: bool, problem: Optional[Exception],
                            group: Any) -> None:
        """One all-reduce (MAX) over ``group`` of (refused, move, -move, placement, -placement): every rank
        learns whether any rank refused or passed something else, and raises before anything changes."""
        slots = self.config.num_physical_experts
        device = self.w13.device if self.w13.device.type != "cpu" else torch.device("cpu")
        vector = torch.zeros(3 + 2 * slots, dtype=torch.int64)
        if problem is not None:
            vector[0] = 1
        else:
            vector[1], vector[2] = int(move_weights), -int(move_weights)
            vector[3:3 + slots], vector[3 + slots:] = new, -new
        vector = vector.to(device)
        dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=group)
        got = vector.cpu()
        if problem is not None:
            raise problem
        if int(got[0]):
            raise ArgumentError("MoELayer.set_placement: another rank of the EP group refused its placement (its "
                                "error names the problem); the placement is unchanged on every rank")
        if int(got[1]) != -int(got[2]):
            raise ArgumentError("MoELayer.set_placement: the ranks of the EP group disagree on move_weights; every "
                                "rank must pass the same value. The placement is unchanged on every rank")
        highest, lowest = got[3:3 + slots], -got[3 + slots:]
        differ = torch.nonzero(highest != lowest).flatten().tolist()
        if differ:
            raise ArgumentError(f"MoELayer.set_placement: the ranks of the EP group passed different placements: "
                                f"slots {differ[:8]} differ (this rank has {new[differ[:8]].tolist()}); every rank "
                                f"must pass the same phy2log. The placement is unchanged on every rank")

    @torch.no_grad()
    def sum_replica_gradients(self) -> None:
        """Give every replica of an expert the sum of its replicas' gradients (collective over the EP group).

        The replicas of an expert see different tokens, so their slots get
        different gradients; the expert's gradient is their sum. After this call
        every replica holds that sum, so an optimizer step keeps them identical.
        Call it after backward, before the step, on every EP rank. Only the
        replicated experts travel (one all-reduce per expert tensor of
        ``[replicated experts, ...]``). Experts with one slot are untouched.
        """
        replicated = torch.nonzero(self.replica_count.cpu() > 1).flatten()
        if replicated.numel() == 0:
            return
        index_of = torch.full((self.config.num_experts,), -1, dtype=torch.int64)
        index_of[replicated] = torch.arange(replicated.numel())
        rows_index = index_of[self.local_logical_experts.cpu()]
        local_rows = torch.nonzero(rows_index >= 0).flatten()
        tensors = [self.w13, self.w2] + ([self.w13_bias, self.w2_bias] if self.w13_bias is not None else [])
        for tensor in tensors:
            grad = tensor.grad
            if grad is None:
                grad = tensor.grad = torch.zeros_like(tensor)
            total = grad.new_zeros((replicated.numel(),) + tuple(grad.shape[1:]))
            rows = local_rows.to(grad.device)
            targets = rows_index[local_rows].to(grad.device)
            total.index_add_(0, targets, grad.index_select(0, rows))
            if self.config.ep_size > 1:
                dist.all_reduce(total, group=self.config.ep_group.process_group)
            grad.index_copy_(0, rows, total.index_select(0, targets))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Rows saved under another placement are re-mapped to this layer's placement, or the load refuses.

        A saved shard says which logical expert each of its rows holds
        (``placement`` and ``local_slots``). When every expert this rank's slots
        need is among them, the rows are gathered into this placement's order;
        otherwise the load fails with a message naming the missing experts (set
        the saved placement first: ``layer.set_placement(state_dict[prefix +
        'placement'], move_weights=False)``). A state_dict without a placement
        (older saves) is taken as saved under the current one.
        """
        placement_key, slots_key = prefix + "placement", prefix + "local_slots"
        if placement_key in state_dict:
            message = _weights.remap_saved_rows(self, state_dict, prefix)
            if message is not None:
                error_msgs.append(message)
                return
            state_dict[placement_key] = self.placement
            state_dict[slots_key] = self.local_slots
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_logical_weights(self, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                             correction_bias: Optional[torch.Tensor] = None) -> None:
        """Fill this rank's slots from every logical expert's weights in the layer's own layout.

        ``w13`` [E, H, 2I], ``w2`` [E, I, H]. For checkpoints (one expert at a
        time, Hugging Face layouts) see :meth:`weight_loader` and
        :mod:`moe_ext.moe.hf`.
        """
        _weights.note_direct_writes(self)
        logical = self.local_logical_experts.to(w13.device)
        self.gate_weight.copy_(gate_weight)
        self.w13.copy_(w13.index_select(0, logical))
        self.w2.copy_(w2.index_select(0, logical))
        for row in range(self.config.num_local_experts):
            self._loaded_parts.setdefault(row, set()).update(("gate", "up", "down"))
        self._loaded_parts.setdefault("layer", set()).add("router.weight")
        if correction_bias is not None:
            if self.correction_bias is None:
                raise ArgumentError("MoELayer.load_logical_weights: correction_bias given but the layer was built "
                                    "without use_correction_bias")
            self.correction_bias.copy_(correction_bias)
            self._loaded_parts["layer"].add("router.correction_bias")
        self._param_versions = _weights.parameter_versions(self)  # these writes are recorded above

    def weight_loader(self, name: str, tensor: Any, expert_id: Optional[int] = None, *, input_major: bool = False,
                      gate_up_layout: str = "concatenated") -> int:
        """Store one checkpoint tensor; returns the number of local rows it filled (0: not on this rank).

        See :func:`moe_ext.moe.weights.load_weight` for the names and layouts.
        """
        return _weights.load_weight(self, name, tensor, expert_id, input_major=input_major,
                                    gate_up_layout=gate_up_layout)

    def missing_weights(self, *, required_to_run: bool = False) -> list[str]:
        """What has not been written yet (expert rows of this rank, router, shared experts); see
        :func:`moe_ext.moe.weights.missing_weights`. A forward refuses while
        ``missing_weights(required_to_run=True)`` is not empty."""
        return _weights.missing_weights(self, required_to_run=required_to_run)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Random initialisation (training from scratch), consistent across ranks and replicas.

        Weights ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` as ``nn.Linear``; router,
        expert and shared biases and the correction bias zero. Each logical
        expert's weights come from its own generator seeded from ``seed`` and the
        expert id, the replicated tensors from ``seed`` alone: every replica of an
        expert and every rank (same ``seed``) get the same values, so the layer is
        one model whatever its placement.
        """
        seed = check_int("MoELayer.reset_parameters: seed", seed, minimum=0)

        def uniform(shape, fan_in, stream):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + stream)
            bound = fan_in ** -0.5
            return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound

        hidden, inter = self.config.hidden_size, self.config.intermediate_size
        self.gate_weight.data.copy_(uniform(self.gate_weight.shape, hidden, 0))
        for tensor in (self.gate_bias, self.correction_bias, self.w13_bias, self.w2_bias):
            if tensor is not None:
                tensor.data.zero_()
        if self.shared_w13 is not None:
            self.shared_w13.data.copy_(uniform(self.shared_w13.shape, hidden, 1))
            self.shared_w2.data.copy_(uniform(self.shared_w2.shape, self.shared_intermediate_size, 2))
        if self.shared_gate_weight is not None:
            self.shared_gate_weight.data.copy_(uniform(self.shared_gate_weight.shape, hidden, 3))
        for row, expert in enumerate(self.local_logical_experts.tolist()):
            self.w13.data[row].copy_(uniform(self.w13.shape[1:], hidden, 16 + 2 * expert))
            self.w2.data[row].copy_(uniform(self.w2.shape[1:], inter, 17 + 2 * expert))
        everything = {"gate", "up", "down", "gate_bias", "up_bias", "down_bias"}
        self._loaded_parts = {row: set(everything) for row in range(self.config.num_local_experts)}
        self._loaded_parts["layer"] = {"router.weight", "router.bias", "router.correction_bias", "shared.gate_proj",
                                       "shared.up_proj", "shared.down_proj", "shared.gate"}
        self._param_versions = _weights.parameter_versions(self)

    def export_expert_weights(self, *, grads: bool = False) -> dict[tuple[str, int], torch.Tensor]:
        """The local experts in checkpoint layout; see :func:`moe_ext.moe.weights.export_expert_weights`."""
        return _weights.export_expert_weights(self, grads=grads)

    # ------------------------------------------------------------------ forward
    def comm_method_for(self, max_tokens_across_dp: int) -> MoECommMethod:
        if self._fixed_comm is not None:
            return self._fixed_comm
        name = select_comm_method(self.config, max_tokens_across_dp, npu=self.npu)
        if name == "mc2" and self.config.dtype not in _MC2_DTYPES and not os.environ.get(FORCE_ENV):
            name = "allgather"  # MC2 takes 16-bit tokens only: the NPU's other path (same answer on every rank)
        if name not in self._comm_cache:
            self._comm_cache[name] = make_comm_method(name, self.config, self.npu)
        return self._comm_cache[name]

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """fp32 [T, E]: ``x @ gate_weight.T (+ gate_bias)`` in ``config.router_dtype``."""
        x = hidden_states.to(self.gate_weight.dtype)
        return F.linear(x, self.gate_weight, self.gate_bias)

    def select(self, hidden_states: torch.Tensor, router_logits: Optional[torch.Tensor] = None):
        """``(weights fp32 [T, K], logical expert ids int64 [T, K])`` from the router (or the given logits)."""
        if router_logits is None:
            router_logits = self.router_logits(hidden_states)
        weights, ids = select_experts(router_logits, self.config.top_k, scoring=self.scoring,
                                      renormalize=self.renormalize, num_expert_group=self.num_expert_group,
                                      topk_group=self.topk_group, group_score=self.group_score,
                                      correction_bias=self.correction_bias,
                                      routed_scaling_factor=self.routed_scaling_factor)
        return weights, ids.to(torch.int64)

    def logical_to_slots(self, logical: torch.Tensor) -> torch.Tensor:
        """int32 [T, K] physical slots for logical ids [T, K] (replica ``t % replicas[e]``)."""
        logical = logical.to(device=self.replica_count.device, dtype=torch.int64)
        token = torch.arange(logical.shape[0], device=logical.device).unsqueeze(1)
        replica = token % self.replica_count[logical]
        return self.logical_to_physical[logical, replica].to(torch.int32)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights fp32 [T, K], physical slot ids int32 [T, K])`` for this rank's tokens [T, H]."""
        weights, logical = self.select(hidden_states)
        return weights, self.logical_to_slots(logical)

    def _routing_problem(self, hidden_states, context, router_logits, topk_weights, topk_ids) -> Optional[Exception]:
        """The error this rank's routing arguments deserve (not raised: the forward's agreement raises it), or None."""
        hidden, num_experts, top_k = self.config.hidden_size, self.config.num_experts, self.config.top_k
        num_tokens = hidden_states.shape[0]
        if context is not None and context.num_tokens != num_tokens:
            return ArgumentError(f"MoELayer: context.num_tokens must equal the {num_tokens} tokens of hidden_states, "
                                 f"got {context.num_tokens}")
        if router_logits is not None and (topk_weights is not None or topk_ids is not None):
            return ArgumentError("MoELayer: pass router_logits or topk_weights + topk_ids, not both")
        if (topk_weights is None) != (topk_ids is None):
            return ArgumentError(f"MoELayer: topk_weights and topk_ids go together; got topk_weights "
                                 f"{'None' if topk_weights is None else 'given'}, topk_ids "
                                 f"{'None' if topk_ids is None else 'given'}")
        if router_logits is not None:
            if not isinstance(router_logits, torch.Tensor) or not router_logits.dtype.is_floating_point \
                    or tuple(router_logits.shape) != (num_tokens, num_experts):
                return ArgumentError(f"MoELayer: router_logits must be a float tensor [{num_tokens}, {num_experts}] "
                                     f"(tokens, logical experts), got {getattr(router_logits, 'dtype', None)} "
                                     f"{tuple(getattr(router_logits, 'shape', ()))}")
        if topk_ids is not None:
            for name, tensor, want_float in (("topk_weights", topk_weights, True), ("topk_ids", topk_ids, False)):
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (num_tokens, top_k) \
                        or tensor.dtype.is_floating_point != want_float or tensor.dtype == torch.bool:
                    kind = "float" if want_float else "integer"
                    return ArgumentError(f"MoELayer: {name} must be a {kind} tensor [{num_tokens}, {top_k}] (tokens, "
                                         f"top_k), got {getattr(tensor, 'dtype', type(tensor).__name__)} "
                                         f"{tuple(getattr(tensor, 'shape', ()))}")
            if topk_ids.numel():
                # One host read: an id outside the experts would otherwise index the placement tables out of range.
                low, high = (int(v) for v in torch.stack([topk_ids.min(), topk_ids.max()]).tolist())
                if low < 0 or high >= num_experts:
                    # -1 ("no expert", engines' padding) is taken by the routing ops, not by the layer: its
                    # placement lookup, load recorder and comm methods need a real expert per slot.
                    hint = (" (-1 padding is not taken by the layer: leave padded tokens out, or give their slots "
                            "any valid id with topk_weights 0)" if low == -1 else "")
                    return ArgumentError(f"MoELayer: topk_ids must be logical expert ids in [0, {num_experts}), got "
                                         f"values in [{low}, {high}]{hint}")
        return None

    def _weights_problem(self) -> Optional[Exception]:
        """An error while some part the forward needs was never written (a silently wrong output otherwise)."""
        if self._weights_ready:
            return None
        missing = self.missing_weights(required_to_run=True)
        if not missing:
            self._weights_ready = True
            return None
        experts = [item for item in missing if item.startswith("expert ")]
        others = [item for item in missing if not item.startswith("expert ")]
        listed = others + experts[:4] + ([f"... {len(experts) - 4} more expert rows"] if len(experts) > 4 else [])
        return ArgumentError(
            f"MoELayer: weights never loaded or initialised on this rank: {'; '.join(listed)}. Load them with "
            f"moe_ext.moe.hf.load_hf_moe_weights(layer, family, tensors, prefix=...) (check its report's missing / "
            f"ignored names, or use strict=True), layer.weight_loader(...), layer.load_logical_weights(...) or "
            f"load_state_dict; or initialise with layer.reset_parameters(seed)")

    def forward(self, hidden_states: torch.Tensor, context: Optional[ForwardContext] = None, *,
                router_logits: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                topk_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's tokens ``[..., H]`` -> the MoE output, same shape and dtype.

        Routing, by what is given: nothing — the layer's router and top-k;
        ``router_logits`` [T, E] (T = tokens, all leading dims flattened) — the
        top-k selection only (e.g. vLLM's ``FusedMoE.forward(hidden_states,
        router_logits)``); ``topk_weights`` float [T, K] + ``topk_ids`` int
        [T, K] *logical* expert ids — no routing (e.g. SGLang's ``topk_output``);
        the layer maps ids to physical slots through its placement either way.
        ``context``: see :func:`build_forward_context` (built here when None,
        one DP all-reduce). Collective over the EP group.
        """
        hidden = self.config.hidden_size
        shape, x = None, hidden_states
        if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() >= 1 and hidden_states.shape[-1] == hidden:
            shape, x = hidden_states.shape, hidden_states.reshape(-1, hidden)
        # hidden_states, the routing arguments and the layer's own weights: a problem found on this rank rides in
        # the context's all-reduce, so that every rank of the EP group raises instead of waiting in a collective.
        problem = None
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == hidden:
            problem = self._routing_problem(x, context, router_logits, topk_weights, topk_ids) \
                or self._weights_problem()
        context = checked_forward_context("MoELayer", self.config, x, dtype=self.w13.dtype, device=self.w13.device,
                                          comm_method=self._comm_method_label(), methods=("auto",) + COMM_METHODS,
                                          context=context, problem=problem)
        if topk_ids is not None:
            weights, logical = topk_weights.float(), topk_ids.to(torch.int64)
        else:
            weights, logical = self.select(x, router_logits)
        slots = self.logical_to_slots(logical)
        self._record_load(logical, slots)
        expert_input = x
        if self.apply_router_weight_on_input:
            expert_input = x * weights.to(x.dtype)  # top_k == 1: one weight per token
            weights = torch.ones_like(weights)
        comm = self.comm_method_for(context.max_tokens_across_dp)
        self.last_comm_method = comm.name
        routed, dispatched = comm.dispatch(expert_input, slots, weights, context)
        # The shared experts run while the dispatched rows are in flight where the comm method is asynchronous.
        shared = self._shared_experts(x)
        expert_output = run_local_experts(routed, self.w13, self.w2, npu=self.npu, backend=self.expert_backend,
                                          activation=self.activation, w13_bias=self.w13_bias, w2_bias=self.w2_bias)
        output = comm.combine(expert_output, dispatched, self.reduce_results)
        if shared is not None and (self.reduce_results or self.config.tp_size == 1 or self.config.tp_rank == 0):
            # Without the TP all-reduce the output is a partial sum over TP: add the shared part once.
            output = output + shared
        return output.reshape(shape)

    def _shared_experts(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.shared_w13 is None:
            return None
        out = self.shared_activation(x @ self.shared_w13) @ self.shared_w2
        if self.shared_gate_weight is not None:
            out = torch.sigmoid(F.linear(x, self.shared_gate_weight)) * out
        return out

    def _comm_method_label(self) -> str:
        """The method as every rank must agree on it: fixed, forced by the environment, or "auto"."""
        if self._fixed_comm is not None:
            return self._fixed_comm.name
        return os.environ.get(FORCE_ENV) or "auto"

    def _record_load(self, logical: torch.Tensor, slots: torch.Tensor) -> None:
        with torch.no_grad():
            flat = logical.reshape(-1)
            expert_load = torch.zeros(self.config.num_experts, dtype=torch.int64, device=flat.device)
            expert_load.scatter_add_(0, flat, torch.ones_like(flat))
            slot_flat = slots.reshape(-1).to(torch.int64)
            slot_load = torch.zeros(self.config.num_physical_experts, dtype=torch.int64, device=flat.device)
            slot_load.scatter_add_(0, slot_flat, torch.ones_like(slot_flat))
        self.last_expert_load, self.last_slot_load = expert_load, slot_load
        if self.load_recorder is not None and self.record_load:
            record = getattr(self.load_recorder, "record_layer", self.load_recorder)  # eplb.LoadRecorder or a callable
            record(self.layer_index, expert_load)
