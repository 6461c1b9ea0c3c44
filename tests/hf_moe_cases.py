"""Hugging Face MoE blocks (small random configs, built in code) against MoELayer.

Used by tests/test_moe_hf.py, in-process and inside spawned gloo groups. Every
rank builds the same block from a seed, loads its experts into an
expert-parallel MoELayer through moe_ext.moe.hf, runs its share of the tokens and
compares forward and backward with the block run on all tokens.
"""

from __future__ import annotations

import torch

from moe_ext.moe import MoEConfig, MoELayer
from moe_ext.moe.hf import load_hf_moe_weights, moe_layer_arguments

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama4_text", "gpt_oss")
HIDDEN = 16
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def hf_config(family: str, **override):
    """A small random-size config of ``family`` with one MoE decoder layer (also usable for the full model)."""
    import transformers as tf

    common = dict(vocab_size=32, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8)
    if family == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=8, num_local_experts=8, num_experts_per_tok=2,
                                  hidden_act="gelu")  # a GELU Mixtral: GeGLU experts
    elif family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(**common, intermediate_size=24, moe_intermediate_size=8,
                                   shared_expert_intermediate_size=12, num_experts=8, num_experts_per_tok=3,
                                   norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
    elif family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, intermediate_size=24, moe_intermediate_size=8, num_experts=8,
                                   num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                                   mlp_only_layers=[])
    elif family == "deepseek_v3":
        config = tf.DeepseekV3Config(vocab_size=32, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, intermediate_size=24, moe_intermediate_size=8,
                                     n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                                     n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                     first_k_dense_replace=0, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
                                     qk_nope_head_dim=4, v_head_dim=4)
    elif family == "llama4_text":
        config = tf.Llama4TextConfig(**common, intermediate_size=8, intermediate_size_mlp=24, num_local_experts=8,
                                     num_experts_per_tok=1, interleave_moe_layer_step=1)
    elif family == "gpt_oss":
        config = tf.GptOssConfig(**common, intermediate_size=8, num_local_experts=8, num_experts_per_tok=2,
                                 layer_types=["full_attention"])
    else:
        raise ValueError(family)
    for key, value in override.items():
        setattr(config, key, value)
    return config


def block_class(family: str):
    import transformers as tf

    return {"mixtral": tf.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock,
            "qwen2_moe": tf.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock,
            "qwen3_moe": tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock,
            "deepseek_v3": tf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE,
            "llama4_text": tf.models.llama4.modeling_llama4.Llama4TextMoe,
            "gpt_oss": tf.models.gpt_oss.modeling_gpt_oss.GptOssMLP}[family]


@torch.no_grad()
def randomize(block: torch.nn.Module, seed: int) -> None:
    """Every parameter and float buffer random (the HF inits leave routers, biases and DeepSeek's bias at 0)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
        if not tensor.dtype.is_floating_point:
            continue
        fan_in = tensor.shape[-1] if tensor.dim() > 1 else 1
        if name.endswith(("gate_up_proj", "down_proj")) and tensor.dim() == 3 and "llama4" not in type(block).__module__ \
                and "gpt_oss" not in type(block).__module__:
            fan_in = tensor.shape[2]
        elif tensor.dim() == 3:  # input-major [E, in, out]
            fan_in = tensor.shape[1]
        scale = 0.1 if tensor.dim() == 1 else fan_in ** -0.5
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)


def make_block(family: str, seed: int):
    config = hf_config(family)
    block = block_class(family)(config).float()
    randomize(block, seed)
    return block, config


def block_forward(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block on tokens x [T, H] -> [T, H] (HF blocks take [B, S, H]; some return tuples)."""
    out = block(x.unsqueeze(0))
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(x.shape)


def make_layer(family: str, hf_cfg, block, *, groups=None, method="auto", placement=None, redundant=0,
               device="cpu") -> MoELayer:
    sizes, options = moe_layer_arguments(hf_cfg)
    config = MoEConfig(**sizes, num_physical_experts=sizes["num_experts"] + redundant, **(groups or {}))
    layer = MoELayer(config, comm_method=method, placement=placement, device=device, **options)
    load_hf_moe_weights(layer, family, block.state_dict())
    return layer


