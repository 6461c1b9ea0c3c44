"""torchtitan 0.3.0's MoE module (small configs built in code) against MoELayer.

Used by tests/test_moe_torchtitan.py, in-process and inside spawned gloo groups.
Every rank builds the same torchtitan ``MoE`` from a seed, loads its weights into
an expert-parallel MoELayer through the public loader (``MoELayer.weight_loader``
with all-experts tensors: only the local experts' blocks are read), runs its
share of the tokens and compares forward and backward with torchtitan's module run
on every rank's tokens in one process.

Precision: torchtitan 0.3.0's ``GroupedExperts.forward`` casts the tokens and
the expert weights to bfloat16 unconditionally (``x.bfloat16()``,
``w.bfloat16()``), so it cannot be compared with an fp32 layer to 1e-5. The fp32
cases swap that one method for :class:`Float32GroupedExperts.forward` (the same
formula, ``silu(x W1^T) * (x W3^T) W2^T`` through ``torch._grouped_mm`` per
expert offsets, without the casts); the router, token dispatcher, shared experts
and the MoE wrapper are torchtitan's own code. The unmodified bf16 module is
compared separately at bf16 tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_ext.moe import MoEConfig, MoELayer

HIDDEN, INTER, SHARED = 16, 8, 12
TOLERANCE = dict(atol=1e-5, rtol=1e-5)

# name -> (num_experts, top_k, score_func, route_norm, route_scale, groups, limited groups, expert bias, shared)
CONFIGS = {
    # DeepSeek-V3 style: sigmoid, grouped top2_sum with the load-balancing bias, scaled, shared experts
    "grouped_sigmoid_bias": (8, 3, "sigmoid", True, 2.5, 4, 2, True, True),
    # grouped top2_sum without a bias (scored by max before issue 16: wrong answers)
    "grouped_softmax_nobias": (8, 2, "softmax", False, 1.0, 4, 2, False, False),
    # plain softmax top-k, renormalised, no groups
    "softmax_topk": (8, 2, "softmax", True, 1.0, None, None, False, True),
}


def _torchtitan():
    from torchtitan.models.common.feed_forward import FeedForward
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import MoE, GroupedExperts, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    return FeedForward, Linear, MoE, GroupedExperts, RoutedExperts, TokenChoiceTopKRouter, LocalTokenDispatcher


def float32_grouped_experts_forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """torchtitan's GroupedExperts formula in the tokens' dtype (its own forward rounds to bf16 first)."""
    offsets = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
    w1, w2, w3 = (w.to(x_RD.dtype) for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
    h = F.silu(torch._grouped_mm(x_RD, w1.transpose(-2, -1), offs=offsets))
    h = h * torch._grouped_mm(x_RD, w3.transpose(-2, -1), offs=offsets)
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets)


def make_module(name: str, seed: int, *, float32_experts: bool = True):
    """torchtitan's MoE for config ``name``, every parameter and buffer random (seeded), fp32."""
    FeedForward, Linear, MoE, GroupedExperts, RoutedExperts, Router, LocalTokenDispatcher = _torchtitan()
    experts, top_k, score, norm, scale, groups, limited, bias, shared = CONFIGS[name]
    config = MoE.Config(
        num_experts=experts, load_balance_coeff=1e-3 if bias else None,
        router=Router.Config(num_experts=experts, gate=Linear.Config(in_features=HIDDEN, out_features=experts),
                             top_k=top_k, score_func=score, route_norm=norm, route_scale=scale,
                             num_expert_groups=groups, num_limited_groups=limited),
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=HIDDEN, hidden_dim=INTER, num_experts=experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=experts, top_k=top_k)),
        shared_experts=FeedForward.Config(w1=Linear.Config(in_features=HIDDEN, out_features=SHARED),
                                          w2=Linear.Config(in_features=SHARED, out_features=HIDDEN),
                                          w3=Linear.Config(in_features=HIDDEN, out_features=SHARED))
        if shared else None)
    module = config.build()
    if float32_experts:
        inner = module.routed_experts.inner_experts
        inner.forward = float32_grouped_experts_forward.__get__(inner)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if key == "tokens_per_expert_E":
                continue
            fan_in = tensor.shape[-1] if tensor.dim() > 1 else 1
            scale_ = 0.05 if key == "expert_bias_E" else fan_in ** -0.5
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale_)
    module.eval()  # no load-counting side effect on tokens_per_expert_E
    return module


def layer_options(name: str) -> tuple[dict, dict]:
    """(MoEConfig sizes, MoELayer options) for torchtitan config ``name``: the field mapping of docs/moe_layer.md."""
    experts, top_k, score, norm, scale, groups, limited, bias, shared = CONFIGS[name]
    sizes = dict(num_experts=experts, top_k=top_k, hidden_size=HIDDEN, intermediate_size=INTER)
    options = dict(scoring=score, renormalize=norm, routed_scaling_factor=scale, use_correction_bias=bias,
                   activation="silu")
    if groups is not None:
        options.update(num_expert_group=groups, topk_group=limited, group_score="top2_sum")
    if shared:
        options.update(shared_intermediate_size=SHARED)
    return sizes, options


