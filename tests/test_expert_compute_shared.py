"""parallel.GroupedExperts runs moe.experts' loop and torch._grouped_mm path (one implementation, two layouts).

The references below are GroupedExperts' computation as it was written before
it reused moe.experts (seed layout: w1/w3 [E, hidden, dim], w2 [E, dim,
hidden]); the shared implementation must give the same bits, forward and
backward, on both paths. torch._grouped_mm runs on CPU in the torch this
project tests with, so its path is checked here too (GroupedExperts itself
takes it only on CUDA sm90+: the device test is patched out).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_ext.errors import ArgumentError
from moe_ext.moe.experts import SWIGLU, ExpertActivation, gated_mlp_grouped_mm, gated_mlp_loop, grouped_mm_applies
from moe_ext.parallel import expert_parallel
from moe_ext.parallel.expert_parallel import GroupedExperts

COUNTS = [3, 0, 5, 2]  # an expert without rows, and 2 rows past the last group
ROWS = sum(COUNTS) + 2


def _seed_loop(x, counts, w1, w2, w3):
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        rows = x[start:start + count]
        pieces.append((F.silu(rows @ w1[expert].t()) * (rows @ w3[expert].t())) @ w2[expert].t())
        start += count
    pieces.append(x.new_zeros((x.shape[0] - start, w2.shape[1])))
    return torch.cat(pieces)


def _seed_grouped_mm(x, counts, w1, w2, w3):
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    gate = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets)
    up = torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
    out = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)
    rows = torch.arange(x.shape[0])
    return torch.where((rows < offsets[-1]).unsqueeze(1), out, out.new_zeros(()))


def _run(fn, module, x, counts, grad):
    leaves = [x.detach().clone().requires_grad_(True)] + [p.detach().clone().requires_grad_(True)
                                                          for p in (module.w1, module.w2, module.w3)]
    out = fn(leaves[0], counts, *leaves[1:])
    (out.float() * grad).sum().backward()
    return [out] + [t.grad for t in leaves]


def _compare(path, dtype, monkeypatch):
    torch.manual_seed(5)
    dim, hidden = 16, 24  # multiples of 8: the grouped-mm rule
    module = GroupedExperts(dim, hidden, len(COUNTS), dtype=dtype)
    x = torch.randn(ROWS, dim).to(dtype)
    counts = torch.tensor(COUNTS)
    grad = torch.randn(ROWS, dim)
    if path == "grouped_mm":
        monkeypatch.setattr(expert_parallel, "_grouped_mm_usable", lambda x, w13, w2: grouped_mm_applies(x, w13, w2))
        seed = _seed_grouped_mm
    else:
        seed = lambda x, counts, w1, w2, w3: _seed_loop(x, counts.tolist(), w1, w2, w3)  # noqa: E731
    want = _run(seed, module, x, counts, grad)
    leaves = [x.detach().clone().requires_grad_(True)]
    module.w1, module.w2, module.w3 = (torch.nn.Parameter(module.w1.detach().clone()),
                                       torch.nn.Parameter(module.w2.detach().clone()),
                                       torch.nn.Parameter(module.w3.detach().clone()))
    got_out = module(leaves[0], counts)
    (got_out.float() * grad).sum().backward()
    got = [got_out, leaves[0].grad, module.w1.grad, module.w2.grad, module.w3.grad]
    if path == "grouped_mm":  # _grouped_mm's backward leaves the grad of rows past the groups unwritten, before too
        got[1], want[1] = got[1][:sum(COUNTS)], want[1][:sum(COUNTS)]
    for name, a, b in zip(("out", "grad x", "grad w1", "grad w2", "grad w3"), got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{path} {dtype} {name}: {m}")
    assert int(torch.count_nonzero(got_out[sum(COUNTS):])) == 0  # rows past the groups are zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grouped_experts_loop_is_bitwise_the_seed_computation(dtype, monkeypatch):
    _compare("loop", dtype, monkeypatch)


def test_grouped_experts_grouped_mm_is_bitwise_the_seed_computation(monkeypatch):
    _compare("grouped_mm", torch.bfloat16, monkeypatch)


def test_split_first_projection_matches_the_concatenated_one():
    torch.manual_seed(6)
    hidden, inter = 16, 8
    x = torch.randn(ROWS, hidden)
    counts = torch.tensor(COUNTS)
    gate_w, up_w = torch.randn(4, hidden, inter), torch.randn(4, hidden, inter)
    w2 = torch.randn(4, inter, hidden)
    for activation in (SWIGLU, ExpertActivation("gelu_tanh"), ExpertActivation("swigluoai")):
        concatenated = gated_mlp_loop(x, counts, torch.cat([gate_w, up_w], dim=2), w2, activation)
        split = gated_mlp_loop(x, counts, (gate_w, up_w), w2, activation)
        torch.testing.assert_close(split, concatenated, atol=1e-5, rtol=1e-5)
    rows = x.bfloat16()
    pair, w2b = (gate_w.bfloat16(), up_w.bfloat16()), w2.bfloat16()
    assert grouped_mm_applies(rows, pair, w2b) and not grouped_mm_applies(rows, (pair[0][..., :7], pair[1]), w2b)
    grouped = gated_mlp_grouped_mm(rows, counts, pair, w2b)
    torch.testing.assert_close(grouped[:sum(COUNTS)], gated_mlp_loop(rows, counts, pair, w2b)[:sum(COUNTS)],
                               atol=0, rtol=0)


def test_split_first_projection_refuses_a_bias_or_a_third_tensor():
    x, counts = torch.randn(3, 4), torch.tensor([3])
    pair, w2 = (torch.randn(1, 4, 2), torch.randn(1, 4, 2)), torch.randn(1, 2, 4)
    with pytest.raises(ArgumentError, match=r"gated_mlp_loop: a split first projection is a \(w_gate, w_up\) pair "
                                            r"without w13_bias, got 2 tensors and a w13_bias"):
        gated_mlp_loop(x, counts, pair, w2, w13_bias=torch.zeros(1, 4))
    with pytest.raises(ArgumentError, match="got 3 tensors"):
        gated_mlp_grouped_mm(x, counts, pair + (pair[0],), w2)
