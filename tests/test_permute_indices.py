"""generate_permute_indices on every backend against the plain-torch reference."""

from __future__ import annotations

import pytest
import torch

import moe_ext
from moe_ext.testing.reference import (generate_permute_indices_reference,
                                       generate_permute_indices_vectorized)
from device_assert import assert_stops_with_device_assert

op = moe_ext.ops.generate_permute_indices


def random_counts(generator, num_ranks, experts_per_rank, max_count, dtype, empty_fraction=0.3):
    counts = torch.randint(0, max_count + 1, (num_ranks * experts_per_rank,), generator=generator)
    counts[torch.rand(counts.shape, generator=generator) < empty_fraction] = 0
    return counts.to(dtype)


def padded_total(counts, experts_per_rank, num_ranks, alignment):
    per_expert = counts.to(torch.int64).view(num_ranks, experts_per_rank).sum(0).clamp_min(alignment)
    return int(((per_expert + alignment - 1) // alignment * alignment).sum())


def assert_same(got, want):
    for name, g, w in zip(("permuted_indices", "m_sizes", "m_offsets"), got, want):
        assert g.dtype == torch.int32, name
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("count_dtype", [torch.int32, torch.int64])
def test_random_shapes_match_reference(device, count_dtype):
    generator = torch.Generator().manual_seed(1234)
    for trial in range(60):
        num_ranks = int(torch.randint(1, 17, (1,), generator=generator))
        experts_per_rank = int(torch.randint(1, 33, (1,), generator=generator))
        alignment = [1, 8, 16, 128][trial % 4]
        counts = random_counts(generator, num_ranks, experts_per_rank, 40, count_dtype)
        slack = int(torch.randint(0, 300, (1,), generator=generator))
        max_len = padded_total(counts, experts_per_rank, num_ranks, alignment) + slack
        want = generate_permute_indices_reference(counts, experts_per_rank, num_ranks, max_len, alignment)
        got = op(counts.to(device), experts_per_rank, num_ranks, max_len, alignment)
        assert all(t.device.type == device for t in got)
        assert_same(got, want)


@pytest.mark.parametrize("num_ranks,experts_per_rank,alignment,fill", [
    (1, 1, 1, "zeros"), (1, 8, 8, "zeros"), (4, 1, 16, "random"), (1, 5, 1, "random"),
    (8, 4, 128, "one_expert"), (64, 32, 8, "random"), (3, 7, 16, "zeros"),
])
def test_edge_cases(device, num_ranks, experts_per_rank, alignment, fill):
    generator = torch.Generator().manual_seed(num_ranks * 100 + experts_per_rank)
    counts = torch.zeros(num_ranks * experts_per_rank, dtype=torch.int64)
    if fill == "random":
        counts = random_counts(generator, num_ranks, experts_per_rank, 100, torch.int64)
    elif fill == "one_expert":
        counts[(num_ranks - 1) * experts_per_rank] = 5000
    max_len = padded_total(counts, experts_per_rank, num_ranks, alignment) + 7
    want = generate_permute_indices_reference(counts, experts_per_rank, num_ranks, max_len, alignment)
    assert_same(op(counts.to(device), experts_per_rank, num_ranks, max_len, alignment), want)


def test_large_case_64_ranks_32_experts_64k_tokens(device):
    generator = torch.Generator().manual_seed(5)
    counts = torch.multinomial(torch.ones(64 * 32), 65536, replacement=True, generator=generator)
    counts = torch.bincount(counts, minlength=64 * 32).to(torch.int32)
    max_len = 65536 + 64 * 32 * 8
    want = generate_permute_indices_vectorized(counts, 32, 64, max_len, 8)
    assert_same(op(counts.to(device), 32, 64, max_len, 8), want)


def test_vectorized_baseline_matches_reference():
    generator = torch.Generator().manual_seed(9)
    for _ in range(20):
        counts = random_counts(generator, 5, 6, 30, torch.int64)
        max_len = padded_total(counts, 6, 5, 8) + 3
        assert_same(generate_permute_indices_vectorized(counts, 6, 5, max_len, 8),
                    generate_permute_indices_reference(counts, 6, 5, max_len, 8))


def test_host_planner_matches_op():
    counts = [4, 2, 1, 3, 1, 2, 3, 4]
    permuted, sizes, offsets = moe_ext._native.generate_permute_indices(counts, 4, 2, 24, 4)
    assert_same([torch.tensor(permuted, dtype=torch.int32), torch.tensor(sizes, dtype=torch.int32),
                 torch.tensor(offsets, dtype=torch.int32)],
                op(torch.tensor(counts), 4, 2, 24, 4))


@pytest.mark.parametrize("bad,exception,message", [
    (dict(counts=torch.tensor([1.0, 2.0])), TypeError, "must be torch.int32 or torch.int64, got torch.float32"),
    (dict(counts=torch.ones(2, 2, dtype=torch.int64)), ValueError, "must be 1-D"),
    (dict(counts=torch.ones(7, dtype=torch.int64)), ValueError, "= 8, got 7"),
    (dict(experts_per_rank=0), ValueError, "experts_per_rank must be >= 1, got 0"),
    (dict(num_ranks=-1), ValueError, "num_ranks must be >= 1, got -1"),
    (dict(alignment=0), ValueError, "alignment must be >= 1, got 0"),
    (dict(max_len=-5), ValueError, "max_len must be >= 0, got -5"),
])
def test_bad_arguments_are_refused_on_every_backend(device, bad, exception, message):
    args = dict(counts=torch.ones(8, dtype=torch.int64), experts_per_rank=4, num_ranks=2, max_len=64,
                alignment=1)
    args.update(bad)
    with pytest.raises(exception, match=message):
        op(args["counts"].to(device), args["experts_per_rank"], args["num_ranks"], args["max_len"],
           args["alignment"])


def test_cpu_refuses_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match=r"got -3 at index 1 \(rank 0, local expert 1\)"):
        op(torch.tensor([5, -3]), 2, 1, 64, 8)
    with pytest.raises(ValueError, match="needs 16 rows .* but max_len is 15"):
        op(torch.tensor([5, 3]), 2, 1, 15, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case,message", [
    ("moe_ext.ops.generate_permute_indices(torch.tensor([5, 3], device='cuda'), 2, 1, 15, 8)",
     "needs more rows than max_len"),
    ("moe_ext.ops.generate_permute_indices(torch.tensor([5, -3], device='cuda'), 2, 1, 64, 8)",
     "negative count"),
])
def test_cuda_value_errors_stop_with_a_device_assert(case, message):
    result = assert_stops_with_device_assert(case, message)
    assert "device-side assert" in result.stderr or "assert" in result.stderr.lower()


