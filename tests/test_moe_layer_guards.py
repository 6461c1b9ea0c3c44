"""MoELayer refusals that must reach every rank, and a layer that was never loaded.

- bad external routing arguments (router_logits / topk_weights / topk_ids: shape,
  dtype, range, pairing) on one rank of a gloo pair: both ranks raise (the bad
  rank its own error naming the argument, the other that a peer refused), nobody
  waits in a collective, and the next good forward still works;
- a layer whose experts or router were never written refuses to run, naming the
  missing experts and the loaders (also when only one rank of two is unloaded);
  the Hugging Face loader reports what it did not load;
- ``set_placement`` with different placements on the ranks (``move_weights``
  False or True), or a bad one on a single rank: every rank raises, the placement
  is unchanged everywhere.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moe_ext.errors import ArgumentError
from moe_ext.moe import MoEConfig, MoELayer
from moe_ext.testing.distributed import run_distributed

E, K, H, I = 8, 2, 16, 8


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, H, generator=g), torch.randn(E, H, 2 * I, generator=g) / 4, torch.randn(E, I, H, generator=g) / 3


def _loaded(config, **options):
    layer = MoELayer(config, **options)
    layer.load_logical_weights(*_weights())
    return layer


# ---------------------------------------------------------------------------------- one process

def test_never_loaded_layer_refuses_naming_experts_and_loaders():
    layer = MoELayer(MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I))
    x = torch.randn(3, H)
    with pytest.raises(ArgumentError) as error:
        layer(x)
    text = str(error.value)
    assert "never loaded" in text and "expert 0" in text and "router.weight" in text
    assert "load_hf_moe_weights" in text and "reset_parameters" in text
    layer.reset_parameters()  # random init (training from scratch) makes it runnable
    assert layer(x).shape == x.shape and torch.isfinite(layer(x)).all()


def test_partly_loaded_layer_names_the_missing_expert():
    layer = MoELayer(MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I))
    gate, w13, w2 = _weights()
    layer.weight_loader("router.weight", gate)
    for expert in range(E):
        if expert != 5:
            layer.weight_loader("experts.gate_up_proj", w13[expert].t(), expert)
        layer.weight_loader("experts.down_proj", w2[expert].t(), expert)
    with pytest.raises(ArgumentError, match=r"expert 5 \(slot row 5\): gate, up"):
        layer(torch.randn(2, H))
    layer.weight_loader("experts.gate_up_proj", w13[5].t(), 5)
    torch.testing.assert_close(layer(torch.randn(2, H)).shape, torch.Size([2, H]))


def test_direct_parameter_writes_and_state_dict_count_as_loaded():
    config = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)
    layer = MoELayer(config)
    gate, w13, w2 = _weights()
    with torch.no_grad():  # an in-place write to the parameter is seen (its version counter moves)
        layer.gate_weight.copy_(gate)
        layer.w13.copy_(w13)
        layer.w2.copy_(w2)
    x = torch.randn(4, H)
    expected = layer(x)
    fresh = MoELayer(config)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)


def test_hf_loader_reports_what_it_did_not_load():
    transformers = pytest.importorskip("transformers")
    from hf_moe_cases import make_block

    from moe_ext.moe.hf import load_hf_moe_weights, moe_layer_arguments

    block, cfg = make_block("qwen3_moe", seed=1)
    sizes, options = moe_layer_arguments(cfg)
    layer = MoELayer(MoEConfig(**sizes), **options)
    state = {f"model.layers.0.mlp.{name}": value for name, value in block.state_dict().items()}
    with pytest.warns(UserWarning, match="no qwen3_moe MoE block tensor under prefix"):
        report = load_hf_moe_weights(layer, "qwen3_moe", state, prefix="model.layers.0.moe.", strict=False)
    assert not report.loaded and len(report.ignored) == len(state) and report.missing
    with pytest.raises(ArgumentError, match="never loaded"):  # a wrong prefix no longer gives silent zeros
        layer(torch.randn(2, sizes["hidden_size"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_hf_moe_weights(layer, "qwen3_moe", state, prefix="model.layers.0.mlp.", strict=False)
    assert report.loaded and not report.missing
    assert layer(torch.randn(2, sizes["hidden_size"])).shape == (2, sizes["hidden_size"])


# ---------------------------------------------------------------------------------- two ranks

BAD_ROUTING = {
    "topk_ids out of range": lambda t: dict(topk_weights=torch.rand(t, K), topk_ids=torch.full((t, K), E)),
    "topk_ids wrong shape": lambda t: dict(topk_weights=torch.rand(t, K), topk_ids=torch.zeros(t, K + 1, dtype=torch.long)),
    "topk_ids float": lambda t: dict(topk_weights=torch.rand(t, K), topk_ids=torch.zeros(t, K)),
    "topk_weights int": lambda t: dict(topk_weights=torch.ones(t, K, dtype=torch.long),
                                       topk_ids=torch.zeros(t, K, dtype=torch.long)),
    "topk_ids alone": lambda t: dict(topk_ids=torch.zeros(t, K, dtype=torch.long)),
    "router_logits int": lambda t: dict(router_logits=torch.zeros(t, E, dtype=torch.long)),
    "router_logits wrong shape": lambda t: dict(router_logits=torch.zeros(t, E - 1)),
    "both router_logits and topk": lambda t: dict(router_logits=torch.zeros(t, E), topk_weights=torch.rand(t, K),
                                                  topk_ids=torch.zeros(t, K, dtype=torch.long)),
}
ARGUMENT_OF = {"topk_ids out of range": "topk_ids", "topk_ids wrong shape": "topk_ids", "topk_ids float": "topk_ids",
               "topk_weights int": "topk_weights", "topk_ids alone": "topk_weights and topk_ids",
               "router_logits int": "router_logits", "router_logits wrong shape": "router_logits",
               "both router_logits and topk": "router_logits or topk_weights"}


def _two_rank_refusals(rank, world_size, method):
    from moe_ext.moe import make_moe_groups

    config = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                       **make_moe_groups(world_size, 1))
    layer = _loaded(config, comm_method=method)
    tokens = 3 + rank
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(rank))
    good = dict(topk_weights=torch.rand(tokens, K), topk_ids=torch.randint(0, E, (tokens, K)))
    messages = {}
    for case, make in BAD_ROUTING.items():
        arguments = make(tokens) if rank == 1 else good
        with pytest.raises(ArgumentError) as error:
            layer(x, **arguments)
        messages[case] = str(error.value)
        layer(x, **good)  # the ranks are still in step: the next forward runs
    # a layer never loaded on rank 1 only
    fresh = MoELayer(config, comm_method=method)
    if rank == 0:
        fresh.load_logical_weights(*_weights())
    with pytest.raises(ArgumentError) as error:
        fresh(x)
    messages["unloaded"] = str(error.value)
    return messages


@pytest.mark.parametrize("method", ["allgather", "alltoall"])
def test_bad_routing_on_one_rank_raises_on_both(method):
    results = run_distributed(_two_rank_refusals, 2, method, timeout=90)
    for case, argument in ARGUMENT_OF.items():
        assert argument in results[1][case], (case, results[1][case])
        assert "another rank of the EP group refused" in results[0][case], (case, results[0][case])
    assert "never loaded" in results[1]["unloaded"] and "another rank" in results[0]["unloaded"]


def _placement_agreement(rank, world_size):
    from moe_ext.moe import make_moe_groups

    config = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, num_physical_experts=E + 2,
                       **make_moe_groups(world_size, 1))
    start = torch.cat([torch.arange(E), torch.tensor([0, 1])])
    layer = MoELayer(config, placement=start)
    layer.load_logical_weights(*_weights())
    outcomes = []
    other = torch.cat([torch.arange(E).flip(0), torch.tensor([2, 3])])
    for move in (False, True):
        # rank 1 differs in two slots
        mine = other.clone() if rank == 0 else torch.cat([torch.arange(E).flip(0), torch.tensor([4, 5])])
        with pytest.raises(ArgumentError) as error:
            layer.set_placement(mine, move_weights=move)
        outcomes.append(str(error.value))
        assert torch.equal(layer.placement.cpu(), start)
        # rank 1 passes something that is not a placement at all
        bad = other if rank == 0 else torch.arange(E)  # wrong length
        with pytest.raises(ArgumentError) as error:
            layer.set_placement(bad, move_weights=move)
        outcomes.append(str(error.value))
        assert torch.equal(layer.placement.cpu(), start)
    layer.set_placement(other)  # the same on both: applied
    assert torch.equal(layer.placement.cpu(), other)
    return outcomes


def test_set_placement_checks_that_every_rank_passed_the_same():
    results = run_distributed(_placement_agreement, 2, timeout=90)
    for rank in (0, 1):
        differ_false, bad_false, differ_true, bad_true = results[rank]
        for text in (differ_false, differ_true):
            assert "different placements" in text and "[8, 9]" in text
        if rank == 1:
            assert "shape" in bad_false and "shape" in bad_true
        else:
            assert "another rank" in bad_false and "another rank" in bad_true
