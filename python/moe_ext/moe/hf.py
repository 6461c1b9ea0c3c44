"""Hugging Face model families -> MoELayer: config fields, checkpoint names, loading and export.

Supported families (``model_type`` of the config): ``mixtral``, ``qwen2_moe``,
``qwen3_moe``, ``deepseek_v3``, ``llama4_text`` (Llama 4's text MoE) and
``gpt_oss``. :func:`moe_layer_arguments` turns a transformers config into the
keyword arguments of :class:`MoEConfig` and :class:`MoELayer`;
:func:`load_hf_moe_weights` loads one decoder layer's MoE block from tensors
named as in a Hub checkpoint (``model.safetensors`` naming, e.g. Mixtral's
``block_sparse_moe.experts.3.w1.weight``) or as in a transformers >= 5 module's
``state_dict`` (fused ``experts.gate_up_proj`` [E, 2I, H]), storing only this
rank's experts; :func:`export_hf_moe_weights` is the reverse for this rank's experts.

No transformers import here: the functions read config attributes only.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from moe_ext.errors import ArgumentError, check_choice
from moe_ext.moe.weights import missing_parts

__all__ = ["FAMILIES", "HFLoadReport", "export_hf_moe_weights", "family_of", "load_hf_moe_weights",
           "moe_layer_arguments"]

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama4_text", "gpt_oss")
_FAMILY_ALIASES = {"llama4": "llama4_text"}


def family_of(config_or_name: Any) -> str:
    """The family name of a transformers config (its ``model_type``) or of a family string."""
    name = config_or_name if isinstance(config_or_name, str) else getattr(config_or_name, "model_type", None)
    if name is None:
        raise TypeError(f"family: expected a family name or a transformers config, got "
                        f"{type(config_or_name).__name__}")
    name = _FAMILY_ALIASES.get(name, name)
    return check_choice("family", name, FAMILIES)


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is not None:
        return default
    raise ArgumentError(f"moe_layer_arguments: the config has none of {list(names)}")


def moe_layer_arguments(hf_config: Any) -> tuple[dict, dict]:
    """``(MoEConfig keyword arguments, MoELayer keyword arguments)`` for a transformers config's MoE block.

    The MoEConfig part holds the sizes (``num_experts``, ``top_k``,
    ``hidden_size``, ``intermediate_size``); add the parallel layout, dtypes and
    ``num_physical_experts`` yourself. The table in docs/moe_layer.md lists the
    config field behind every argument.
    """
    family = family_of(hf_config)
    sizes = dict(num_experts=int(_get(hf_config, "num_local_experts", "num_experts", "n_routed_experts")),
                 top_k=int(_get(hf_config, "num_experts_per_tok")), hidden_size=int(hf_config.hidden_size))
    act = getattr(hf_config, "hidden_act", "silu")
    if family == "mixtral":
        sizes["intermediate_size"] = int(hf_config.intermediate_size)
        layer = dict(scoring="softmax", renormalize=True, activation=act)
    elif family in ("qwen2_moe", "qwen3_moe"):
        sizes["intermediate_size"] = int(hf_config.moe_intermediate_size)
        layer = dict(scoring="softmax", renormalize=bool(hf_config.norm_topk_prob), activation=act)
        if family == "qwen2_moe":
            layer.update(shared_intermediate_size=int(hf_config.shared_expert_intermediate_size),
                         shared_expert_gate=True)
    elif family == "deepseek_v3":
        sizes["intermediate_size"] = int(hf_config.moe_intermediate_size)
        layer = dict(scoring="sigmoid", renormalize=bool(hf_config.norm_topk_prob), activation=act,
                     num_expert_group=int(hf_config.n_group), topk_group=int(hf_config.topk_group),
                     group_score="top2_sum", use_correction_bias=True,
                     routed_scaling_factor=float(hf_config.routed_scaling_factor),
                     num_shared_experts=int(hf_config.n_shared_experts))
    elif family == "llama4_text":
        sizes["intermediate_size"] = int(hf_config.intermediate_size)
        # Router: top-k of the logits, sigmoid of the chosen ones (sigmoid is monotone: same choice),
        # tokens scaled before the experts; one shared expert as wide as a routed one.
        layer = dict(scoring="sigmoid", renormalize=False, activation=act, apply_router_weight_on_input=True,
                     num_shared_experts=1)
    else:  # gpt_oss
        sizes["intermediate_size"] = int(hf_config.intermediate_size)
        layer = dict(scoring="softmax", renormalize=True, router_bias=True, activation="swigluoai",
                     gate_up_layout="interleaved", swiglu_alpha=float(getattr(hf_config, "swiglu_alpha", 1.702)),
                     swiglu_limit=float(hf_config.swiglu_limit), expert_bias=True)
    return sizes, layer


@dataclass(frozen=True)
class _Rule:
    pattern: str  # regex on the name inside the block; group "e" is the expert id
    target: str  # moe_ext.moe.weights name
    input_major: bool = False
    gate_up_layout: str = "concatenated"


_ROUTER = [_Rule(r"gate\.weight", "router.weight")]
_PER_EXPERT = [_Rule(r"experts\.(?P<e>\d+)\.gate_proj\.weight", "experts.gate_proj"),
               _Rule(r"experts\.(?P<e>\d+)\.up_proj\.weight", "experts.up_proj"),
               _Rule(r"experts\.(?P<e>\d+)\.down_proj\.weight", "experts.down_proj")]
# transformers >= 5 modules: every expert in one [E, out, in] tensor, gate then up.
_FUSED_MODULE = [_Rule(r"experts\.gate_up_proj", "experts.gate_up_proj"),
                 _Rule(r"experts\.down_proj", "experts.down_proj")]


def _shared(prefix: str) -> list[_Rule]:
    return [_Rule(rf"{prefix}\.{part}_proj\.weight", f"shared.{part}_proj") for part in ("gate", "up", "down")]


_RULES: dict[str, list[_Rule]] = {
    "mixtral": _ROUTER + [_Rule(r"experts\.(?P<e>\d+)\.w1\.weight", "experts.gate_proj"),
                          _Rule(r"experts\.(?P<e>\d+)\.w3\.weight", "experts.up_proj"),
                          _Rule(r"experts\.(?P<e>\d+)\.w2\.weight", "experts.down_proj")] + _FUSED_MODULE,
    "qwen2_moe": _ROUTER + _PER_EXPERT + _FUSED_MODULE + _shared("shared_expert")
    + [_Rule(r"shared_expert_gate\.weight", "shared.gate")],
    "qwen3_moe": _ROUTER + _PER_EXPERT + _FUSED_MODULE,
    "deepseek_v3": _ROUTER + [_Rule(r"gate\.e_score_correction_bias", "router.correction_bias")] + _PER_EXPERT
    + _FUSED_MODULE + _shared("shared_experts"),
    "llama4_text": [_Rule(r"router\.weight", "router.weight"),
                    _Rule(r"experts\.gate_up_proj", "experts.gate_up_proj", input_major=True),
                    _Rule(r"experts\.down_proj", "experts.down_proj", input_major=True)] + _shared("shared_expert"),
    "gpt_oss": [_Rule(r"router\.weight", "router.weight"), _Rule(r"router\.bias", "router.bias"),
                _Rule(r"experts\.gate_up_proj", "experts.gate_up_proj", True, "interleaved"),
                _Rule(r"experts\.gate_up_proj_bias", "experts.gate_up_proj_bias", True, "interleaved"),
                _Rule(r"experts\.down_proj", "experts.down_proj", True),
                _Rule(r"experts\.down_proj_bias", "experts.down_proj_bias", True)],
}
#: the block's name inside a decoder layer of a Hub checkpoint, e.g. model.layers.{i}.<this>.
BLOCK_NAMES = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp", "deepseek_v3": "mlp",
               "llama4_text": "feed_forward", "gpt_oss": "mlp"}


_SHARED_NAMES = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts", "llama4_text": "shared_expert"}
_ALL_EXPERT_FAMILIES = ("llama4_text", "gpt_oss")  # Hub checkpoints with every expert in one tensor


def _hub_names(family: str) -> dict[str, str]:
    """The Hub checkpoint name (after the block prefix) of each part the layer loads; ``{e}``: the expert.

    Keys: the expert parts of :func:`moe_ext.moe.weights.missing_parts` (``gate``, ``up``, ``down``,
    ``*_bias``) and its layer parts (``router.weight``, ``shared.gate_proj``, ...). Where one tensor holds
    every expert (Llama 4, GPT-OSS) the name has no ``{e}``.
    """
    router = "router" if family in _ALL_EXPERT_FAMILIES else "gate"
    names = {"router.weight": f"{router}.weight", "router.bias": "router.bias",
             "router.correction_bias": "gate.e_score_correction_bias", "shared.gate": "shared_expert_gate.weight"}
    if family in _ALL_EXPERT_FAMILIES:
        names.update({"gate": "experts.gate_up_proj", "up": "experts.gate_up_proj", "down": "experts.down_proj",
                      "gate_bias": "experts.gate_up_proj_bias", "up_bias": "experts.gate_up_proj_bias",
                      "down_bias": "experts.down_proj_bias"})
    else:
        own = {"gate": "w1", "up": "w3", "down": "w2"} if family == "mixtral" else \
            {part: f"{part}_proj" for part in ("gate", "up", "down")}
        names.update({part: f"experts.{{e}}.{name}.weight" for part, name in own.items()})
    if family in _SHARED_NAMES:
        names.update({f"shared.{part}_proj": f"{_SHARED_NAMES[family]}.{part}_proj.weight"
                      for part in ("gate", "up", "down")})
    return names


_PART_ORDER = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")  # as a checkpoint lists them


def _missing_checkpoint_tensors(layer, family: str, prefix: str) -> list[tuple[str, str]]:
    """``(checkpoint name, what it fills on this rank)`` for every tensor a strict load still needs.

    One entry per name: replicas of an expert (several slot rows) and, for all-experts tensors, several
    experts share it. Expert tensors first, in slot-row order, then the router and shared-expert tensors.
    """
    names = _hub_names(family)
    expert_rows, layer_parts = missing_parts(layer)
    needs: dict[str, dict[int, tuple[list[str], list[int]]]] = {}  # name -> expert -> (parts, slot rows)
    for row, expert, absent in expert_rows:
        for part in sorted(absent, key=_PART_ORDER.index):
            parts, rows = needs.setdefault(prefix + names[part].format(e=expert), {}).setdefault(expert, ([], []))
            if part not in parts:
                parts.append(part)
            if row not in rows:
                rows.append(row)
    found = []
    for name, experts in needs.items():
        if len(experts) == 1:  # one expert's tensor: its replicas' rows and parts
            (expert, (parts, rows)), = experts.items()
            what = f"expert {expert} (slot row{'s' if len(rows) > 1 else ''} {_spans(rows)}): {', '.join(parts)}"
        else:  # an all-experts tensor: this rank's blocks of it
            parts = sorted({part for parts, _ in experts.values() for part in parts}, key=_PART_ORDER.index)
            rows = sorted(row for _, rows in experts.values() for row in rows)
            what = f"experts {_spans(sorted(experts))} (slot rows {_spans(rows)}): {', '.join(parts)}"
        found.append((name, what))
    found.extend((prefix + names[part], part) for part in layer_parts)
    return found


def _spans(values: list[int]) -> str:
    """Sorted ints as runs: [0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _block_location(prefix: str) -> str:
    """Where the block sits, for messages: the prefix and, when it names one, the decoder layer."""
    layer_index = re.search(r"(?:^|\.)layers\.(\d+)\.", prefix)
    where = f"under prefix {prefix!r}" if prefix else "with no prefix"
    return where + (f" (decoder layer {layer_index.group(1)})" if layer_index else "")


_SHOWN_NAMES = 8  # checkpoint names a strict load's error lists before "and N more"


@dataclass
class HFLoadReport:
    """What :func:`load_hf_moe_weights` did with each name (names without the prefix, except ``missing_keys``)."""

    loaded: list[str] = field(default_factory=list)  # written into this rank (rows or layer parameters)
    not_local: list[str] = field(default_factory=list)  # experts with no slot on this rank: not read
    ignored: list[str] = field(default_factory=list)  # outside the prefix, or not a tensor of the family
    missing: list[str] = field(default_factory=list)  # parts of this rank still not written afterwards
    #: the Hub checkpoint names (with the prefix) that would fill ``missing``, one per tensor
    missing_keys: list[str] = field(default_factory=list)


def load_hf_moe_weights(layer, family: Any, tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], *,
                        prefix: str = "", strict: bool = True) -> HFLoadReport:
    """Load one MoE block of a Hugging Face checkpoint into ``layer`` (this rank's experts only).

    ``tensors``: name -> torch.Tensor or safetensors slice (``f.get_slice(name)``;
    only the local experts' blocks are read), for the names of one block after
    ``prefix`` (e.g. ``prefix="model.layers.3.block_sparse_moe."``; names not
    starting with it are ignored). Both the Hub checkpoint names and the
    transformers >= 5 module names are accepted (see the module docstring).
    With ``strict`` a name under the prefix that the family does not know, a
    quantized tensor (GPT-OSS's MXFP4 ``*_blocks`` / ``*_scales``: dequantize
    first) or a part left unloaded afterwards raises ArgumentError. Without
    it, the returned report's ``missing`` lists the parts still unloaded and
    ``missing_keys`` the checkpoint names that would fill them (check it after
    the last file), and a call that matched no tensor of the family at all (a
    wrong ``prefix``) warns (``UserWarning``); the layer itself refuses a
    forward while an expert or the router was never written.

    The strict error for an incomplete block names the missing tensors by their
    Hub checkpoint names with the prefix (e.g.
    ``model.layers.0.mlp.experts.3.gate_proj.weight``; Llama 4 and GPT-OSS:
    the all-experts tensor), the first eight and the count, each with the
    expert, the slot rows and the parts it fills, the decoder layer read from
    the prefix, and the unloaded parts as :meth:`MoELayer.missing_weights`
    lists them. Checks are local: at EP > 1 each rank checks its own experts.
    """
    family = family_of(family)
    rules = [(re.compile(rule.pattern + r"$"), rule) for rule in _RULES[family]]
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    report = HFLoadReport()
    for full_name, tensor in items:
        if not full_name.startswith(prefix):
            report.ignored.append(full_name)
            continue
        name = full_name[len(prefix):]
        if name.endswith(("_blocks", "_scales")):
            raise ArgumentError(f"load_hf_moe_weights: {full_name} is a quantized (MXFP4) tensor; moe_ext loads "
                                f"floating-point experts: use a dequantized (bf16) checkpoint")
        for regex, rule in rules:
            match = regex.match(name)
            if match:
                expert = int(match.group("e")) if "e" in regex.groupindex else None
                filled = layer.weight_loader(rule.target, tensor, expert, input_major=rule.input_major,
                                             gate_up_layout=rule.gate_up_layout)
                (report.loaded if filled else report.not_local).append(name)
                break
        else:
            if strict:
                raise ArgumentError(f"load_hf_moe_weights: {full_name!r} is not a {family} MoE block tensor "
                                    f"(known: {[rule.pattern for _, rule in rules]})")
            report.ignored.append(full_name)
    report.missing = layer.missing_weights()
    needed = _missing_checkpoint_tensors(layer, family, prefix) if report.missing else []
    report.missing_keys = [name for name, _ in needed]
    if report.missing and strict:
        shown = ", ".join(f"{name!r} ({what})" for name, what in needed[:_SHOWN_NAMES])
        more = f", and {len(needed) - _SHOWN_NAMES} more" if len(needed) > _SHOWN_NAMES else ""
        fused = ""
        if family not in _ALL_EXPERT_FAMILIES and any(name.startswith(prefix + "experts.") for name, _ in needed):
            fused = (f" For the experts, the transformers >= 5 module names {prefix + 'experts.gate_up_proj'!r} and "
                     f"{prefix + 'experts.down_proj'!r} (every expert in one tensor) serve as well.")
        raise ArgumentError(
            f"load_hf_moe_weights(strict=True): the {family} MoE block {_block_location(prefix)} is incomplete on "
            f"this rank: {len(needed)} checkpoint tensor{'s' if len(needed) != 1 else ''} not supplied: "
            f"{shown}{more}.{fused} Pass every tensor of the block (all its files) in one call, or load file by "
            f"file with strict=False and check the report's missing_keys after the last. Unloaded parts: "
            f"{report.missing[:_SHOWN_NAMES]}"
            f"{f' (+{len(report.missing) - _SHOWN_NAMES} more)' if len(report.missing) > _SHOWN_NAMES else ''}")
    if report.missing and not report.loaded and not report.not_local:
        # A partial load is normal without strict (the rest comes from another file); a call that matched no
        # name at all is a wrong prefix or family: say so instead of leaving the layer silently unloaded.
        warnings.warn(f"load_hf_moe_weights(strict=False): no {family} MoE block tensor under prefix {prefix!r} "
                      f"({len(report.ignored)} names ignored, e.g. {report.ignored[:3]}); this rank's layer is "
                      f"still missing {len(report.missing)} parts ({report.missing[:3]}; checkpoint names "
                      f"{report.missing_keys[:3]}) and refuses to run until they are loaded", UserWarning,
                      stacklevel=2)
    return report


