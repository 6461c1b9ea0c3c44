"""MoELayer against torchtitan 0.3.0's MoE module (router, token dispatcher, shared experts), fp32, to 1e-5.

torchtitan is a test requirement installed without its dependencies (pyproject
``[tool.moe_ext] test-without-deps``; scripts/run_tests.sh). Three torchtitan
router configs (grouped top-2-sum scoring with and without the load-balancing
bias, plain softmax top-k), weights loaded through ``MoELayer.weight_loader``.
In-process: forward and backward of every config. Gloo EP 2: every config with
every comm method that has a backward (allgather, native_allgather, alltoall),
with a rank holding zero tokens and with replicated experts; MC2 is
forward-only and emulated, so it is not in this matrix. See
tests/torchtitan_moe_cases.py for why the fp32 cases use an fp32 expert forward;
the unmodified (bf16 experts) module is compared at bf16 tolerance.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("torchtitan.models.common.moe",
                    reason="torchtitan 0.3 is a test requirement: bash scripts/run_tests.sh installs it")

from torchtitan_moe_cases import (CONFIGS, HIDDEN, TOLERANCE, expert_grads, make_layer, make_module,  # noqa: E402
                                  module_forward, replicated_grads, run_ep_cases)
from moe_ext.testing.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # torchtitan's fp32 autocast on CPU


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_single_process_forward_and_backward_match_torchtitan(name):
    module = make_module(name, seed=21)
    layer = make_layer(name, module)
    x = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)  # [B, L, D] in, same shape out
    y_ref = module(x_ref)
    assert y.shape == y_ref.shape == x.shape
    torch.testing.assert_close(y, y_ref, **TOLERANCE)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    (y * grad).sum().backward()
    (y_ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCE)
    expected = expert_grads(module)
    exported = layer.export_expert_weights(grads=True)
    assert set(exported) == set(expected)
    for key, value in exported.items():
        torch.testing.assert_close(value, expected[key], **TOLERANCE, msg=lambda m: f"grad {key}: {m}")
    for label, value, reference in replicated_grads(module, layer):
        torch.testing.assert_close(value, reference, **TOLERANCE, msg=lambda m: f"grad {label}: {m}")


def test_grouped_scoring_is_top2_sum_as_torchtitan():
    """Without a bias, the layer with group_score='max' routes differently from torchtitan on this input."""
    from moe_ext.moe import MoEConfig, MoELayer
    from torchtitan_moe_cases import layer_options, load_torchtitan_moe

    module = make_module("grouped_softmax_nobias", seed=5)
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(6))
    expected = module_forward(module, x).detach()
    sizes, options = layer_options("grouped_softmax_nobias")
    wrong = MoELayer(MoEConfig(**sizes), **dict(options, group_score="max"))
    load_torchtitan_moe(wrong, module)
    assert not torch.allclose(wrong(x), expected, atol=1e-3)
    right = make_layer("grouped_softmax_nobias", module)
    torch.testing.assert_close(right(x), expected, **TOLERANCE)


def test_unmodified_bf16_module_matches_at_bf16_tolerance():
    """torchtitan's own GroupedExperts (bf16 matmuls) against the fp32 layer: the difference is bf16 rounding."""
    for name in sorted(CONFIGS):
        module = make_module(name, seed=8, float32_experts=False)
        layer = make_layer(name, module)
        x = torch.randn(1, 12, HIDDEN, generator=torch.Generator().manual_seed(9))
        y, y_ref = layer(x), module(x)
        assert y_ref.dtype == torch.float32
        torch.testing.assert_close(y, y_ref, atol=3e-2, rtol=3e-2, msg=lambda m: f"{name}: {m}")


def _ep_cases():
    """Every config with every backward-capable method (9 small cases: the whole matrix runs in CI)."""
    methods = ("allgather", "native_allgather", "alltoall")
    splits = ([5, 0], [0, 4], [3, 6])
    cases = []
    for index, (name, method) in enumerate(itertools.product(sorted(CONFIGS), methods)):
        cases.append((name, method, list(splits[index % len(splits)]), 2 * (index % 2), 300 + index))
    assert sum(0 in case[2] for case in cases) >= 6 and any(case[3] for case in cases)
    return cases


def test_expert_parallel_2_matches_torchtitan_on_gloo():
    cases = _ep_cases()
    checks = run_distributed(run_ep_cases, 2, cases, timeout=300)
    assert checks == [len(cases)] * 2
