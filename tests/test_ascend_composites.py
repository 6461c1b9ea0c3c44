"""The NPU-key composite of moe_permute_padded (moe_ext._npu_composites), on CPU.

The composite is what ``torch.ops.moe_ext.moe_permute_padded`` runs on an NPU
tensor when _C_npu.so is loaded (there is no AscendC kernel for it). It is
device-agnostic, so it is checked here on CPU tensors against the CPU kernel:
same expanded_row_idx, counts (padded and unpadded, plain and cumsum), rows and
scales up to the padded total (the pad rows zero). Never run on an NPU.
"""
import pytest
import torch

import moe_ext  # noqa: F401  (loads the op libraries)
from moe_ext import _npu_composites
from moe_ext.errors import ArgumentError


def _case(seed, tokens, topk, experts, dtype, scales_shape, start, end, with_map, alignment, cumsum):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, experts, (tokens, topk), generator=g)
    hidden = torch.randn(tokens, 40, generator=g).to(dtype)
    scales = None
    if scales_shape == "token":
        scales = torch.rand(tokens, generator=g)
    elif scales_shape == "blocks":
        scales = torch.rand(tokens, 1, generator=g)
    expert_map = None
    if with_map:
        expert_map = torch.tensor([i // 2 if i % 3 else -1 for i in range(experts)], dtype=torch.int32)
    args = (hidden, scales, ids, experts, start, end, expert_map, cumsum, alignment)
    return args


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alignment", [1, 8, 16])
def test_composite_matches_the_cpu_kernel(seed, alignment):
    dtype = [torch.float32, torch.bfloat16, torch.float8_e4m3fn][seed % 3]
    tokens = [0, 1, 37, 64, 5, 12][seed]
    args = _case(seed, tokens, 4, 16, dtype, ["token", None, "blocks"][seed % 3], seed % 3, 12 - seed % 2,
                 seed % 2 == 1, alignment, seed % 2 == 0)
    got = _npu_composites.moe_permute_padded(*args)
    want = torch.ops.moe_ext.moe_permute_padded(*args)
    assert torch.equal(got[2], want[2])  # expanded_row_idx
    assert torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])  # counts
    total = int((want[3][-1] if args[7] else want[3].sum()).item()) if want[3].numel() else 0
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    assert torch.equal(got[0][:total].view(torch.uint8), want[0][:total].view(torch.uint8))
    assert got[1].shape == want[1].shape
    if args[1] is not None:
        assert torch.equal(got[1][:total], want[1][:total])


def test_composite_refuses_what_the_kernel_refuses():
    hidden, ids = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ArgumentError):
        _npu_composites.moe_permute_padded(hidden, None, ids, 4, 0, 4, None, False, 0)
    with pytest.raises(TypeError):
        _npu_composites.moe_permute_padded(hidden, torch.ones(4, dtype=torch.float16), ids, 4, 0, 4, None, False, 8)


def test_register_puts_the_composite_on_the_npu_key():
    _npu_composites.register()
    _npu_composites.register()  # idempotent: the loader may run once per process only, but be safe
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moe_ext::moe_permute_padded", "PrivateUse1")