def test_opcheck(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for counts, epr, ranks, max_len, alignment in [
        (torch.tensor([4, 2, 1, 3, 1, 2, 3, 4]), 4, 2, 40, 8),
        (torch.zeros(6, dtype=torch.int32), 3, 2, 24, 8),
        (torch.tensor([3]), 1, 1, 3, 1),
    ]:
        torch.library.opcheck(torch.ops.moe_ext.generate_permute_indices.default,
                              (counts.to(device), epr, ranks, max_len, alignment))


def test_torch_compile_fullgraph(device):
    def regroup(counts):
        permuted, sizes, offsets = moe_ext.ops.generate_permute_indices(counts, 4, 2, 40, 8)
        return permuted * 2, sizes.sum(), offsets

    compiled = torch.compile(regroup, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    counts = torch.tensor([4, 2, 1, 3, 1, 2, 3, 4], device=device)
    for got, want in zip(compiled(counts), regroup(counts)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay():
    counts = torch.tensor([4, 2, 1, 3, 1, 2, 3, 4], device="cuda")
    op(counts, 4, 2, 40, 8)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = op(counts, 4, 2, 40, 8)
    counts.copy_(torch.tensor([0, 9, 0, 1, 3, 0, 0, 2], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_same(outputs, generate_permute_indices_reference(counts.cpu(), 4, 2, 40, 8))
