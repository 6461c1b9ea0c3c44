"""The one-launch CUDA permute (csrc/cuda/routing_permute_onepass.cu, issue 20 items 3-5).

Shapes chosen to take the one-launch kernel (more than 2048 routed rows for the
plain op, any size for the padded op; up to 1024 local experts; K <= 32) and its
edges: several slices a block, slices that end mid-warp, the largest table, the
fallbacks just past them. Every result is compared with the reference bit for bit
(expanded_row_idx, both count forms, every row up to the (padded) valid count, pad
rows zero, scale rows); CUDA-graph capture replays with new ids; a bad id still
stops with a device-side assert. The geometry itself is tested on the CPU in
tests/cpp/test_routing_geometry.cpp.
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
    (8192, 8, 256, None, 64, torch.bfloat16),         # the benchmark's EP 1: 16 slices of 4096 rows
    (8192, 8, 256, (0, 32), 64, torch.bfloat16),      # EP 8
    (8192, 8, 256, (224, 256), 40, torch.float16),     # EP 8, the last rank; 80-byte rows (8-byte units)
    (8192, 8, 256, (40, 48), 16, torch.float32),      # EP 32
    (4096, 2, 64, None, 128, torch.bfloat16),         # K=2
    (3001, 3, 17, (3, 11), 3, torch.float16),          # rows not a multiple of 256; 6-byte rows (2-byte units)
    (600, 5, 1024, None, 5, torch.float32),            # the widest range it takes (1024 experts)
    (600, 5, 1025, None, 5, torch.float32),            # one more: the multi-launch path
    (300, 32, 64, (8, 40), 8, torch.bfloat16),         # K = 32
    (300, 33, 64, None, 8, torch.bfloat16),            # K = 33: the multi-launch path
    (20000, 8, 64, None, 4, torch.float32),            # 160k rows: 40 slices of 4096 rows
    (80000, 8, 64, None, 4, torch.float32),            # 640k rows: past the one-launch table, multi-launch
    (300000, 8, 64, (0, 8), 2, torch.float32),         # 586 slices: more than resident blocks, some count two
    (2049, 1, 4, None, 2, torch.bfloat16),             # 2049 rows, K=1
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
    num_tokens, topk, num_experts = 6000, 4, 64
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
    ids = torch.full((4096, 8), 3, dtype=torch.int32)
    hidden = hidden_rows(generator, 4096, 8, torch.float32)
    check_against_reference("cuda", hidden, ids, 8)
    check_against_reference("cuda", hidden, ids, 8, alignment=128)


PADDED_CASES = [
    # (tokens, K, experts, active, hidden, dtype, alignment, scales)
    (8192, 8, 256, None, 256, torch.bfloat16, 128, None),
    (8192, 8, 256, (0, 32), 256, FP8, 128, "block"),
    (8192, 8, 256, (0, 32), 256, FP8, 1, "block"),        # fp8 + scales without alignment
    (256, 8, 256, (0, 32), 512, FP8, 128, "block"),        # the decode row: one launch now
    (16, 8, 256, None, 64, torch.bfloat16, 8, "token1d"),
    (3001, 3, 17, (3, 11), 300, FP8, 3, "block"),           # partial last scale block, odd alignment
    (1000, 4, 32, None, 16, torch.float32, 300001, "token2d"),  # more pad rows than blocks
    (600, 5, 1025, None, 8, torch.bfloat16, 16, None),      # past the widest range: the multi-launch path
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
    ids = routing(generator, 8192, 8, 256)
    hidden = torch.empty(8192, 0, dtype=torch.bfloat16)
    check_against_reference("cuda", hidden, ids, 256, active=(32, 64))


@pytest.mark.parametrize("alignment", [1, 64])
def test_cuda_graph_capture_and_replay(alignment):
    generator = torch.Generator().manual_seed(10)
    num_tokens, topk, num_experts = 1024, 8, 64
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
        "moe_ext.ops.moe_permute(torch.randn(4096, 8, device='cuda'), "
        "torch.arange(4096 * 8, device='cuda').reshape(4096, 8) % 64 - (torch.arange(4096 * 8, device='cuda')"
        ".reshape(4096, 8) == 777).long() * 70, num_experts=64)", "topk_ids out of range")


def test_offsets_beyond_int32():
    # T*K*H > 2^31 elements with every row local (32 experts: the one-launch plan takes 300k rows).
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
