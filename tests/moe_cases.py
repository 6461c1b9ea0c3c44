"""The case grid of the multi-process MoE tests, run inside one spawned group per world size.

Every rank builds the same global inputs from fixed seeds, runs its share
through the expert-parallel path and compares with the single-process dense
reference computed on all tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_ext.moe import (MoEConfig, MoELayer, build_forward_context, make_comm_method, make_moe_groups,
                         run_local_experts)
from moe_ext.testing.dense_moe import dense_moe
from moe_ext.testing.distributed import test_backend

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def device_for(rank: int) -> torch.device:
    return torch.device("cuda", rank) if test_backend() == "nccl" else torch.device("cpu")


def dense_from_slots(x, slots, weights, w13, w2):
    """Reference for given slot ids: sum_k w * MLP_slot(x), fp32."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(slots.shape[1]):
        for slot in slots[:, k].unique().tolist():
            rows = slots[:, k] == slot
            gate, up = (x[rows].float() @ w13[slot].float()).chunk(2, dim=-1)
            out[rows] += weights[rows, k:k + 1].float() * ((F.silu(gate) * up) @ w2[slot].float())
    return out.to(x.dtype)


def _assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _global_tokens(token_counts, hidden, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, hidden, generator=generator).to(dtype) for n in token_counts]


def comm_case(groups, device, method, *, num_slots, top_k, hidden, inter, token_counts, pattern, dtype, seed,
              npu=None):
    """One comm method on hand-made slot ids: random, all on this rank's slots, or all on other ranks'."""
    config = MoEConfig(num_experts=num_slots, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                       dtype=dtype, **groups)
    generator = torch.Generator().manual_seed(seed + 1)
    w13 = (torch.randn(num_slots, hidden, 2 * inter, generator=generator) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_slots, inter, hidden, generator=generator) / inter ** 0.5).to(dtype)
    xs = _global_tokens(token_counts, hidden, dtype, seed)
    local_count = num_slots // config.ep_size
    all_slots, all_weights = [], []
    for dp_rank, n in enumerate(token_counts):
        scores = torch.rand(n, num_slots, generator=generator)
        if pattern != "random":
            # The tokens of DP rank d go to EP ranks of that DP group ("local") or to all others ("remote").
            owner = torch.arange(num_slots) // local_count // config.tp_size
            allowed = owner == dp_rank if pattern == "local" else owner != dp_rank
            scores = scores + allowed.float() * 2
        ids = scores.topk(top_k, dim=1).indices.to(torch.int32)
        all_slots.append(ids)
        all_weights.append(torch.rand(n, top_k, generator=generator))
    me = config.dp_rank
    x, slots, weights = (xs[me].to(device), all_slots[me].to(device), all_weights[me].to(device))
    first, last = config.local_expert_range
    comm = make_comm_method(method, config, npu)
    context = build_forward_context(config, x.shape[0], device)
    routed, metadata = comm.dispatch(x, slots, weights, context)
    out = run_local_experts(routed, w13[first:last].to(device), w2[first:last].to(device), npu=npu)
    y = comm.combine(out, metadata, reduce_results=True)
    expected = dense_from_slots(x, slots, weights, w13.to(device), w2.to(device))
    _assert_close(y, expected, dtype, f"{method} {pattern} K={top_k} tokens={token_counts} {groups_desc(config)}")


def groups_desc(config):
    return f"dp={config.dp_size} tp={config.tp_size} ep_rank={config.ep_rank}"


