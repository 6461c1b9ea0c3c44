"""The NPU path of the aligned and fp8 permute (issue 20, item 7) under the torch_npu emulation.

``npu_moe_init_routing_v2`` has no alignment and no block scales; moe_ext.platform.npu.init_routing
composes them (see its docstring). Checked here against moe_ext's own CPU moe_permute, which is
checked against the plain-torch reference in test_routing_aligned_fp8.py. What is verified: the
composition under the emulation, which follows the operator's documentation (and torch_npu's meta
function for the shapes); not the hardware.
"""

from __future__ import annotations

import pytest
import torch

from moe_ext.ops import moe_permute
from moe_ext.platform import npu as npu_adapter
from moe_ext.testing.npu import EmulatedTorchNpu, emulated_runtime

FP8 = torch.float8_e4m3fn


def bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


@pytest.mark.parametrize("alignment", [1, 8, 128])
@pytest.mark.parametrize("kind", [None, "token1d", "token2d", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_init_routing_variants_match_moe_permute(alignment, kind, dtype):
    generator = torch.Generator().manual_seed(alignment + 7 * (kind is None))
    num_tokens, topk, num_experts, hidden_size = 37, 4, 16, 300
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:topk] for _ in range(num_tokens)])
    ids = ids.to(torch.int32)
    ids[3, 1] = -1  # a padding slot: dropped ("no expert") on both paths
    hidden = (torch.randn(num_tokens, hidden_size, generator=generator) * 3).to(dtype)
    scales = None
    if kind is not None:
        shape = {"token1d": (num_tokens,), "token2d": (num_tokens, 1), "block": (num_tokens, 3)}[kind]
        scales = torch.rand(shape, generator=generator) + 0.5
    active = (4, 12)
    want = moe_permute(hidden, ids, num_experts=num_experts, active_expert_range=active, alignment=alignment,
                       scales=scales)
    got = npu_adapter.init_routing(emulated_runtime(), hidden, ids, num_experts, active, alignment=alignment,
                                   scales=scales)
    permuted, expanded_row_idx, expert_tokens = got  # three-field unpacking, as the comm methods do
    assert permuted.shape == want.permuted.shape and permuted.dtype == dtype
    assert torch.equal(expanded_row_idx, want.expanded_row_idx)
    assert torch.equal(expert_tokens, want.expert_tokens)
    assert torch.equal(got.expert_tokens_unpadded, want.expert_tokens_unpadded)
    total = int(want.expert_tokens.sum())
    assert torch.equal(bits(permuted[:total]), bits(want.permuted[:total]))  # pad rows zero on both
    if scales is None:
        assert got.permuted_scales is None
    else:
        assert got.permuted_scales.shape == want.permuted_scales.shape
        assert torch.equal(got.permuted_scales[:total], want.permuted_scales[:total])


def test_per_token_scale_uses_the_operators_scale_input():
    ops = EmulatedTorchNpu()
    x = torch.arange(3, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    ids = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.int32)
    scale = torch.tensor([10.0, 20.0, 30.0])
    _, row_idx, _, expanded_scale = ops.npu_moe_init_routing_v2(
        x, ids, scale=scale, active_num=6, expert_num=2, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        quant_mode=-1)
    assert expanded_scale.shape == (6,)  # torch_npu's meta: [expanded rows]
    for f, row in enumerate(row_idx.tolist()):
        assert expanded_scale[row] == scale[f // 2]
    with pytest.raises(ValueError, match=r"scale must be 1-D \(NUM_ROWS,\)"):
        ops.npu_moe_init_routing_v2(x, ids, scale=scale[:, None].repeat(1, 2), active_num=6, expert_num=2,
                                    expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1)


def test_init_routing_refuses_what_moe_permute_refuses():
    runtime = emulated_runtime()
    hidden, ids = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="alignment must be >= 1"):
        npu_adapter.init_routing(runtime, hidden, ids, 4, (0, 4), alignment=0)
    with pytest.raises(ValueError, match=r"scales must be \[T\] or \[T, 1\]"):
        npu_adapter.init_routing(runtime, hidden, ids, 4, (0, 4), scales=torch.ones(4, 5))
