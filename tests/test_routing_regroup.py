"""group_by_local_expert / ungroup_by_local_expert and their row ops on every backend."""

from __future__ import annotations

import pytest
import torch

from moe_ext.ops import gather_rows, group_by_local_expert, scatter_rows, ungroup_by_local_expert
from moe_ext.testing.reference import (group_by_local_expert_reference,
                                       ungroup_by_local_expert_reference)
from device_assert import assert_stops_with_device_assert


def random_counts(generator, num_ranks, experts_per_rank, max_count):
    counts = torch.randint(0, max_count + 1, (num_ranks * experts_per_rank,), generator=generator)
    counts[torch.rand(counts.shape, generator=generator) < 0.3] = 0
    return counts


def padded_total(counts, experts_per_rank, num_ranks, alignment):
    per_expert = counts.view(num_ranks, experts_per_rank).sum(0).clamp_min(alignment)
    return int(((per_expert + alignment - 1) // alignment * alignment).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_group_and_ungroup_match_reference(device, dtype):
    generator = torch.Generator().manual_seed(21)
    for trial in range(20):
        num_ranks = int(torch.randint(1, 9, (1,), generator=generator))
        experts_per_rank = int(torch.randint(1, 9, (1,), generator=generator))
        alignment = [1, 8, 16, 128][trial % 4]
        hidden_size = [1, 8, 24, 130][trial % 4]
        counts = random_counts(generator, num_ranks, experts_per_rank, 50)
        num_rows = int(counts.sum()) + trial % 3  # a few arriving rows that no block holds
        max_len = padded_total(counts, experts_per_rank, num_ranks, alignment) + trial % 5
        x = torch.randn(num_rows, hidden_size, generator=generator).to(dtype)
        want = group_by_local_expert_reference(x, counts, experts_per_rank, num_ranks, alignment, max_len)
        got = group_by_local_expert(x.to(device), counts.to(device), experts_per_rank, num_ranks,
                                    alignment, max_len)
        for g, w in zip(got, want):
            assert g.device.type == device
            torch.testing.assert_close(g.cpu(), w.cpu(), rtol=0, atol=0)
        back = ungroup_by_local_expert(got.rows, got.permuted_indices, num_rows)
        torch.testing.assert_close(back.cpu(), ungroup_by_local_expert_reference(want[0], want[1], num_rows),
                                   rtol=0, atol=0)
        held = int(counts.sum())
        torch.testing.assert_close(back[:held].cpu(), x[:held], rtol=0, atol=0)


def test_large_regroup(device):
    generator = torch.Generator().manual_seed(22)
    counts = torch.bincount(torch.randint(0, 64 * 8, (60000,), generator=generator), minlength=512)
    x = torch.randn(60000, 16, generator=generator)
    max_len = 60000 + 8 * 128
    got = group_by_local_expert(x.to(device), counts.to(device), 8, 64, 128, max_len)
    want = group_by_local_expert_reference(x, counts, 8, 64, 128, max_len)
    torch.testing.assert_close(got.rows.cpu(), want[0], rtol=0, atol=0)
    torch.testing.assert_close(ungroup_by_local_expert(got.rows, got.permuted_indices, 60000).cpu(), x,
                               rtol=0, atol=0)


def test_gradcheck_fp64():
    generator = torch.Generator().manual_seed(23)
    counts = torch.tensor([2, 0, 1, 3, 1, 0])  # 3 ranks, 2 experts
    x = torch.randn(7, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: group_by_local_expert(t, counts, 2, 3, 4, 20).rows, (x,))
    indices = group_by_local_expert(x.detach(), counts, 2, 3, 4, 20).permuted_indices
    grouped = torch.randn(20, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: ungroup_by_local_expert(g, indices, 8), (grouped,))


def test_row_ops_refuse_bad_indices_on_cpu():
    with pytest.raises(ValueError, match=r"gather_rows: indices must be in \[-1, 3\).*got 3 at index 1"):
        gather_rows(torch.randn(3, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="scatter_rows: indices must name each row at most once"):
        scatter_rows(torch.randn(2, 2), torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match="one entry per row of x"):
        scatter_rows(torch.randn(2, 2), torch.tensor([1]), 4)
    with pytest.raises(TypeError, match="indices must be torch.int32 or torch.int64"):
        gather_rows(torch.randn(3, 2), torch.tensor([0.0]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case,message", [
    ("moe_ext.ops.gather_rows(torch.randn(3, 8, device='cuda'), torch.tensor([0, 3], device='cuda'))",
     "indices out of range"),
    ("moe_ext.ops.scatter_rows(torch.randn(2, 8, device='cuda'), torch.tensor([1, 1], device='cuda'), 4)",
     "names a row twice"),
])
def test_cuda_bad_indices_stop_with_a_device_assert(case, message):
    assert_stops_with_device_assert(case, message)


def test_opcheck(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    generator = torch.Generator().manual_seed(24)
    x = torch.randn(6, 5, generator=generator).to(device)
    for indices in [torch.tensor([5, -1, 0, 2, -1]), torch.tensor([], dtype=torch.int64),
                    torch.tensor([1, 0, 3], dtype=torch.int32)]:
        torch.library.opcheck(torch.ops.moe_ext.gather_rows.default, (x, indices.to(device)))
        torch.library.opcheck(torch.ops.moe_ext.scatter_rows.default,
                              (x[:indices.numel()], indices.to(device), 7))


def test_torch_compile_fullgraph(device):
    counts = torch.tensor([2, 1, 0, 3], device=device)

    def regroup(x):
        grouped = group_by_local_expert(x, counts, 2, 2, 4, 16)
        return ungroup_by_local_expert(grouped.rows * 3, grouped.permuted_indices, x.shape[0])

    compiled = torch.compile(regroup, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(6, 8, device=device, requires_grad=True)
    got = compiled(x)
    torch.testing.assert_close(got, 3 * x)
    got.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