def layer_case(groups, device, method, *, num_experts, top_k, hidden, inter, token_counts, dtype, seed,
               routing, redundant=0, npu=None, backward=False):
    """The whole layer against dense_moe; optionally the gradients too."""
    world = groups["dp_size"] * groups["tp_size"]
    num_slots = num_experts + redundant
    generator = torch.Generator().manual_seed(seed)
    # Placement: a permutation of the experts, then replicas of the first ones.
    placement = torch.cat([torch.randperm(num_experts, generator=generator),
                           torch.arange(redundant) % num_experts])
    config = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                       dtype=dtype, num_physical_experts=num_slots, **groups)
    assert num_slots % world == 0
    gate = torch.randn(num_experts, hidden, generator=generator)
    w13 = (torch.randn(num_experts, hidden, 2 * inter, generator=generator) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, inter, hidden, generator=generator) / inter ** 0.5).to(dtype)
    bias = torch.randn(num_experts, generator=generator) * 0.1 if routing.get("use_correction_bias") else None
    recorded = []
    layer = MoELayer(config, comm_method=method, npu=npu, placement=placement, device=device,
                     load_recorder=lambda index, load: recorded.append(load), **routing)
    layer.load_logical_weights(gate, w13, w2, bias)
    xs = _global_tokens(token_counts, hidden, dtype, seed + 7)
    x = xs[config.dp_rank].to(device).clone()
    dense_routing_args = {k: v for k, v in routing.items() if k != "use_correction_bias"}
    if bias is not None:
        dense_routing_args["correction_bias"] = bias
    if backward:
        x.requires_grad_(True)
    y = layer(x)
    expected = dense_moe(xs[config.dp_rank], gate, w13, w2, top_k, **dense_routing_args)
    what = f"layer {method} K={top_k} {routing} tokens={token_counts} {groups_desc(config)}"
    _assert_close(y, expected, dtype, what)
    assert recorded and int(recorded[-1].sum()) == x.shape[0] * top_k, what
    if backward:
        grad_out = torch.randn(y.shape, generator=generator).to(dtype)
        (y * grad_out.to(device)).sum().backward()
        x_ref = xs[config.dp_rank].detach().clone().requires_grad_(True)
        w13_ref, w2_ref = w13.clone().requires_grad_(True), w2.clone().requires_grad_(True)
        gate_ref = gate.clone().requires_grad_(True)
        reference = dense_moe(x_ref, gate_ref, w13_ref, w2_ref, top_k, **dense_routing_args)
        if reference.requires_grad:  # a rank without tokens has nothing to differentiate
            (reference * grad_out).sum().backward()
        for tensor in (x_ref, w13_ref, w2_ref, gate_ref):
            if tensor.grad is None:
                tensor.grad = torch.zeros_like(tensor)
        _assert_close(x.grad, x_ref.grad, dtype, what + " grad x")
        # Expert weights: the slots here against the summed gradients of all DP ranks' tokens.
        total_w13 = w13_ref.grad.clone().to(device)
        total_w2 = w2_ref.grad.clone().to(device)
        total_gate = gate_ref.grad.clone().to(device)
        import torch.distributed as dist
        for tensor in (total_w13, total_w2, total_gate):
            dist.all_reduce(tensor, group=config.dp_group.process_group)
        first, last = config.local_expert_range
        logical = placement[first:last]
        _assert_close(layer.w13.grad, total_w13.cpu()[logical], dtype, what + " grad w13")
        _assert_close(layer.w2.grad, total_w2.cpu()[logical], dtype, what + " grad w2")
        gate_grad = layer.gate_weight.grad.clone()
        dist.all_reduce(gate_grad, group=config.dp_group.process_group)
        _assert_close(gate_grad, total_gate, torch.float32 if dtype == torch.float32 else dtype, what + " grad gate")
    return layer.last_comm_method


def run_grid(rank, world_size, layouts, cases):
    """Run every (layout, case) pair; returns the number of checks made on this rank."""
    device = device_for(rank)
    checks = 0
    for dp_size, tp_size in layouts:
        groups = make_moe_groups(dp_size, tp_size)
        for kind, kwargs in cases(dp_size, tp_size):
            if kind == "comm":
                comm_case(groups, device, **kwargs)
            else:
                layer_case(groups, device, **kwargs)
            checks += 1
    return checks