def load_torchtitan_moe(layer: MoELayer, module) -> None:
    """torchtitan's MoE state into ``layer`` through ``weight_loader`` (all-experts tensors, local rows read)."""
    inner = module.routed_experts.inner_experts
    layer.weight_loader("router.weight", module.router.gate.weight)
    if module.expert_bias_E is not None:
        layer.weight_loader("router.correction_bias", module.expert_bias_E)
    # w1 / w3 [E, F, D] and w2 [E, D, F] are nn.Linear-style (output-major) per expert
    layer.weight_loader("experts.gate_proj", inner.w1_EFD.detach())
    layer.weight_loader("experts.up_proj", inner.w3_EFD.detach())
    layer.weight_loader("experts.down_proj", inner.w2_EDF.detach())
    if module.shared_experts is not None:
        layer.weight_loader("shared.gate_proj", module.shared_experts.w1.weight)
        layer.weight_loader("shared.up_proj", module.shared_experts.w3.weight)
        layer.weight_loader("shared.down_proj", module.shared_experts.w2.weight)
    missing = layer.missing_weights()
    assert not missing, missing


def make_layer(name: str, module, *, groups=None, method="auto", placement=None, redundant=0) -> MoELayer:
    sizes, options = layer_options(name)
    config = MoEConfig(**sizes, num_physical_experts=sizes["num_experts"] + redundant, **(groups or {}))
    layer = MoELayer(config, comm_method=method, placement=placement, **options)
    load_torchtitan_moe(layer, module)
    return layer


def module_forward(module, x: torch.Tensor) -> torch.Tensor:
    """torchtitan's MoE on tokens [T, D] (it takes [B, L, D])."""
    return module(x.unsqueeze(0)).reshape(x.shape)


def expert_grads(module) -> dict[tuple[str, int], torch.Tensor]:
    """torchtitan's expert gradients, named as MoELayer.export_expert_weights(grads=True) names them."""
    inner = module.routed_experts.inner_experts
    out = {}
    for expert in range(inner.num_experts):
        out[("gate_proj", expert)] = inner.w1_EFD.grad[expert]
        out[("up_proj", expert)] = inner.w3_EFD.grad[expert]
        out[("down_proj", expert)] = inner.w2_EDF.grad[expert]
    return out


def replicated_grads(module, layer) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    pairs = [("router weight", layer.gate_weight.grad, module.router.gate.weight.grad)]
    if layer.shared_w13 is not None:
        gate, up = layer.shared_w13.grad.chunk(2, dim=1)
        shared = module.shared_experts
        pairs += [("shared w1", gate.t(), shared.w1.weight.grad), ("shared w3", up.t(), shared.w3.weight.grad),
                  ("shared w2", layer.shared_w2.grad.t(), shared.w2.weight.grad)]
    return pairs


def ep_case(groups, name, method, token_counts, redundant, seed):
    """This rank's tokens through the EP layer, forward and backward, against torchtitan on all tokens."""
    import torch.distributed as dist

    dp_rank, world = groups["dp_rank"], groups["dp_size"] * groups["tp_size"]
    module = make_module(name, seed)
    experts = CONFIGS[name][0]
    generator = torch.Generator().manual_seed(seed + 1)
    placement = torch.cat([torch.randperm(experts, generator=generator),
                           torch.randperm(experts, generator=generator)[:redundant]])
    assert placement.numel() % world == 0
    layer = make_layer(name, module, groups=groups, method=method, placement=placement, redundant=redundant)
    x_all = torch.randn(sum(token_counts), HIDDEN, generator=generator)
    start, count = sum(token_counts[:dp_rank]), token_counts[dp_rank]
    what = f"torchtitan {name} {method} tokens={token_counts} redundant={redundant}"
    x = x_all[start:start + count].clone().requires_grad_(True)
    y = layer(x)
    x_ref = x_all.clone().requires_grad_(True)
    y_ref = module_forward(module, x_ref)
    torch.testing.assert_close(y, y_ref[start:start + count].detach(), **TOLERANCE,
                               msg=lambda m: f"{what} forward: {m}")
    grad_all = torch.randn(y_ref.shape, generator=generator)
    (y * grad_all[start:start + count]).sum().backward()
    (y_ref * grad_all).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad[start:start + count], **TOLERANCE,
                               msg=lambda m: f"{what} grad x: {m}")
    layer.sum_replica_gradients()
    expected = expert_grads(module)
    for key, grad in layer.export_expert_weights(grads=True).items():
        torch.testing.assert_close(grad, expected[key], **TOLERANCE, msg=lambda m: f"{what} grad {key}: {m}")
    for label, grad, reference in replicated_grads(module, layer):
        total = grad.clone().contiguous()
        dist.all_reduce(total, group=layer.config.dp_group.process_group)
        torch.testing.assert_close(total, reference, **TOLERANCE, msg=lambda m: f"{what} grad {label}: {m}")
    return 1


def run_ep_cases(rank, world_size, cases):
    """cases: list of (config name, method, token_counts, redundant, seed), all at DP = world, TP 1."""
    from moe_ext.moe import make_moe_groups

    groups = make_moe_groups(world_size, 1)
    return sum(ep_case(groups, *case) for case in cases)
