"""The CUDA permute's kernel choice and the one-launch kernel (csrc/cuda/routing_permute_onepass.cu,
issue 20 items 3-5).

The one-launch kernel takes the plain op at 1025-2048 routed rows and the padded op (alignment and/or
scales) at <= 8192 rows or at most 1/8 of the experts local (routing_geometry.h onepass_preferred, which
tests/cpp/test_routing_geometry.cpp checks on the CPU); the other shapes keep the fused decode or the
multi-launch kernels. Shapes on both sides of every boundary and the one-launch kernel's own edges (several
slices a block, slices that end mid-warp, the widest range, K = 32, odd row sizes) are compared with the
reference bit for bit: expanded_row_idx, both count forms, every row up to the (padded) valid count, pad rows
zero, scale rows. CUDA-graph capture replays with new ids; a bad id still stops with a device-side assert.
"""

from __future__ import annotations

import pytest
import torch

from device_assert import assert_stops_with_device_assert
from moe_ext.ops import moe_permute
from test_routing_aligned_fp8 import FP8, check_against_reference, hidden_rows, routing, scale_rows

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (tokens, K, experts, active range, hidden size, dtype); rows = tokens * K.
PLAIN_CASES = [
    (128, 8, 256, None, 64, torch.bfloat16),          # 1024 rows: the fused decode kernel
    (129, 8, 256, None, 64, torch.bfloat16),          # 1032 rows: one-launch
    (256, 8, 256, None, 64, torch.bfloat16),          # 2048 rows (decode T=256): one-launch, 8 slices
    (256, 8, 256, (0, 32), 40, torch.float16),        # EP 8; 80-byte rows (8-byte units)
    (256, 8, 256, (224, 256), 16, torch.float32),      # the last rank
    (683, 3, 17, (3, 11), 3, torch.float16),           # 2049 rows: multi-launch; 6-byte rows
    (682, 3, 17, (3, 11), 3, torch.float16),           # 2046 rows, slices ending mid-warp; 2-byte units
    (400, 5, 1024, None, 5, torch.float32),            # the widest range the one-launch kernel takes
    (400, 5, 1025, None, 5, torch.float32),            # one more: the multi-launch path
    (64, 32, 64, (8, 40), 8, torch.bfloat16),          # K = 32
    (40, 33, 64, None, 8, torch.bfloat16),             # K = 33: the multi-launch path
    (2048, 1, 4, None, 2, torch.bfloat16),             # K = 1
    (8192, 8, 256, (40, 48), 16, torch.float32),      # large (multi-launch), EP 32
    (4096, 2, 64, None, 128, torch.bfloat16),         # large (multi-launch), K=2
]


@pytest.mark.parametrize("case", range(len(PLAIN_CASES)))
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_plain_permute_matches_the_reference(case, ids_dtype):
    num_tokens, topk, num_experts, active, hidden_size, dtype = PLAIN_CASES[case]
    generator = torch.Generator().manual_seed(100 + case)
    ids = routing(generator, num_tokens, topk, num_experts, pad_fraction=0.05).to(ids_dtype)
    hidden = hidden_rows(generator, num_tokens, hidden_size, dtype)
    for counts in ("count", "cumsum"):
        check_against_reference("cuda", hidden, ids, num_experts, active=active, counts=counts)