def export_hf_moe_weights(layer, family: Any, *, prefix: str = "", grads: bool = False) -> dict[str, torch.Tensor]:
    """This rank's part of the block in Hub checkpoint naming: its experts, the router and shared experts.

    Per-expert names where the Hub checkpoint has them (Mixtral ``w1/w3/w2``,
    Qwen and DeepSeek ``gate_proj/up_proj/down_proj``); Llama 4 and GPT-OSS store
    all experts in one tensor, so their export holds ``{prefix}experts.<name>.{e}``
    entries per local expert in that tensor's layout, to be stacked over the
    ranks in expert order. ``grads``: the gradients instead of the weights.
    Router and shared-expert tensors are replicated: every rank exports them.
    """
    family = family_of(family)
    out: dict[str, torch.Tensor] = {}
    experts = layer.export_expert_weights(grads=grads)

    def value(param):
        if not grads:
            return param.detach()
        return param.grad if param.grad is not None else torch.zeros_like(param)

    router_name = "gate" if family in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3") else "router"
    out[f"{prefix}{router_name}.weight"] = value(layer.gate_weight)
    if layer.gate_bias is not None:
        out[f"{prefix}router.bias"] = value(layer.gate_bias)
    if layer.correction_bias is not None:
        out[f"{prefix}gate.e_score_correction_bias"] = layer.correction_bias.detach()
    for (part, expert), tensor in experts.items():
        if family == "mixtral":
            names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
            out[f"{prefix}experts.{expert}.{names[part]}.weight"] = tensor
        elif family in ("qwen2_moe", "qwen3_moe", "deepseek_v3"):
            out[f"{prefix}experts.{expert}.{part}.weight"] = tensor
    if family in ("llama4_text", "gpt_oss"):
        layout = "interleaved" if family == "gpt_oss" else "concatenated"
        for expert in sorted({expert for _, expert in experts}):
            gate, up = experts[("gate_proj", expert)].t(), experts[("up_proj", expert)].t()  # [H, I] each
            out[f"{prefix}experts.gate_up_proj.{expert}"] = _join(gate, up, layout, dim=1)
            out[f"{prefix}experts.down_proj.{expert}"] = experts[("down_proj", expert)].t().contiguous()
            if family == "gpt_oss":
                out[f"{prefix}experts.gate_up_proj_bias.{expert}"] = _join(
                    experts[("gate_proj_bias", expert)], experts[("up_proj_bias", expert)], layout, dim=0)
                out[f"{prefix}experts.down_proj_bias.{expert}"] = experts[("down_proj_bias", expert)]
    if layer.shared_w13 is not None:
        shared = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts", "llama4_text": "shared_expert"}[family]
        gate, up = value(layer.shared_w13).chunk(2, dim=1)
        out[f"{prefix}{shared}.gate_proj.weight"] = gate.t().contiguous()
        out[f"{prefix}{shared}.up_proj.weight"] = up.t().contiguous()
        out[f"{prefix}{shared}.down_proj.weight"] = value(layer.shared_w2).t().contiguous()
    if layer.shared_gate_weight is not None:
        out[f"{prefix}shared_expert_gate.weight"] = value(layer.shared_gate_weight)
    return out


def _join(gate: torch.Tensor, up: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    if layout == "concatenated":
        return torch.cat([gate, up], dim=dim).contiguous()
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1).contiguous()


