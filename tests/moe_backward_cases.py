"""MoELayer training checks (issue 12): forward and every gradient against a single-process dense reference.

A layout is ``(dp, tp, copies)``: ``copies`` model replicas of ``dp x tp``
ranks each, the EP group being one replica's ranks (a subgroup of the world
when ``copies > 1``). Every rank builds every DP rank's tokens from the case's
seed, so it can compute the dense reference of its whole replica in-process:
``x`` and router gradients from its own tokens' loss, expert-weight gradients
from the sum of all DP ranks' losses (what the expert-parallel backward
computes for the slots a rank holds). No collective is used for checking.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_ext.moe import MoEConfig, MoELayer
from moe_ext.testing.dense_moe import dense_moe
from moe_ext.testing.distributed import test_backend

ATOL = RTOL = 2e-5  # fp32 throughout; the sums run in different orders


def device_for(rank: int) -> torch.device:
    return torch.device("cuda", rank) if test_backend() == "nccl" else torch.device("cpu")


def make_groups(dp: int, tp: int, copies: int) -> dict:
    """MoEConfig keyword arguments of this rank; every rank creates every group, in one order."""
    from moe_ext.distributed import world_timeout
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = dp * tp
    new_group = lambda ranks: dist.new_group(ranks, timeout=world_timeout())  # noqa: E731
    assert ep * copies == world, (dp, tp, copies, world)
    copy, local = divmod(rank, ep)
    dp_rank, tp_rank = divmod(local, tp)
    mine = dict(ep=None, dp=None, tp=None)
    for c in range(copies):
        base = c * ep
        ep_group = new_group(list(range(base, base + ep))) if copies > 1 else dist.group.WORLD
        if c == copy:
            mine["ep"] = ep_group
        for d in range(dp):
            group = new_group([base + d * tp + t for t in range(tp)]) if tp > 1 else None
            if c == copy and d == dp_rank:
                mine["tp"] = group
        for t in range(tp):
            group = new_group([base + d * tp + t for d in range(dp)]) if dp > 1 else None
            if c == copy and t == tp_rank:
                mine["dp"] = group
    return dict(dp_size=dp, dp_rank=dp_rank, tp_size=tp, tp_rank=tp_rank, ep_group=mine["ep"],
                dp_group=mine["dp"], tp_group=mine["tp"])


def skewed_inputs(num_experts, hidden, token_counts, skew, ep, seed):
    """``(gate [E, H], per-DP-rank tokens)``; ``skew`` steers routing through a constant feature.

    - "none": random;
    - "rank0": every token to experts of EP rank 0 (the others' experts get no rows);
    - "one_expert": every token's best expert is expert 0;
    - "last_rank": every token to the experts of the last EP rank.
    """
    generator = torch.Generator().manual_seed(seed)
    gate = torch.randn(num_experts, hidden, generator=generator)
    xs = [torch.randn(n, hidden, generator=generator) for n in token_counts]
    if skew != "none":
        per_rank = num_experts // ep
        favoured = {"rank0": range(per_rank), "one_expert": range(1),
                    "last_rank": range(num_experts - per_rank, num_experts)}[skew]
        for x in xs:
            x[:, 0] = 1.0
        gate[:, 0] = -12.0
        for expert in favoured:
            gate[expert, 0] = 12.0
    return gate, xs


def check_layer(groups, method, *, num_experts, top_k, hidden, inter, token_counts, seed, gate=None, xs=None,
                skew="none", permute_placement=False, what=""):
    """Forward + gradients of x, router and local expert weights vs the dense reference. Returns 1."""
    device = device_for(dist.get_rank())
    config = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                       **groups)
    assert len(token_counts) == config.dp_size
    generator = torch.Generator().manual_seed(seed + 1)
    if gate is None:
        gate, xs = skewed_inputs(num_experts, hidden, token_counts, skew, config.ep_size, seed)
    w13 = torch.randn(num_experts, hidden, 2 * inter, generator=generator) / hidden ** 0.5
    w2 = torch.randn(num_experts, inter, hidden, generator=generator) / inter ** 0.5
    grads_out = [torch.randn(x.shape, generator=generator) for x in xs]
    placement = torch.randperm(num_experts, generator=generator) if permute_placement else None
    layer = MoELayer(config, comm_method=method, placement=placement, device=device)
    layer.load_logical_weights(gate, w13, w2)
    me = config.dp_rank
    x = xs[me].to(device).clone().requires_grad_(True)
    y = layer(x)
    (y * grads_out[me].to(device)).sum().backward()

    # Dense reference: own tokens for x and the router, all DP ranks' tokens for the experts.
    def reference(indices):
        gate_ref = gate.clone().requires_grad_(True)
        w13_ref, w2_ref = w13.clone().requires_grad_(True), w2.clone().requires_grad_(True)
        x_refs = [xs[d].clone().requires_grad_(True) for d in indices]
        outs = [dense_moe(x_ref, gate_ref, w13_ref, w2_ref, top_k) for x_ref in x_refs]
        loss = sum((out * grads_out[d]).sum() for out, d in zip(outs, indices))
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        zero = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)  # noqa: E731
        return outs, [zero(t) for t in x_refs], zero(gate_ref), zero(w13_ref), zero(w2_ref)

    outs, x_grads, gate_grad, _, _ = reference([me])
    _, _, _, w13_total, w2_total = reference(list(range(config.dp_size)))
    label = (f"{what} {method} E={num_experts} K={top_k} tokens={token_counts} skew={skew} dp={config.dp_size} "
             f"tp={config.tp_size} ep_rank={config.ep_rank}")

    def close(actual, expected, name):
        actual = actual if actual is not None else None
        assert actual is not None, f"{label}: {name} has no gradient"
        torch.testing.assert_close(actual.detach().cpu(), expected.detach(), atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{label}: {name}: {m}")

    close(y, outs[0], "forward")
    close(x.grad, x_grads[0], "grad x")
    close(layer.gate_weight.grad, gate_grad, "grad router weight")
    first, last = config.local_expert_range
    logical = layer.placement[first:last].cpu()
    close(layer.w13.grad, w13_total[logical], "grad w13")
    close(layer.w2.grad, w2_total[logical], "grad w2")
    return 1


BACKWARD_METHODS = ("allgather", "native_allgather", "alltoall")


def issue_cases(world_size):
    """The failing inputs of issue 12, as stated there, for every backward-capable method."""
    cases = []
    for method in BACKWARD_METHODS:
        if world_size == 2:
            # 1. rank 1's expert gets no rows: router rows [1,1,1,1] and [-1,-1,-1,-1], x = ones(1, 4).
            gate = torch.tensor([[1.0] * 4, [-1.0] * 4])
            cases.append(((2, 1, 1), method, dict(num_experts=2, top_k=1, hidden=4, inter=2, token_counts=[1, 1],
                                                  gate=gate, xs=[torch.ones(1, 4), torch.ones(1, 4)], seed=1,
                                                  what="zero rows on rank 1")))
            # 8 experts / top-2, every token to rank 0's experts.
            cases.append(((2, 1, 1), method, dict(num_experts=8, top_k=2, hidden=4, inter=2, token_counts=[3, 2],
                                                  skew="rank0", seed=2, what="8 experts all on rank 0")))
            # A rank with no tokens that receives none.
            cases.append(((2, 1, 1), method, dict(num_experts=8, top_k=2, hidden=4, inter=2, token_counts=[3, 0],
                                                  skew="rank0", seed=3, what="rank 1 no tokens, receives none")))
            # 2-rank TP: DP 1 x TP 2.
            cases.append(((1, 2, 1), method, dict(num_experts=4, top_k=2, hidden=8, inter=4, token_counts=[5],
                                                  seed=4, what="DP 1 x TP 2")))
        else:
            # 2. DP 2 x TP 2.
            cases.append(((2, 2, 1), method, dict(num_experts=8, top_k=2, hidden=8, inter=4, token_counts=[5, 3],
                                                  seed=5, what="DP 2 x TP 2")))
            # 3. 2 model copies x EP 2: the EP group is a subgroup.
            cases.append(((2, 1, 2), method, dict(num_experts=4, top_k=2, hidden=8, inter=4, token_counts=[4, 3],
                                                  seed=6, what="2 copies x EP 2 (subgroup)")))
    return cases


def matrix_cases(world_size, sample, seed=12):
    """The randomized matrix: EP 2 and 4, TP 1 and 2, subgroup EP, skewed routing with empty ranks."""
    layouts = {2: [(2, 1, 1), (1, 2, 1)], 4: [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)]}[world_size]
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for layout in layouts:
        dp, tp, _ = layout
        for method in BACKWARD_METHODS:
            for skew in ("none", "rank0", "one_expert", "last_rank"):
                ep = dp * tp
                num_experts = ep * int(torch.randint(1, 4, (1,), generator=generator))
                top_k = int(torch.randint(1, min(num_experts, 4) + 1, (1,), generator=generator))
                counts = torch.randint(0, 6, (dp,), generator=generator).tolist()
                if int(torch.randint(0, 3, (1,), generator=generator)) == 0:
                    counts[int(torch.randint(0, dp, (1,), generator=generator))] = 0  # an empty DP rank
                cases.append((layout, method, dict(num_experts=num_experts, top_k=top_k, hidden=8, inter=4,
                                                   token_counts=counts, skew=skew,
                                                   seed=int(torch.randint(0, 2**31, (1,), generator=generator)),
                                                   permute_placement=bool(len(cases) % 2), what="matrix")))
    if sample is not None and sample < len(cases):
        keep = torch.randperm(len(cases), generator=generator)[:sample].sort().values.tolist()
        cases = [cases[i] for i in keep]
    return cases


def run_cases(rank, world_size, cases):
    """Run every case, one group set per layout (created in the same order on every rank)."""
    made = {}
    checks = 0
    for layout, method, kwargs in cases:
        if layout not in made:
            made[layout] = make_groups(*layout)
        checks += check_layer(made[layout], method, **kwargs)
    return checks



def check_forward_only_methods(rank, world_size):
    """MC2 (under the torch_npu emulation) and dummy: backward raises naming the method, on every rank.

    Returns the messages; afterwards one more collective shows no rank was left
    inside a backward collective.
    """
    import pytest

    from moe_ext.moe.comm.collectives import ForwardOnlyError
    from moe_ext.testing.npu import emulated_runtime

    groups = make_groups(world_size, 1, 1)
    messages = []
    # MC2 on A3 with the v2 operators (the emulation enforces the documented H in [1024, 8192]).
    for method, dtype, npu, hidden in (("mc2", torch.bfloat16, emulated_runtime("A3", with_v2=True), 1024),
                                       ("dummy", torch.float32, None, 32)):
        config = MoEConfig(num_experts=4, top_k=2, hidden_size=hidden, intermediate_size=16, dtype=dtype, **groups)
        layer = MoELayer(config, comm_method=method, npu=npu)
        generator = torch.Generator().manual_seed(5)
        layer.load_logical_weights(torch.randn(4, hidden, generator=generator),
                                   torch.randn(4, hidden, 32, generator=generator).to(dtype) / 32,
                                   torch.randn(4, 16, hidden, generator=generator).to(dtype) / 4)
        x = torch.randn(3, hidden, generator=generator).to(dtype).requires_grad_(True)
        y = layer(x)
        with pytest.raises(ForwardOnlyError) as info:
            y.float().sum().backward()
        messages.append(str(info.value))
    total = torch.ones(1)
    dist.all_reduce(total)
    assert int(total) == world_size
    return messages
