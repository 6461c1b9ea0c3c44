"""Checkpoint-layout weight loading and export for :class:`moe_ext.moe.MoELayer`, local only.

A checkpoint stores each expert as its own tensors (or all experts of a layer
in one [E, ...] tensor); a rank of an expert-parallel layer holds a few slots.
:func:`load_weight` takes one checkpoint tensor and writes it only into the
slots of this rank that hold that expert (every replica), so loading never
materialises the experts of other ranks: with an all-experts tensor only the
local experts' rows are read (a ``safetensors`` slice from ``get_slice`` reads
just those). :mod:`moe_ext.moe.hf` maps Hugging Face names onto these.

Names (``name`` argument), layouts ("output-major" = ``nn.Linear.weight``
``[out, in]``, the default; ``input_major=True`` for ``[in, out]``):

| name | one expert (``expert_id``) | all experts (``expert_id=None``) |
| --- | --- | --- |
| ``experts.gate_proj`` / ``experts.up_proj`` | [I, H] | [E, I, H] |
| ``experts.gate_up_proj`` (``gate_up_layout``) | [2I, H] | [E, 2I, H] |
| ``experts.down_proj`` | [H, I] | [E, H, I] |
| ``experts.gate_proj_bias`` / ``experts.up_proj_bias`` | [I] | [E, I] |
| ``experts.gate_up_proj_bias`` / ``experts.down_proj_bias`` | [2I] / [H] | [E, 2I] / [E, H] |
| ``router.weight`` / ``router.bias`` / ``router.correction_bias`` | - | [E, H] / [E] / [E] |
| ``shared.gate_proj`` / ``shared.up_proj`` / ``shared.down_proj`` | - | [S, H] / [S, H] / [H, S] |
| ``shared.gate_up_proj`` / ``shared.gate`` | - | [2S, H] / [1, H] |

(with ``input_major`` every 2-D block is transposed: e.g. ``experts.down_proj`` [I, H].)
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from moe_ext.errors import ArgumentError, check_bool, check_choice, check_int
from moe_ext.moe.experts import GATE_UP_LAYOUTS

__all__ = ["EXPERT_NAMES", "LAYER_NAMES", "export_expert_weights", "load_weight", "missing_parts",
           "missing_weights", "note_direct_writes", "parameter_versions", "remap_saved_rows"]

EXPERT_NAMES = ("experts.gate_proj", "experts.up_proj", "experts.gate_up_proj", "experts.down_proj",
                "experts.gate_proj_bias", "experts.up_proj_bias", "experts.gate_up_proj_bias",
                "experts.down_proj_bias")
LAYER_NAMES = ("router.weight", "router.bias", "router.correction_bias", "shared.gate_proj", "shared.up_proj",
               "shared.gate_up_proj", "shared.down_proj", "shared.gate")
_EXPERT_PARAMS = ("w13", "w2", "w13_bias", "w2_bias")


def _shape(tensor: Any) -> tuple:
    if isinstance(tensor, torch.Tensor):
        return tuple(tensor.shape)
    if hasattr(tensor, "get_shape"):  # safetensors slice
        return tuple(tensor.get_shape())
    raise TypeError(f"weight_loader: tensor must be a torch.Tensor or a safetensors slice, got "
                    f"{type(tensor).__name__}")


def _fetch(tensor: Any, index: Optional[int] = None) -> torch.Tensor:
    """The tensor (or its ``index``-th block); a safetensors slice reads only that block."""
    if isinstance(tensor, torch.Tensor):
        return tensor if index is None else tensor[index]
    return tensor[index] if index is not None else tensor[:]


def _columns(layout: str, size: int, part: str, device) -> torch.Tensor:
    """Indices of the gate or up half within a [2 * size] gate/up axis of ``layout``."""
    if layout == "interleaved":
        start = 0 if part == "gate" else 1
        return torch.arange(start, 2 * size, 2, device=device)
    start = 0 if part == "gate" else size
    return torch.arange(start, start + size, device=device)


def _split_gate_up(value: torch.Tensor, layout: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = value.shape[dim] // 2
    return (value.index_select(dim, _columns(layout, size, "gate", value.device)),
            value.index_select(dim, _columns(layout, size, "up", value.device)))


def _check_shape(name: str, value_shape: tuple, expected: tuple) -> None:
    if tuple(value_shape) != tuple(expected):
        raise ArgumentError(f"weight_loader: {name} must have shape {list(expected)}, got {list(value_shape)}")


def _matrix(name: str, value: torch.Tensor, out_features: int, in_features: int, input_major: bool) -> torch.Tensor:
    """A checkpoint matrix as [in, out] (the layer's input-major storage)."""
    expected = (in_features, out_features) if input_major else (out_features, in_features)
    _check_shape(name + (" (input-major)" if input_major else " (output-major, as nn.Linear)"), value.shape,
                 expected)
    return value if input_major else value.t()


def _store_expert_part(layer, short: str, value: torch.Tensor, rows: list[int], input_major: bool,
                       source_layout: str) -> None:
    """Write one expert's tensor ``value`` into the local rows ``rows`` (all replicas of that expert)."""
    hidden, inter = layer.config.hidden_size, layer.config.intermediate_size
    own = layer.activation.gate_up_layout
    name = "experts." + short
    parts: list[str] = []
    with torch.no_grad():
        if short in ("gate_proj", "up_proj", "gate_up_proj"):
            if short == "gate_up_proj":
                gate, up = _split_gate_up(_matrix(name, value, 2 * inter, hidden, input_major), source_layout, 1)
                pieces = [("gate", gate), ("up", up)]
            else:
                pieces = [(short[:-5], _matrix(name, value, inter, hidden, input_major))]
            for part, piece in pieces:
                columns = _columns(own, inter, part, layer.w13.device)
                for row in rows:
                    layer.w13.data[row].index_copy_(1, columns, piece.to(layer.w13.device, layer.w13.dtype))
                parts.append(part)
        elif short == "down_proj":
            piece = _matrix(name, value, hidden, inter, input_major)
            for row in rows:
                layer.w2.data[row].copy_(piece)
            parts.append("down")
        else:
            if layer.w13_bias is None:
                raise ArgumentError(f"weight_loader: {name} given but the layer was built without expert_bias")
            if short == "down_proj_bias":
                _check_shape(name, value.shape, (hidden,))
                for row in rows:
                    layer.w2_bias.data[row].copy_(value)
                parts.append("down_bias")
            else:
                if short == "gate_up_proj_bias":
                    _check_shape(name, value.shape, (2 * inter,))
                    gate, up = _split_gate_up(value, source_layout, 0)
                    pieces = [("gate", gate), ("up", up)]
                else:
                    _check_shape(name, value.shape, (inter,))
                    pieces = [(short[:-10], value)]
                for part, piece in pieces:
                    columns = _columns(own, inter, part, layer.w13_bias.device)
                    for row in rows:
                        layer.w13_bias.data[row].index_copy_(0, columns, piece.to(layer.w13_bias.device,
                                                                                   layer.w13_bias.dtype))
                    parts.append(part + "_bias")
    for row in rows:
        layer._loaded_parts.setdefault(row, set()).update(parts)


def _load_layer_tensor(layer, name: str, tensor: Any, input_major: bool, source_layout: str) -> int:
    hidden, num_experts = layer.config.hidden_size, layer.config.num_experts
    value = _fetch(tensor)
    with torch.no_grad():
        if name == "router.weight":
            layer.gate_weight.data.copy_(_matrix(name, value, num_experts, hidden, input_major).t())
        elif name in ("router.bias", "router.correction_bias"):
            target = layer.gate_bias if name == "router.bias" else layer.correction_bias
            if target is None:
                flag = "router_bias" if name == "router.bias" else "use_correction_bias"
                raise ArgumentError(f"weight_loader: {name} given but the layer was built without {flag}")
            _check_shape(name, value.shape, (num_experts,))
            target.data.copy_(value)
        elif name == "shared.gate":
            if layer.shared_gate_weight is None:
                raise ArgumentError("weight_loader: shared.gate given but the layer was built without "
                                    "shared_expert_gate")
            layer.shared_gate_weight.data.copy_(_matrix(name, value, 1, hidden, input_major).t())
        else:
            if layer.shared_w13 is None:
                raise ArgumentError(f"weight_loader: {name} given but the layer has no shared experts "
                                    f"(num_shared_experts / shared_intermediate_size)")
            size = layer.shared_intermediate_size
            if name == "shared.down_proj":
                layer.shared_w2.data.copy_(_matrix(name, value, hidden, size, input_major))
            else:
                if name == "shared.gate_up_proj":
                    gate, up = _split_gate_up(_matrix(name, value, 2 * size, hidden, input_major), source_layout, 1)
                    pieces = [("gate", gate), ("up", up)]
                else:
                    pieces = [(name[len("shared."):-5], _matrix(name, value, size, hidden, input_major))]
                for part, piece in pieces:
                    layer.shared_w13.data.index_copy_(1, _columns("concatenated", size, part, layer.shared_w13.device),
                                                      piece.to(layer.shared_w13.device, layer.shared_w13.dtype))
                    layer._loaded_parts.setdefault("layer", set()).add(f"shared.{part}_proj")
                return 1
    layer._loaded_parts.setdefault("layer", set()).add(name)
    return 1


def load_weight(layer, name: str, tensor: Any, expert_id: Optional[int] = None, *, input_major: bool = False,
                gate_up_layout: str = "concatenated") -> int:
    """Store one checkpoint tensor into ``layer``; returns how many local rows it filled.

    ``name``: one of :data:`EXPERT_NAMES` or :data:`LAYER_NAMES` (shapes in the
    module docstring). For an expert name, ``expert_id`` is the logical expert
    the tensor belongs to: it is written into every slot of this rank that holds
    that expert (0 returned when none does: nothing is read); with
    ``expert_id=None`` the tensor holds all experts ``[E, ...]`` and only the
    blocks of the local experts are read. ``input_major``: the checkpoint
    stores ``[in, out]`` (Llama 4, GPT-OSS) rather than ``nn.Linear``'s
    ``[out, in]``. ``gate_up_layout``: how a fused gate/up tensor of the
    checkpoint is laid out ("concatenated" or "interleaved"); the layer converts
    to its own layout. ``tensor``: a torch.Tensor or a safetensors slice
    (``safe_open(...).get_slice(name)``), any float dtype (cast to the layer's).

    Raises TypeError / ArgumentError (unknown name, wrong shape, an expert id
    outside [0, E), a part the layer was not built with).
    """
    if not isinstance(name, str):
        raise TypeError(f"weight_loader: name must be a str, got {type(name).__name__}")
    note_direct_writes(layer)
    check_bool("weight_loader: input_major", input_major)
    check_choice("weight_loader: gate_up_layout", gate_up_layout, GATE_UP_LAYOUTS)
    if name in LAYER_NAMES:
        if expert_id is not None:
            raise ArgumentError(f"weight_loader: {name} belongs to the whole layer; expert_id must be None, got "
                                f"{expert_id!r}")
        return _load_layer_tensor(layer, name, tensor, input_major, gate_up_layout)
    if name not in EXPERT_NAMES:
        raise ArgumentError(f"weight_loader: name must be one of {list(EXPERT_NAMES + LAYER_NAMES)}, got {name!r}")
    short = name[len("experts."):]
    num_experts = layer.config.num_experts
    local = layer.local_logical_experts.tolist()
    if expert_id is not None:
        expert_id = check_int("weight_loader: expert_id", expert_id, minimum=0, maximum=num_experts - 1)
        rows = [row for row, expert in enumerate(local) if expert == expert_id]
        if not rows:
            return 0
        _store_expert_part(layer, short, _fetch(tensor), rows, input_major, gate_up_layout)
        return len(rows)
    shape = _shape(tensor)
    if not shape or shape[0] != num_experts:
        raise ArgumentError(f"weight_loader: {name} without expert_id must hold all {num_experts} experts "
                            f"[{num_experts}, ...], got shape {list(shape)}")
    filled = 0
    for expert in sorted(set(local)):
        rows = [row for row, held in enumerate(local) if held == expert]
        _store_expert_part(layer, short, _fetch(tensor, expert), rows, input_major, gate_up_layout)
        filled += len(rows)
    return filled


#: per parameter, the parts an in-place write to it fills: rows x parts for the expert tensors, layer parts otherwise
_PARTS_OF_PARAM = {
    "w13": ("rows", ("gate", "up")), "w2": ("rows", ("down",)),
    "w13_bias": ("rows", ("gate_bias", "up_bias")), "w2_bias": ("rows", ("down_bias",)),
    "gate_weight": ("layer", ("router.weight",)), "gate_bias": ("layer", ("router.bias",)),
    "correction_bias": ("layer", ("router.correction_bias",)),
    "shared_w13": ("layer", ("shared.gate_proj", "shared.up_proj")), "shared_w2": ("layer", ("shared.down_proj",)),
    "shared_gate_weight": ("layer", ("shared.gate",)),
}


def parameter_versions(layer) -> dict[str, int]:
    """The version counter of each weight parameter (moves on every in-place write through the parameter)."""
    return {name: getattr(layer, name)._version for name in _PARTS_OF_PARAM if getattr(layer, name) is not None}


def note_direct_writes(layer) -> None:
    """Count in-place writes made to whole parameters since the last look (``with torch.no_grad():
    layer.w13.copy_(...)``, ``load_state_dict``, an optimizer step) as loading what they cover.

    The loaders here write through ``.data`` (no version change) and record parts
    themselves; a write through ``param.data`` by the user is not seen (load
    through the loaders, or ``reset_parameters``).
    """
    seen = layer._param_versions
    now = parameter_versions(layer)
    for name, version in now.items():
        if version == seen.get(name, version):
            continue
        kind, parts = _PARTS_OF_PARAM[name]
        if kind == "rows":
            for row in range(layer.config.num_local_experts):
                layer._loaded_parts.setdefault(row, set()).update(parts)
        else:
            layer._loaded_parts.setdefault("layer", set()).update(parts)
    layer._param_versions = now


def missing_parts(layer, *, required_to_run: bool = False) -> tuple[list[tuple[int, int, list[str]]], list[str]]:
    """What :func:`missing_weights` lists, structured: ``(expert_rows, layer_parts)``.

    ``expert_rows``: ``(slot row, logical expert, absent parts)`` for each local
    row with a part not written (parts among ``gate``, ``up``, ``down`` and, with
    expert biases, ``gate_bias``, ``up_bias``, ``down_bias``), in row order;
    ``layer_parts``: the :data:`LAYER_NAMES` entries not written (``shared.gate_proj``
    etc. for the shared experts), sorted. ``required_to_run`` as in :func:`missing_weights`.
    """
    note_direct_writes(layer)
    needed = {"gate", "up", "down"}
    if layer.w13_bias is not None and not required_to_run:
        needed |= {"gate_bias", "up_bias", "down_bias"}
    expert_rows = []
    for row, expert in enumerate(layer.local_logical_experts.tolist()):
        absent = sorted(needed - layer._loaded_parts.get(row, set()))
        if absent:
            expert_rows.append((row, expert, absent))
    layer_needed = {"router.weight"}
    if layer.gate_bias is not None and not required_to_run:
        layer_needed.add("router.bias")
    if layer.correction_bias is not None and not required_to_run:
        layer_needed.add("router.correction_bias")
    if layer.shared_w13 is not None:
        layer_needed |= {"shared.gate_proj", "shared.up_proj", "shared.down_proj"}
    if layer.shared_gate_weight is not None:
        layer_needed.add("shared.gate")
    done = layer._loaded_parts.get("layer", set())
    return expert_rows, sorted(layer_needed - done)


def missing_weights(layer, *, required_to_run: bool = False) -> list[str]:
    """Parts not written yet, e.g. ``["expert 5 (slot row 1): up", "router.weight"]``.

    Written: by :func:`load_weight`, ``load_logical_weights``,
    ``reset_parameters``, ``load_state_dict`` or an in-place write to the
    whole parameter (see :func:`note_direct_writes`). ``required_to_run``: only
    the parts the layer is built with uninitialised memory (expert gate / up /
    down, router weight, shared experts and their gate); the biases start at
    zero, a valid value, so a forward does not demand them (a strict checkpoint
    load does). :func:`missing_parts` gives the same facts structured;
    :func:`moe_ext.moe.hf.load_hf_moe_weights` names the checkpoint tensors behind them.
    """
    expert_rows, layer_parts = missing_parts(layer, required_to_run=required_to_run)
    return [f"expert {expert} (slot row {row}): {', '.join(absent)}" for row, expert, absent in expert_rows] \
        + layer_parts


def export_expert_weights(layer, *, grads: bool = False) -> dict[tuple[str, int], torch.Tensor]:
    """This rank's experts in checkpoint layout: ``{(name, expert_id): tensor}``, one entry per local expert.

    Names ``gate_proj`` [I, H], ``up_proj`` [I, H], ``down_proj`` [H, I]
    (``nn.Linear`` layout) and with expert biases ``gate_proj_bias``,
    ``up_proj_bias`` [I], ``down_proj_bias`` [H]. A replicated expert is taken
    from its first local slot. ``grads``: export the gradients instead (zeros
    where there is none). The union over the EP ranks is the whole layer.
    """
    own = layer.activation.gate_up_layout

    def source(param):
        if param is None:
            return None
        if not grads:
            return param.detach()
        return param.grad if param.grad is not None else torch.zeros_like(param)

    w13, w2, b13, b2 = (source(getattr(layer, name)) for name in _EXPERT_PARAMS)
    out: dict[tuple[str, int], torch.Tensor] = {}
    seen = set()
    for row, expert in enumerate(layer.local_logical_experts.tolist()):
        if expert in seen:
            continue
        seen.add(expert)
        gate, up = _split_gate_up(w13[row], own, 1)
        out[("gate_proj", expert)] = gate.t().contiguous()
        out[("up_proj", expert)] = up.t().contiguous()
        out[("down_proj", expert)] = w2[row].t().contiguous()
        if b13 is not None:
            gate_bias, up_bias = _split_gate_up(b13[row], own, 0)
            out[("gate_proj_bias", expert)] = gate_bias.contiguous()
            out[("up_proj_bias", expert)] = up_bias.contiguous()
            out[("down_proj_bias", expert)] = b2[row].clone()
    return out


def remap_saved_rows(layer, state_dict: dict, prefix: str) -> Optional[str]:
    """Re-order a saved shard's expert rows into ``layer``'s placement in ``state_dict``; an error message if impossible."""
    config = layer.config
    saved = state_dict[prefix + "placement"]
    if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != (config.num_physical_experts,):
        return (f"MoELayer: {prefix}placement in the state_dict has shape {tuple(getattr(saved, 'shape', ()))}, this "
                f"layer has {config.num_physical_experts} physical slots: it was saved with another number of "
                f"physical experts and cannot be loaded here")
    saved = saved.to("cpu", torch.int64)
    saved_slots = state_dict.get(prefix + "local_slots", layer.local_slots)
    saved_slots = saved_slots.to("cpu", torch.int64) if isinstance(saved_slots, torch.Tensor) else None
    if saved_slots is None or tuple(saved_slots.shape) != (config.num_local_experts,) or (
            saved_slots.numel() and (int(saved_slots.min()) < 0
                                     or int(saved_slots.max()) >= config.num_physical_experts)):
        return (f"MoELayer: {prefix}local_slots in the state_dict must be {config.num_local_experts} slot ids in "
                f"[0, {config.num_physical_experts}), got {saved_slots.tolist() if saved_slots is not None else None}")
    saved_experts = saved[saved_slots].tolist()
    wanted = layer.local_logical_experts.cpu().tolist()
    if saved_experts == wanted:
        return None
    source_rows, missing = [], []
    for expert in wanted:
        if expert in saved_experts:
            source_rows.append(saved_experts.index(expert))
        else:
            missing.append(expert)
    if missing:
        return (f"MoELayer: the state_dict was saved under another placement: its rows hold logical experts "
                f"{saved_experts}, this rank's slots need {wanted} and experts {sorted(set(missing))} are not in it. "
                f"Load it under the saved placement (layer.set_placement(state_dict['{prefix}placement'], "
                f"move_weights=False) first), then move to this placement with set_placement")
    index = torch.tensor(source_rows, dtype=torch.int64)
    for name in _EXPERT_PARAMS:
        key = prefix + name
        if key in state_dict and isinstance(state_dict[key], torch.Tensor) \
                and state_dict[key].shape[:1] == (config.num_local_experts,):
            state_dict[key] = state_dict[key].index_select(0, index.to(state_dict[key].device))
    return None
