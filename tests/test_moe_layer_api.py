"""MoELayer's public surface: routing options, external routing, MLP variants, shared experts,
checkpoint-layout loading, placement (set_placement, state_dict), load recording, replica gradients.

The oracle is a per-token loop written here from the formulas (not the layer's code paths).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_ext.errors import ArgumentError
from moe_ext.moe import ExpertActivation, MoEConfig, MoELayer, load_recording_disabled, select_experts
from moe_ext.testing.distributed import run_distributed

E, K, H, I = 8, 2, 16, 8


def _layer(placement=None, slots=E, top_k=K, **options):
    config = MoEConfig(num_experts=E, top_k=top_k, hidden_size=H, intermediate_size=I, num_physical_experts=slots)
    return MoELayer(config, placement=placement, **options)


def _random_logical(seed, bias=False, shared=0):
    g = torch.Generator().manual_seed(seed)
    weights = dict(gate=torch.randn(E, H, generator=g), gate_proj=torch.randn(E, I, H, generator=g) / 4,
                   up_proj=torch.randn(E, I, H, generator=g) / 4, down_proj=torch.randn(E, H, I, generator=g) / 3)
    if bias:
        weights.update(gate_proj_bias=torch.randn(E, I, generator=g), up_proj_bias=torch.randn(E, I, generator=g),
                       down_proj_bias=torch.randn(E, H, generator=g))
    if shared:
        weights.update(shared_gate=torch.randn(shared, H, generator=g) / 4, shared_up=torch.randn(shared, H, generator=g) / 4,
                       shared_down=torch.randn(H, shared, generator=g) / 3, shared_sigmoid=torch.randn(1, H, generator=g))
    return weights


def _load(layer, weights):
    """Through the checkpoint-layout loader, one expert tensor at a time."""
    layer.weight_loader("router.weight", weights["gate"])
    for expert in range(E):
        for name in ("gate_proj", "up_proj", "down_proj", "gate_proj_bias", "up_proj_bias", "down_proj_bias"):
            if name in weights:
                layer.weight_loader(f"experts.{name}", weights[name][expert], expert)
    if "shared_gate" in weights:
        layer.weight_loader("shared.gate_proj", weights["shared_gate"])
        layer.weight_loader("shared.up_proj", weights["shared_up"])
        layer.weight_loader("shared.down_proj", weights["shared_down"])
        if layer.shared_gate_weight is not None:
            layer.weight_loader("shared.gate", weights["shared_sigmoid"])
    assert layer.missing_weights() == []


def _act(name, gate, up, alpha=1.702, limit=7.0):
    if name == "silu":
        return F.silu(gate) * up
    if name == "gelu":
        return F.gelu(gate) * up
    if name == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if name == "relu":
        return F.relu(gate) * up
    g = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)


def _reference(x, weights, experts, routing_weights, activation="silu", on_input=False):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for expert, weight in zip(experts[t], routing_weights[t]):
            inp = x[t] * weight if on_input else x[t]
            gate = weights["gate_proj"][expert] @ inp + weights.get("gate_proj_bias", torch.zeros(E, I))[expert]
            up = weights["up_proj"][expert] @ inp + weights.get("up_proj_bias", torch.zeros(E, I))[expert]
            y = weights["down_proj"][expert] @ _act(activation, gate, up) \
                + weights.get("down_proj_bias", torch.zeros(E, H))[expert]
            out[t] += y if on_input else weight * y
    if "shared_gate" in weights:
        shared = _act(activation, x @ weights["shared_gate"].t(), x @ weights["shared_up"].t()) @ weights["shared_down"].t()
        out += shared * (torch.sigmoid(x @ weights["shared_sigmoid"].t()) if "sigmoid_gate" in weights else 1)
    return out


# ----------------------------------------------------------------------------- routing options


def test_group_score_is_explicit_and_top2_sum_without_bias_differs_from_max():
    logits = torch.tensor([[5.0, -9.0, 2.0, 2.0]])  # group 0: max 5, top-2 sum -4; group 1: max 2, sum 4
    with pytest.raises(ArgumentError, match="group_score"):
        select_experts(logits, 1, num_expert_group=2, topk_group=1)
    _, by_max = select_experts(logits, 1, scoring="sigmoid", num_expert_group=2, topk_group=1, group_score="max")
    _, by_sum = select_experts(logits, 1, num_expert_group=2, topk_group=1, group_score="top2_sum",
                               scoring="softmax")
    assert by_max.tolist() == [[0]]
    # softmax scores: group 0 = 0.95 + ~0, group 1 = 0.047 * 2: max still prefers group 0; with raw-ish
    # sigmoid scores the top-2 sum prefers group 1 (0.993 + 0.0001 < 0.88 * 2)
    _, sigmoid_sum = select_experts(logits, 1, scoring="sigmoid", num_expert_group=2, topk_group=1,
                                    group_score="top2_sum")
    assert sigmoid_sum.tolist() in ([[2]], [[3]])
    assert by_sum.tolist() == [[0]]


@pytest.mark.parametrize("bad, match", [(dict(scoring="tanh"), "scoring"),
                                        (dict(num_expert_group=3, topk_group=1, group_score="max"), "divide"),
                                        (dict(topk_group=1), "num_expert_group"),
                                        (dict(num_expert_group=2, topk_group=1, group_score="mean"), "group_score")])
def test_bad_routing_options_are_refused_at_construction(bad, match):
    with pytest.raises(ArgumentError, match=match):
        _layer(**bad)
    with pytest.raises(ArgumentError, match="top_k"):
        select_experts(torch.zeros(1, E), E + 1)


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu", "swigluoai"])
@pytest.mark.parametrize("layout, bias", [("concatenated", False), ("interleaved", True)])
def test_expert_mlp_variants_match_the_formulas(activation, layout, bias):
    weights = _random_logical(1, bias=bias)
    layer = _layer(activation=activation, gate_up_layout=layout, expert_bias=bias)
    _load(layer, weights)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(2)) * 3  # large enough to hit the clamps
    routing, experts = layer.select(x)
    expected = _reference(x, weights, experts.tolist(), routing, activation)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@pytest.mark.parametrize("activation", ["gelu", "swigluoai"])
def test_grouped_mm_backend_runs_every_variant_with_biases(activation):
    from moe_ext.moe.comm.base import PermuteResult
    from moe_ext.moe.experts import gated_mlp_loop, run_local_experts

    g = torch.Generator().manual_seed(0)
    act = ExpertActivation(activation, "interleaved")
    rows = torch.randn(24, 16, generator=g).bfloat16()
    counts = torch.tensor([5, 0, 11, 8])
    w13 = (torch.randn(4, 16, 16, generator=g) / 4).bfloat16()
    w2 = (torch.randn(4, 8, 16, generator=g) / 3).bfloat16()
    b13, b2 = (torch.randn(4, 16, generator=g) / 4).bfloat16(), (torch.randn(4, 16, generator=g) / 4).bfloat16()
    try:
        out = run_local_experts(PermuteResult(rows, counts), w13, w2, backend="grouped_mm", activation=act,
                                w13_bias=b13, w2_bias=b2)
    except RuntimeError as error:  # CPU builds without a grouped-mm kernel
        pytest.skip(f"torch._grouped_mm unavailable here: {error}")
    expected = gated_mlp_loop(rows.float(), counts, w13.float(), w2.float(), act, b13.float(), b2.float())
    torch.testing.assert_close(out[:24].float(), expected[:24], atol=0.05, rtol=0.05)


def test_shared_experts_with_sigmoid_gate_and_leading_shape():
    weights = _random_logical(3, shared=12)
    weights["sigmoid_gate"] = True
    layer = _layer(shared_intermediate_size=12, shared_expert_gate=True)
    _load(layer, weights)
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(4))
    y = layer(x)
    assert y.shape == x.shape
    flat = x.reshape(-1, H)
    routing, experts = layer.select(flat)
    torch.testing.assert_close(y.reshape(-1, H), _reference(flat, weights, experts.tolist(), routing),
                               atol=1e-5, rtol=1e-5)


def test_apply_router_weight_on_input_scales_tokens_before_the_experts():
    weights = _random_logical(5)
    layer = _layer(top_k=1, scoring="sigmoid", renormalize=False, apply_router_weight_on_input=True)
    _load(layer, weights)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(6))
    routing, experts = layer.select(x)
    torch.testing.assert_close(layer(x), _reference(x, weights, experts.tolist(), routing, on_input=True),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ArgumentError, match="top_k == 1"):
        _layer(top_k=2, apply_router_weight_on_input=True)


# ----------------------------------------------------------------------------- external routing


def test_external_routing_is_logical_and_mapped_through_the_placement():
    weights = _random_logical(7)
    placement = torch.tensor([3, 0, 1, 2, 7, 6, 5, 4, 0, 3, 3, 1])  # replicas of 0, 1 and 3
    reference_layer, layer = _layer(), _layer(placement=placement, slots=12)
    _load(reference_layer, weights)
    _load(layer, weights)
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(8))
    expected = reference_layer(x)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    logits = layer.router_logits(x)
    torch.testing.assert_close(layer(x, router_logits=logits), expected, atol=1e-6, rtol=1e-6)
    topk_weights, topk_ids = layer.select(x)
    torch.testing.assert_close(layer(x.view(3, 3, H), topk_weights=topk_weights, topk_ids=topk_ids.int()),
                               expected.view(3, 3, H), atol=1e-6, rtol=1e-6)
    # ids from elsewhere: the top-2 of the negated logits
    other = (-logits).topk(K).indices
    other_weights = torch.rand(9, K, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(layer(x, topk_weights=other_weights, topk_ids=other),
                               _reference(x, weights, other.tolist(), other_weights), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(topk_ids=torch.tensor([[0, 8]] * 3), topk_weights=torch.ones(3, 2)), r"\[0, 8\)"),
    (dict(topk_ids=torch.tensor([[0, -1]] * 3), topk_weights=torch.ones(3, 2)), r"\[0, 8\).*-1 padding is not taken by the layer"),
    (dict(topk_ids=torch.zeros(3, 2, dtype=torch.long)), "go together"),
    (dict(topk_ids=torch.zeros(3, 1, dtype=torch.long), topk_weights=torch.ones(3, 1)), r"\[3, 2\]"),
    (dict(router_logits=torch.zeros(3, 8), topk_ids=torch.zeros(3, 2, dtype=torch.long),
          topk_weights=torch.ones(3, 2)), "not both"),
    (dict(router_logits=torch.zeros(3, 7)), r"\[3, 8\]"),
])
def test_bad_external_routing_is_refused_before_any_work(kwargs, match):
    layer = _layer()
    _load(layer, _random_logical(0))
    with pytest.raises(ArgumentError, match=match):
        layer(torch.zeros(3, H), **kwargs)
    with pytest.raises(ArgumentError, match="hidden_states"):
        layer(torch.zeros(3, H + 1))


# ----------------------------------------------------------------------------- loading


def test_weight_loader_fills_every_replica_and_skips_other_experts():
    placement = torch.tensor([2, 2, 0, 1, 3, 4, 5, 6, 7, 2])
    layer = _layer(placement=placement, slots=10)
    weights = _random_logical(11)
    assert layer.weight_loader("experts.down_proj", weights["down_proj"][2], 2) == 3
    assert "expert 2" not in " ".join(layer.missing_weights()) or "down" not in layer.missing_weights()[0]
    for row in (0, 1, 9):
        torch.testing.assert_close(layer.w2[row], weights["down_proj"][2].t(), atol=0, rtol=0)
    fused = torch.cat([weights["gate_proj"], weights["up_proj"]], dim=1)  # [E, 2I, H], all experts
    assert layer.weight_loader("experts.gate_up_proj", fused) == 10
    exported = layer.export_expert_weights()
    torch.testing.assert_close(exported[("up_proj", 5)], weights["up_proj"][5], atol=0, rtol=0)
    interleaved = torch.stack([weights["gate_proj"], weights["up_proj"]], dim=2).flatten(1, 2)  # [E, 2I, H]
    other = _layer(gate_up_layout="interleaved")
    other.weight_loader("experts.gate_up_proj", interleaved.transpose(1, 2), input_major=True,
                        gate_up_layout="interleaved")
    torch.testing.assert_close(other.export_expert_weights()[("gate_proj", 3)], weights["gate_proj"][3], atol=0,
                               rtol=0)
    with pytest.raises(ArgumentError, match=r"experts.down_proj .*\[16, 8\]"):
        layer.weight_loader("experts.down_proj", torch.zeros(8, 16), 1)
    with pytest.raises(ArgumentError, match="expert_bias"):
        layer.weight_loader("experts.down_proj_bias", torch.zeros(16), 1)
    with pytest.raises(ArgumentError, match="expert_id"):
        layer.weight_loader("experts.down_proj", torch.zeros(16, 8), 8)
    with pytest.raises(ArgumentError, match="name must be one of"):
        layer.weight_loader("experts.w1", torch.zeros(8, 16), 1)


# ----------------------------------------------------------------------------- placement, state_dict, loads


def test_set_placement_moves_weights_output_unchanged_bit_for_bit_at_ep1():
    weights = _random_logical(13)
    layer = _layer(placement=torch.arange(10) % E, slots=10)
    _load(layer, weights)
    x = torch.randn(12, H, generator=torch.Generator().manual_seed(14))
    before = layer(x)
    # Same replica counts (0 and 1 twice): every token keeps its replica index, so the output is the same bits.
    permuted = torch.tensor([1, 7, 6, 5, 0, 4, 3, 2, 1, 0])
    layer.set_placement(permuted)
    assert torch.equal(layer.placement, permuted)
    assert torch.equal(layer(x), before)
    # Other replica counts: the rows are exactly those of a layer built under the new placement.
    new = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 7, 7])
    layer.set_placement(new)
    fresh = _layer(placement=new, slots=10)
    _load(fresh, weights)
    for moved, built in zip(layer.expert_weights(), fresh.expert_weights()):
        assert torch.equal(moved, built)
    assert torch.equal(layer(x), fresh(x))
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)
    for bad, match in ((torch.tensor([0] * 10), "missing"), (torch.arange(9), r"shape \(10,\)"),
                       (torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0]), r"\[0, 8\)")):
        with pytest.raises(ArgumentError, match=match):
            layer.set_placement(bad)
        assert torch.equal(layer.placement, new)  # unchanged after a refusal
    with pytest.raises(TypeError):
        layer.set_placement(torch.zeros(10))


def test_state_dict_keeps_the_placement_and_remaps_rows_at_ep1():
    weights = _random_logical(15)
    saved_layer = _layer(placement=torch.tensor([5, 4, 3, 2, 1, 0, 7, 6]))
    _load(saved_layer, weights)
    state = saved_layer.state_dict()
    assert torch.equal(state["placement"], saved_layer.placement)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(16))
    layer = _layer()  # identity placement: the rows are re-ordered on load
    layer.load_state_dict(state)
    assert torch.equal(layer.placement, torch.arange(E))
    torch.testing.assert_close(layer(x), saved_layer(x), atol=1e-6, rtol=1e-6)
    other = _layer(placement=torch.arange(10) % E, slots=10)
    with pytest.raises(RuntimeError, match="another number of physical experts"):
        other.load_state_dict(state)


def test_logical_load_recording_survives_placement_change_and_can_be_disabled():
    from moe_ext.eplb import LoadRecorder

    recorder = LoadRecorder(num_layers=1, num_experts=E, window=4)
    layer = _layer(load_recorder=recorder)
    _load(layer, _random_logical(17))
    x = torch.randn(10, H, generator=torch.Generator().manual_seed(18))
    layer(x)
    recorder.step()
    first = recorder.load()[0].clone()
    _, experts = layer.select(x)
    assert torch.equal(first, torch.bincount(experts.flatten(), minlength=E))
    layer.set_placement(torch.tensor([1, 0, 3, 2, 5, 4, 7, 6]))
    layer(x)
    with load_recording_disabled(layer):
        layer(x)  # not counted
    recorder.step()
    assert torch.equal(recorder.load()[0], 2 * first)  # same logical counts under the new placement
    assert torch.equal(layer.last_expert_load, first)


def test_sum_replica_gradients_gives_each_replica_the_experts_gradient():
    weights = _random_logical(19)
    placement = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 5, 5])
    layer, reference = _layer(placement=placement, slots=12), _layer()
    _load(layer, weights)
    _load(reference, weights)
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(20))
    layer(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert not torch.allclose(layer.w13.grad[0], layer.w13.grad[8])  # replicas saw different tokens
    layer.sum_replica_gradients()
    for row, expert in enumerate(placement.tolist()):
        torch.testing.assert_close(layer.w13.grad[row], reference.w13.grad[expert], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.w2.grad[row], reference.w2.grad[expert], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- EP 2 on gloo: EPLB end to end


def _eplb_end_to_end(rank, world_size):
    from moe_ext.eplb import LoadRecorder, plan_placement
    from moe_ext.moe import make_moe_groups

    groups = make_moe_groups(world_size, 1)
    slots = 12
    config = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, num_physical_experts=slots,
                       **groups)
    recorder = LoadRecorder(num_layers=1, num_experts=E, window=2, group=groups["dp_group"])
    start = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3])
    layer = MoELayer(config, placement=start, load_recorder=recorder, comm_method="alltoall")
    weights = _random_logical(21)
    _load(layer, weights)
    x = torch.randn(10, H, generator=torch.Generator().manual_seed(22 + rank)) + 2 * (rank == 0)
    before = layer(x)
    recorder.step()
    plan = plan_placement(recorder.load().float(), slots, 1, 1, world_size)
    new = plan.phy2log[0].clone()
    state = {key: value.clone() for key, value in layer.state_dict().items()}  # a saved copy (state_dict aliases)
    layer.set_placement(new)  # moves the rows over gloo, then switches routing
    assert torch.equal(layer.placement, new)
    after = layer(x)
    # Bit for bit what a layer built under the new placement computes (its rows loaded from the checkpoint);
    # against the old placement only to rounding: replica counts changed, so tokens form other row groups.
    built = MoELayer(config, placement=new, comm_method="alltoall")
    _load(built, weights)
    for moved, loaded in zip(layer.expert_weights(), built.expert_weights()):
        assert torch.equal(moved, loaded)
    assert torch.equal(after, built(x))
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    # a state_dict saved under the old placement: refused when this rank's experts are not in it
    fresh = MoELayer(config, placement=new, comm_method="alltoall")
    saved_experts = set(start[layer.local_slots].tolist())
    needed = set(new[layer.local_slots].tolist())
    if needed <= saved_experts:
        fresh.load_state_dict(state)
    else:
        with pytest.raises(RuntimeError, match="saved under another placement"):
            fresh.load_state_dict(state)
        fresh.set_placement(state["placement"], move_weights=False)
        fresh.load_state_dict(state)
        fresh.set_placement(new)
    return bool(torch.equal(fresh(x), after)), needed <= saved_experts


def test_eplb_end_to_end_on_two_ranks_output_unchanged_bit_for_bit():
    results = run_distributed(_eplb_end_to_end, 2, timeout=300)
    assert all(same for same, _ in results), results
    assert any(not remappable for _, remappable in results)  # the refusal path ran on some rank