def expert_grads_from_block(family: str, block) -> dict[tuple[str, int], torch.Tensor]:
    """The block's expert gradients per expert in nn.Linear layout, as MoELayer.export_expert_weights names them."""
    experts = block.experts
    gate_up, down = experts.gate_up_proj.grad, experts.down_proj.grad
    out = {}
    for expert in range(gate_up.shape[0]):
        if family in ("llama4_text", "gpt_oss"):  # input-major [H, 2I], [I, H]
            g_u, d = gate_up[expert].t(), down[expert].t()
        else:
            g_u, d = gate_up[expert], down[expert]
        if family == "gpt_oss":
            gate, up = g_u[0::2], g_u[1::2]
            bias = experts.gate_up_proj_bias.grad[expert]
            out[("gate_proj_bias", expert)], out[("up_proj_bias", expert)] = bias[0::2], bias[1::2]
            out[("down_proj_bias", expert)] = experts.down_proj_bias.grad[expert]
        else:
            gate, up = g_u.chunk(2, dim=0)
        out[("gate_proj", expert)], out[("up_proj", expert)], out[("down_proj", expert)] = gate, up, d
    return out


def replicated_grads(family: str, block, layer) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, layer gradient, block gradient) of the router and shared experts (replicated parameters)."""
    pairs = []
    router = block.gate if hasattr(block, "gate") else block.router
    pairs.append(("router weight", layer.gate_weight.grad, router.weight.grad))
    if layer.gate_bias is not None:
        pairs.append(("router bias", layer.gate_bias.grad, router.bias.grad))
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if layer.shared_w13 is not None:
        gate, up = layer.shared_w13.grad.chunk(2, dim=1)
        pairs += [("shared gate_proj", gate.t(), shared.gate_proj.weight.grad),
                  ("shared up_proj", up.t(), shared.up_proj.weight.grad),
                  ("shared down_proj", layer.shared_w2.grad.t(), shared.down_proj.weight.grad)]
    if layer.shared_gate_weight is not None:
        pairs.append(("shared gate", layer.shared_gate_weight.grad, block.shared_expert_gate.weight.grad))
    return pairs


def global_tokens(token_counts, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sum(token_counts), HIDDEN, generator=generator)


def ep_case(groups, family, method, token_counts, redundant, backward, seed):
    """One family on one layout: forward (and backward) of this rank's tokens against the block on all tokens."""
    import torch.distributed as dist

    dp_rank, tp_size = groups["dp_rank"], groups["tp_size"]
    world = groups["dp_size"] * tp_size
    block, cfg = make_block(family, seed)
    num_experts = moe_layer_arguments(cfg)[0]["num_experts"]
    generator = torch.Generator().manual_seed(seed + 1)
    placement = torch.cat([torch.randperm(num_experts, generator=generator),
                           torch.randperm(num_experts, generator=generator)[:redundant]])
    assert placement.numel() % world == 0
    layer = make_layer(family, cfg, block, groups=groups, method=method, placement=placement, redundant=redundant)
    x_all = global_tokens(token_counts, seed + 2)
    start = sum(token_counts[:dp_rank])
    what = f"{family} {method} tokens={token_counts} dp={groups['dp_size']} tp={tp_size} redundant={redundant}"
    x = x_all[start:start + token_counts[dp_rank]].clone().requires_grad_(backward)
    y = layer(x.view(1, -1, HIDDEN) if x.shape[0] else x)  # [1, T, H]: any leading shape
    x_ref = x_all.clone().requires_grad_(backward)
    y_ref = block_forward(block, x_ref)
    torch.testing.assert_close(y.reshape(-1, HIDDEN), y_ref[start:start + x.shape[0]].detach(), **TOLERANCE,
                               msg=lambda m: f"{what} forward: {m}")
    if not backward:
        return 1
    grad_all = torch.randn(y_ref.shape, generator=generator)
    (y.reshape(-1, HIDDEN) * grad_all[start:start + x.shape[0]]).sum().backward()
    (y_ref * grad_all).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad[start:start + x.shape[0]], **TOLERANCE,
                               msg=lambda m: f"{what} grad x: {m}")
    layer.sum_replica_gradients()
    expected = expert_grads_from_block(family, block)
    for key, grad in layer.export_expert_weights(grads=True).items():
        torch.testing.assert_close(grad, expected[key], **TOLERANCE, msg=lambda m: f"{what} grad {key}: {m}")
    for name, grad, reference in replicated_grads(family, block, layer):
        total = grad.clone().contiguous()
        dist.all_reduce(total, group=layer.config.dp_group.process_group)  # each DP rank: its own tokens
        torch.testing.assert_close(total, reference, **TOLERANCE, msg=lambda m: f"{what} grad {name}: {m}")
    return 1