@pytest.mark.parametrize("map_dtype", [torch.int32, torch.int64])
def test_expert_map_and_skew(map_dtype):
    # A map that drops a quarter of the experts, and a routing where most rows go to one expert.
    generator = torch.Generator().manual_seed(7)
    num_tokens, topk, num_experts = 500, 4, 64  # 2000 rows: one-launch for both ops
    ids = routing(generator, num_tokens, topk, num_experts, pad_fraction=0.1)
    ids[: num_tokens // 2, 0] = 5
    expert_map = torch.randperm(num_experts, generator=generator).to(map_dtype) % 48
    expert_map[torch.rand(num_experts, generator=generator) < 0.25] = -1
    hidden = hidden_rows(generator, num_tokens, 24, torch.bfloat16)
    check_against_reference("cuda", hidden, ids, num_experts, active=(8, 40), expert_map=expert_map)
    check_against_reference("cuda", hidden, ids, num_experts, active=(8, 40), expert_map=expert_map,
                            alignment=16, counts="cumsum")


def test_every_row_to_one_expert():
    generator = torch.Generator().manual_seed(8)
    ids = torch.full((256, 8), 3, dtype=torch.int32)
    hidden = hidden_rows(generator, 256, 8, torch.float32)
    check_against_reference("cuda", hidden, ids, 8)
    check_against_reference("cuda", hidden, ids, 8, alignment=128)


PADDED_CASES = [
    # (tokens, K, experts, active, hidden, dtype, alignment, scales)
    (8192, 8, 256, None, 256, torch.bfloat16, 128, None),  # without EP at T=8192: multi-launch
    (8192, 8, 256, (0, 32), 256, FP8, 128, "block"),      # EP 8: one-launch, 64 slices
    (8192, 8, 256, (0, 32), 256, FP8, 1, "block"),        # fp8 + scales without alignment
    (8192, 8, 256, (0, 64), 64, torch.bfloat16, 16, None),  # EP 4: multi-launch
    (256, 8, 256, (0, 32), 512, FP8, 128, "block"),        # the decode row
    (16, 8, 256, None, 64, torch.bfloat16, 8, "token1d"),
    (2730, 3, 17, (3, 11), 300, FP8, 3, "block"),           # 8190 rows: partial last scale block, odd alignment
    (1000, 4, 32, None, 16, torch.float32, 300001, "token2d"),  # more pad rows than blocks
    (600, 5, 1025, None, 8, torch.bfloat16, 16, None),      # past the widest range: the multi-launch path
    (300000, 8, 256, (0, 8), 2, torch.float32, 4, None),    # 586 slices: more than resident blocks
]


@pytest.mark.parametrize("case", range(len(PADDED_CASES)))
def test_padded_permute_matches_the_reference(case):
    num_tokens, topk, num_experts, active, hidden_size, dtype, alignment, kind = PADDED_CASES[case]
    generator = torch.Generator().manual_seed(200 + case)
    ids = routing(generator, num_tokens, topk, num_experts, pad_fraction=0.05)
    hidden = hidden_rows(generator, num_tokens, hidden_size, dtype)
    scales = scale_rows(generator, num_tokens, hidden_size, kind)
    for counts in ("count", "cumsum"):
        check_against_reference("cuda", hidden, ids, num_experts, active=active, counts=counts,
                                alignment=alignment, scales=scales)


def test_index_only_rows():
    # H = 0 (the benchmark's index-only rows): indices and counts, no copy.
    generator = torch.Generator().manual_seed(9)
    ids = routing(generator, 256, 8, 256)
    hidden = torch.empty(256, 0, dtype=torch.bfloat16)
    check_against_reference("cuda", hidden, ids, 256, active=(32, 64))


@pytest.mark.parametrize("alignment", [1, 64])
def test_cuda_graph_capture_and_replay(alignment):
    generator = torch.Generator().manual_seed(10)
    num_tokens, topk, num_experts = 256, 8, 64  # 2048 rows: one-launch for both ops
    hidden = hidden_rows(generator, num_tokens, 64, torch.bfloat16).cuda()
    ids = routing(generator, num_tokens, topk, num_experts).cuda()
    scales = (torch.rand(num_tokens, 1, generator=generator) + 0.5).cuda() if alignment > 1 else None

    def step():
        out = moe_permute(hidden, ids, num_experts=num_experts, active_expert_range=(16, 48), alignment=alignment,
                          scales=scales)
        return out.permuted, out.expanded_row_idx, out.expert_tokens, out.expert_tokens_unpadded, out.permuted_scales

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    ids.copy_(routing(generator, num_tokens, topk, num_experts, pad_fraction=0.2).cuda())
    hidden.copy_(hidden_rows(generator, num_tokens, 64, torch.bfloat16).cuda())
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    total = int(want[2].sum())
    assert total > 0
    assert torch.equal(outputs[0][:total], want[0][:total])
    for got, expected in zip(outputs[1:4], want[1:4]):
        assert torch.equal(got, expected)
    if alignment > 1:  # scale rows up to the padded total (the rows past it are not written)
        assert torch.equal(outputs[4][:total], want[4][:total])


def test_bad_id_stops_with_a_device_assert():
    assert_stops_with_device_assert(
        "moe_ext.ops.moe_permute(torch.randn(256, 8, device='cuda'), "
        "torch.arange(256 * 8, device='cuda').reshape(256, 8) % 64 - (torch.arange(256 * 8, device='cuda')"
        ".reshape(256, 8) == 777).long() * 70, num_experts=64)", "topk_ids out of range")


def test_offsets_beyond_int32():
    # T*K*H > 2^31 elements, every row local (the multi-launch path at this size; the one-launch kernel's
    # offsets are the same int64 products).
    num_tokens, topk, hidden_size, num_experts = 37_500, 8, 7168, 32
    generator = torch.Generator().manual_seed(11)
    ids = routing(generator, num_tokens, topk, num_experts)
    value = torch.arange(num_tokens) % 251
    hidden = value[:, None].expand(-1, hidden_size).to(torch.bfloat16).cuda()
    out = moe_permute(hidden, ids.cuda(), num_experts=num_experts)
    assert out.permuted.numel() > 2 ** 31
    want = moe_permute(hidden[:, :1].cpu(), ids, num_experts=num_experts)
    assert torch.equal(out.expanded_row_idx.cpu(), want.expanded_row_idx)
    assert torch.equal(out.expert_tokens.cpu(), want.expert_tokens)
    token_of_row = torch.empty(num_tokens * topk, dtype=torch.int64)
    token_of_row[want.expanded_row_idx.view(-1).long()] = torch.arange(num_tokens).repeat_interleave(topk)
    expected = (token_of_row % 251).to(torch.bfloat16)
    assert torch.equal(out.permuted[:, 0].cpu(), expected)
    assert torch.equal(out.permuted[:, -1].cpu(), expected)