def run_ep_grid(rank, world_size, cases):
    """cases: list of (dp_size, tp_size, family, method, token_counts, redundant, backward, seed)."""
    from moe_ext.moe import make_moe_groups

    torch.use_deterministic_algorithms(False)
    groups_by_layout = {}
    checks = 0
    for dp_size, tp_size, family, method, token_counts, redundant, backward, seed in cases:
        if (dp_size, tp_size) not in groups_by_layout:
            groups_by_layout[(dp_size, tp_size)] = make_moe_groups(dp_size, tp_size)
        checks += ep_case(groups_by_layout[(dp_size, tp_size)], family, method, token_counts, redundant, backward,
                          seed)
    return checks


MC2_HIDDEN = 64  # MC2 on A2 takes H in (0, 7168], a multiple of 32
MC2_TOLERANCE = dict(atol=3e-2, rtol=3e-2)  # bf16 layer (MC2 moves fp16/bf16 tokens) against the fp32 block


def mc2_case(groups, family, token_counts, redundant, seed, soc="A2"):
    """Forward of this rank's tokens through MC2 (emulated torch_npu, bf16) against the HF block on all tokens.

    The block runs in fp32 on bf16-rounded weights and tokens, so the only
    difference is the layer's bf16 arithmetic. MC2 is forward-only.
    """
    from moe_ext.testing.npu import emulated_runtime

    runtime = emulated_runtime(soc, with_v2=True)
    cfg = hf_config(family, hidden_size=MC2_HIDDEN)
    block = block_class(family)(cfg).float()
    randomize(block, seed)
    with torch.no_grad():
        for tensor in list(block.parameters()) + list(block.buffers()):
            if tensor.dtype.is_floating_point:
                tensor.copy_(tensor.bfloat16().float())
    sizes, options = moe_layer_arguments(cfg)
    world = groups["dp_size"] * groups["tp_size"]
    generator = torch.Generator().manual_seed(seed + 1)
    placement = torch.cat([torch.randperm(sizes["num_experts"], generator=generator),
                           torch.randperm(sizes["num_experts"], generator=generator)[:redundant]])
    assert placement.numel() % world == 0
    config = MoEConfig(**sizes, dtype=torch.bfloat16, num_physical_experts=placement.numel(), **groups)
    layer = MoELayer(config, comm_method="mc2", npu=runtime, placement=placement, **options)
    load_hf_moe_weights(layer, family, block.state_dict())
    x_all = torch.randn(sum(token_counts), MC2_HIDDEN, generator=generator).bfloat16().float()
    start, count = sum(token_counts[:groups["dp_rank"]]), token_counts[groups["dp_rank"]]
    with torch.no_grad():
        y = layer(x_all[start:start + count].bfloat16())
        expected = block_forward(block, x_all)[start:start + count]
    assert layer.last_comm_method == "mc2" and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, **MC2_TOLERANCE,
                               msg=lambda m: f"mc2 {family} tokens={token_counts} {groups}: {m}")
    return runtime.ops.calls.get("npu_moe_distribute_dispatch_v2", 0)


def run_mc2_cases(rank, world_size, cases):
    """cases: list of (dp_size, tp_size, family, token_counts, redundant, seed); returns the MC2 dispatches made."""
    from moe_ext.moe import make_moe_groups

    groups_by_layout = {}
    dispatches = 0
    for dp_size, tp_size, family, token_counts, redundant, seed in cases:
        if (dp_size, tp_size) not in groups_by_layout:
            groups_by_layout[(dp_size, tp_size)] = make_moe_groups(dp_size, tp_size)
        dispatches += mc2_case(groups_by_layout[(dp_size, tp_size)], family, token_counts, redundant, seed)
    return dispatches
