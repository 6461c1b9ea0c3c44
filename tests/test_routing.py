"""moe_permute / moe_unpermute / expert_histogram on every backend against the references."""

from __future__ import annotations

import pytest
import torch

import moe_ext
from moe_ext.ops import expert_histogram, moe_permute, moe_unpermute
from moe_ext.testing.reference import (expert_histogram_reference, moe_permute_reference,
                                       moe_unpermute_reference)
from device_assert import assert_stops_with_device_assert

requires_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                      reason="needs a CUDA GPU")]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_routing(generator, num_tokens, topk, num_experts, skewed, id_dtype=torch.int32):
    """[T, K] ids; distinct per token when possible (as a top-k router gives), else random."""
    if skewed:  # a few hot experts take most rows
        weights = torch.rand(num_experts, generator=generator) ** 8 + 1e-3
    else:
        weights = torch.ones(num_experts)
    if num_tokens == 0:
        return torch.empty((0, topk), dtype=id_dtype)
    ids = torch.multinomial(weights.expand(num_tokens, -1), topk, replacement=topk > num_experts,
                            generator=generator)
    return ids.to(id_dtype)


def random_expert_map(generator, num_experts, num_local):
    """Global -> local ids: num_local experts at random spots, -1 elsewhere."""
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    chosen = torch.randperm(num_experts, generator=generator)[:num_local]
    expert_map[chosen] = torch.randperm(num_local, generator=generator).to(torch.int32)
    return expert_map


def assert_permute_matches(got, want):
    permuted, expanded_row_idx, expert_tokens = got
    want_permuted, want_row_idx, want_tokens = want
    assert expanded_row_idx.dtype == torch.int32 and expert_tokens.dtype == torch.int64
    assert permuted.shape == want_permuted.shape and permuted.dtype == want_permuted.dtype
    torch.testing.assert_close(expanded_row_idx.cpu(), want_row_idx.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(expert_tokens.cpu(), want_tokens.cpu(), rtol=0, atol=0)
    valid = int((want_row_idx >= 0).sum())
    torch.testing.assert_close(permuted[:valid].cpu(), want_permuted[:valid].cpu(), rtol=0, atol=0)


def random_case(generator, trial, max_tokens):
    num_tokens = [0, 1, 3, 17, int(torch.randint(1, max_tokens + 1, (1,), generator=generator))][trial % 5]
    topk = int(torch.randint(1, 9, (1,), generator=generator))
    num_experts = [1, 2, 7, 64, 256, 512][trial % 6]
    hidden_size = [1, 8, 24, 64, 129][trial % 5]
    return num_tokens, topk, num_experts, hidden_size


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mode", ["all", "range", "map"])
def test_permute_matches_reference(device, id_dtype, mode):
    generator = torch.Generator().manual_seed(hash((str(id_dtype), mode)) % 2**31)
    for trial in range(30):
        num_tokens, topk, num_experts, hidden_size = random_case(generator, trial, 400)
        dtype = DTYPES[trial % 3]
        ids = random_routing(generator, num_tokens, topk, num_experts, skewed=trial % 2 == 0,
                             id_dtype=id_dtype)
        hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype)
        kwargs = dict(num_experts=num_experts)
        if mode == "range":
            start = int(torch.randint(0, num_experts + 1, (1,), generator=generator))
            end = int(torch.randint(start, num_experts + 1, (1,), generator=generator))
            kwargs["active_expert_range"] = (start, end)
        elif mode == "map":
            num_local = int(torch.randint(1, num_experts + 1, (1,), generator=generator))
            expert_map = random_expert_map(generator, num_experts, num_local)
            kwargs["expert_map"] = expert_map.long() if trial % 2 else expert_map
            kwargs["active_expert_range"] = (0, num_local)
        counts = "cumsum" if trial % 4 == 1 else "count"
        want = moe_permute_reference(hidden, ids, counts=counts, **kwargs)
        if "expert_map" in kwargs:
            kwargs["expert_map"] = kwargs["expert_map"].to(device)
        got = moe_permute(hidden.to(device), ids.to(device), counts=counts, **kwargs)
        assert all(t.device.type == device for t in got)
        assert_permute_matches(got, want)


@pytest.mark.parametrize("num_tokens,topk,num_experts,active,hidden_size,use_map", [
    (70000, 2, 64, None, 4, False),           # many tokens, few columns
    (8192, 8, 256, (32, 64), 16, False),      # EP 8: rank 1 of 8 keeps its 32 experts
    (8192, 8, 256, (0, 32), 16, True),        # the same through an expert map (EPLB placement)
    (2048, 8, 512, (0, 512), 8, False),
    (600, 8, 4000, (100, 3100), 8, False),    # a wide active range
])
def test_permute_large_cases(device, num_tokens, topk, num_experts, active, hidden_size, use_map):
    generator = torch.Generator().manual_seed(num_tokens)
    ids = random_routing(generator, num_tokens, topk, num_experts, skewed=True)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(torch.bfloat16)
    expert_map = random_expert_map(generator, num_experts, active[1]) if use_map else None
    want = moe_permute_reference(hidden, ids, num_experts, active, expert_map)
    got = moe_permute(hidden.to(device), ids.to(device), num_experts=num_experts,
                      active_expert_range=active,
                      expert_map=None if expert_map is None else expert_map.to(device))
    assert_permute_matches(got, want)
    cumulative = moe_permute(hidden.to(device), ids.to(device), num_experts=num_experts, active_expert_range=active,
                             expert_map=None if expert_map is None else expert_map.to(device), counts="cumsum")
    assert torch.equal(cumulative.expert_tokens.cpu(), torch.cumsum(want[2], 0))


def test_permute_is_stable_and_matches_the_npu_example():
    # Hand-worked: T=3, K=2, experts 0..3, active range [1, 3).
    ids = torch.tensor([[2, 1], [1, 3], [2, 0]], dtype=torch.int32)
    hidden = torch.arange(3, dtype=torch.float32)[:, None].repeat(1, 2)
    permuted, row_idx, tokens = moe_permute(hidden, ids, num_experts=4, active_expert_range=(1, 3))
    # key-1 rows in flattened order: f=1 (t0), f=2 (t1); key-2 rows: f=0 (t0), f=4 (t2).
    assert row_idx.tolist() == [2, 0, 1, -1, 3, -1]
    assert tokens.tolist() == [2, 2]
    assert permuted[:4, 0].tolist() == [0.0, 1.0, 0.0, 2.0]
    _, _, cumulative = moe_permute(hidden, ids, num_experts=4, active_expert_range=(1, 3),
                                   counts="cumsum")
    assert cumulative.tolist() == [2, 4]


@pytest.mark.parametrize("with_probs", [True, False])
def test_unpermute_matches_reference(device, with_probs):
    generator = torch.Generator().manual_seed(7 + with_probs)
    for trial in range(24):
        num_tokens, topk, num_experts, hidden_size = random_case(generator, trial, 300)
        dtype = DTYPES[trial % 3]
        ids = random_routing(generator, num_tokens, topk, num_experts, skewed=trial % 2 == 1)
        start = num_experts // 4 if trial % 3 == 0 else 0
        hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype)
        permuted, row_idx, _ = moe_permute_reference(hidden, ids, num_experts, (start, num_experts))
        valid = int((row_idx >= 0).sum())
        permuted[valid:] = float("nan")  # never read: a NaN here must not reach the output
        probs = None
        if with_probs:
            probs = torch.rand(num_tokens, topk, generator=generator)
            probs = probs.to(dtype) if trial % 2 else probs
        want = moe_unpermute_reference(permuted, row_idx, probs, topk)
        got = moe_unpermute(permuted.to(device), row_idx.to(device),
                            None if probs is None else probs.to(device), topk=topk)
        assert got.dtype == dtype and got.shape == (num_tokens, hidden_size)
        tolerance = dict(rtol=0, atol=0) if dtype == torch.float32 else {}
        if device != "cpu":
            tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(got.cpu(), want, **tolerance)


def test_unpermute_accumulates_in_fp32():
    # 64 rows of bf16 value 1 + 2^-8 each: a bf16 running sum stalls, fp32 does not.
    value = torch.tensor(1 + 2 ** -7, dtype=torch.bfloat16)
    permuted = value.repeat(64, 1)
    row_idx = torch.arange(64, dtype=torch.int32)
    got = moe_unpermute(permuted, row_idx, topk=64)
    assert got.item() == pytest.approx(float(torch.tensor(64 * (1 + 2 ** -7)).bfloat16()))


def test_round_trip_reproduces_weighted_tokens(device):
    generator = torch.Generator().manual_seed(3)
    ids = random_routing(generator, 200, 4, 32, skewed=False)
    hidden = torch.randn(200, 40, generator=generator)
    probs = torch.rand(200, 4, generator=generator)
    permuted, row_idx, _ = moe_permute(hidden.to(device), ids.to(device), num_experts=32)
    out = moe_unpermute(permuted, row_idx, probs.to(device))
    torch.testing.assert_close(out.cpu(), hidden * probs.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_expert_histogram_matches_bincount(device, id_dtype):
    generator = torch.Generator().manual_seed(11)
    for num_tokens, topk, num_experts in [(0, 2, 4), (1, 1, 1), (37, 3, 5), (5000, 8, 256),
                                          (70000, 8, 512), (300, 2, 20000)]:
        ids = torch.randint(0, num_experts, (num_tokens, topk), generator=generator, dtype=id_dtype)
        got = expert_histogram(ids.to(device), num_experts)
        assert got.dtype == torch.int64 and got.device.type == device
        torch.testing.assert_close(got.cpu(), expert_histogram_reference(ids, num_experts), rtol=0, atol=0)


# ---------------------------------------------------------------- autograd

def test_gradcheck_permute_fp64():
    generator = torch.Generator().manual_seed(0)
    ids = random_routing(generator, 6, 3, 8, skewed=False)
    hidden = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    for kwargs in [dict(), dict(active_expert_range=(2, 6))]:
        valid = int(moe_permute_reference(hidden.detach(), ids, 8, kwargs.get("active_expert_range"))[2].sum())
        # Rows past the valid count are unwritten, so only the valid rows are an output.
        assert torch.autograd.gradcheck(
            lambda h: moe_permute(h, ids, num_experts=8, **kwargs).permuted[:valid], (hidden,))


@pytest.mark.parametrize("with_probs", [True, False])
def test_gradcheck_unpermute_fp64(with_probs):
    generator = torch.Generator().manual_seed(1)
    row_idx = torch.tensor([3, -1, 0, 5, 1, -1, 2, 6], dtype=torch.int32)  # T=4, K=2, R=8
    permuted = torch.randn(8, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    probs = torch.rand(4, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    if with_probs:
        assert torch.autograd.gradcheck(lambda x, p: moe_unpermute(x, row_idx, p), (permuted, probs))
    else:
        assert torch.autograd.gradcheck(lambda x: moe_unpermute(x, row_idx, topk=2), (permuted,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(device, dtype):
    generator = torch.Generator().manual_seed(5)
    ids = random_routing(generator, 300, 4, 64, skewed=True)
    hidden = torch.randn(300, 48, generator=generator).to(dtype)
    probs = torch.rand(300, 4, generator=generator)
    grad_out = torch.randn(300, 48, generator=generator).to(dtype)
    active = (8, 40)

    def run(permute, unpermute, dev):
        h = hidden.to(dev).requires_grad_()
        p = probs.to(dev).requires_grad_()
        permuted, row_idx, _ = permute(h, ids.to(dev), active)
        out = unpermute(permuted, row_idx, p)
        out.backward(grad_out.to(dev))
        return out.cpu(), h.grad.cpu(), p.grad.cpu()

    got = run(lambda h, i, a: moe_permute(h, i, num_experts=64, active_expert_range=a),
              lambda x, r, p: moe_unpermute(x, r, p), device)
    want = run(lambda h, i, a: moe_permute_reference(h, i, 64, a),
               lambda x, r, p: moe_unpermute_reference(x, r, p, 4), "cpu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_unpermute_backward_named_rows_and_dropped_probs(device):
    row_idx = torch.tensor([2, -1, 0, 3], dtype=torch.int32, device=device)  # T=2, K=2; row 1, 4 unnamed
    permuted = torch.randn(5, 3, device=device, requires_grad=True)
    probs = torch.rand(2, 2, device=device, requires_grad=True)
    grad_out = torch.randn(2, 3, device=device)
    moe_unpermute(permuted, row_idx, probs).backward(grad_out)
    if device == "cpu":  # unnamed rows are unspecified; the CPU kernel writes zeros, CUDA leaves them unwritten
        assert torch.count_nonzero(permuted.grad[1]) == 0 and torch.count_nonzero(permuted.grad[4]) == 0
    torch.testing.assert_close(permuted.grad[2], probs[0, 0].detach() * grad_out[0])
    torch.testing.assert_close(permuted.grad[0], probs[1, 0].detach() * grad_out[1])
    torch.testing.assert_close(permuted.grad[3], probs[1, 1].detach() * grad_out[1])
    assert probs.grad[0, 1].item() == 0.0
    torch.testing.assert_close(probs.grad[1, 1], (grad_out[1] * permuted[3].detach()).sum())


# Shapes that take the CUDA unpermute's tiled kernel (rows of >= 256 16-byte packs, >= 2048 tokens,
# K <= 32) and its fallbacks (K = 33, a row size that is no multiple of 16 bytes), at EP 1 / 8 / 32
# sizes, with -1 ids; the unwritten tail of permuted is NaN and must never be read.
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens,topk,num_experts,active,hidden_size,dtype,index_dtype", [
    (2304, 8, 64, (0, 64), 2048, torch.bfloat16, torch.int32),
    (2304, 8, 64, (0, 8), 2048, torch.bfloat16, torch.int32),
    (2304, 8, 64, (0, 2), 2048, torch.bfloat16, torch.int64),
    (2048, 2, 16, (4, 12), 1024, torch.float32, torch.int32),
    (2048, 32, 64, (0, 16), 2048, torch.float16, torch.int32),
    (2048, 33, 64, (0, 16), 2048, torch.bfloat16, torch.int32),
    (2304, 8, 64, (0, 8), 2052, torch.bfloat16, torch.int32),
    # The backward's flat kernel: K=6 (tiles of 5 tokens, 30 entries) with a partial last tile and a row
    # of 257 packs (a last pass of one pack); K=1 (tiles of 32 tokens); fp64 (fp64 dots) with int64 indices.
    (2049, 6, 64, (0, 8), 2056, torch.bfloat16, torch.int32),
    (8192, 1, 16, (0, 4), 2048, torch.bfloat16, torch.int32),
    (1100, 8, 64, (0, 64), 1024, torch.float64, torch.int64),
    # Decode-sized grids (the forward's small-grid path, the backward's one-token kernel).
    (256, 8, 64, (0, 8), 2048, torch.bfloat16, torch.int32),
    (16, 8, 64, (0, 64), 2048, torch.float32, torch.int64),
])
def test_cuda_unpermute_and_backward_large_rows(num_tokens, topk, num_experts, active, hidden_size, dtype,
                                                index_dtype):
    generator = torch.Generator().manual_seed(num_tokens + topk + hidden_size)
    ids = random_routing(generator, num_tokens, topk, num_experts, skewed=False)
    ids[::7, 0] = -1  # padding tokens' "no expert"
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype)
    permuted, row_idx, _ = moe_permute_reference(hidden, ids, num_experts, active)
    valid = int((row_idx >= 0).sum())
    permuted[valid:] = float("nan")
    row_idx = row_idx.to(index_dtype)
    probs = torch.rand(num_tokens, topk, generator=generator)
    grad_out = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype)
    want = moe_unpermute_reference(permuted, row_idx, probs, topk)
    got = moe_unpermute(permuted.cuda(), row_idx.cuda(), probs.cuda(), topk=topk).cpu()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tolerance)
    assert not torch.isnan(got).any()
    want_grad, want_probs = torch.ops.moe_ext.moe_unpermute_backward(grad_out, permuted, row_idx, probs, topk,
                                                                      True)
    got_grad, got_probs = torch.ops.moe_ext.moe_unpermute_backward(grad_out.cuda(), permuted.cuda(),
                                                                    row_idx.cuda(), probs.cuda(), topk, True)
    named = row_idx[row_idx >= 0].long()
    torch.testing.assert_close(got_grad.cpu()[named], want_grad[named], rtol=0, atol=0)
    torch.testing.assert_close(got_probs.cpu(), want_probs, rtol=1e-4, atol=1e-4)
    assert (got_probs.cpu().view(-1)[(row_idx < 0).view(-1)] == 0).all()
    # fp32 grad_probs (and the rows) are deterministic: a second call gives the same bits.
    again_grad, again_probs = torch.ops.moe_ext.moe_unpermute_backward(grad_out.cuda(), permuted.cuda(),
                                                                        row_idx.cuda(), probs.cuda(), topk, True)
    assert torch.equal(again_probs.cpu(), got_probs.cpu())
    assert torch.equal(again_grad.cpu()[named], got_grad.cpu()[named])
    # Without grad_probs the rows are the same (permuted is then never read).
    rows_only, _ = torch.ops.moe_ext.moe_unpermute_backward(grad_out.cuda(), permuted.cuda(), row_idx.cuda(),
                                                            probs.cuda(), topk, False)
    torch.testing.assert_close(rows_only.cpu()[named], want_grad[named], rtol=0, atol=0)


def test_backward_is_deterministic(device):
    generator = torch.Generator().manual_seed(8)
    ids = random_routing(generator, 500, 8, 16, skewed=True)
    hidden = torch.randn(500, 64, generator=generator, device="cpu").to(device)
    grads = []
    for _ in range(2):
        h = hidden.clone().requires_grad_()
        permuted, row_idx, _ = moe_permute(h, ids.to(device), num_experts=16)
        probs = torch.linspace(0, 1, 500 * 8, device=device).view(500, 8).requires_grad_()
        moe_unpermute(permuted, row_idx, probs).square().sum().backward()
        grads.append((h.grad, probs.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# ---------------------------------------------------------------- errors

def test_cpu_refuses_ids_out_of_range_before_writing():
    hidden = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, num_experts=8\) or -1 \(no expert\), "
                                         r"got 9 at token 1, slot 0"):
        moe_permute(hidden, torch.tensor([[0, 1], [9, 2], [3, 4]], dtype=torch.int32), num_experts=8)
    with pytest.raises(ValueError, match="got -2 at token 0, slot 1"):
        moe_permute(hidden, torch.tensor([[0, -2], [1, 2], [3, 4]]), num_experts=8)


def test_expert_histogram_skips_ids_outside_the_range(device):
    ids = torch.tensor([[1, -1], [4, 3], [1, 0]], device=device)
    assert expert_histogram(ids, 4).tolist() == [1, 2, 0, 1]
    big = torch.full((70000,), -1, dtype=torch.int32, device=device)
    big[::7] = 2
    assert expert_histogram(big, 20000).cpu()[2].item() == 10000


@pytest.mark.parametrize("call,exception,message", [
    (lambda d: moe_permute(torch.randn(3, 4, device=d), torch.zeros(2, 2, dtype=torch.int32, device=d),
                           num_experts=4), ValueError, "same number of tokens, got 2 and 3"),
    (lambda d: moe_permute(torch.randn(3, 4, device=d), torch.zeros(3, 2, device=d), num_experts=4),
     TypeError, "topk_ids must be torch.int32 or torch.int64, got torch.float32"),
    (lambda d: moe_permute(torch.zeros(3, 4, dtype=torch.int32, device=d),
                           torch.zeros(3, 2, dtype=torch.int32, device=d), num_experts=4),
     TypeError, "hidden_states must be torch.float32, torch.float16, torch.bfloat16, torch.float64, "
                "torch.float8_e4m3fn or torch.float8_e5m2, got torch.int32"),
    (lambda d: moe_permute(torch.randn(3, 4, device=d), torch.zeros(3, 2, dtype=torch.int32, device=d),
                           num_experts=4, active_expert_range=(3, 5)),
     ValueError, r"0 <= start <= end <= num_experts = 4, got \(3, 5\)"),
    (lambda d: moe_permute(torch.randn(3, 4, device=d), torch.zeros(3, 2, dtype=torch.int32, device=d),
                           num_experts=4, expert_map=torch.zeros(5, dtype=torch.int32, device=d)),
     ValueError, "expert_map must have num_experts = 4 entries, got 5"),
    (lambda d: moe_permute(torch.randn(3, 4, device=d), torch.zeros(3, 2, dtype=torch.int32, device=d),
                           num_experts=4, counts="sum"), ValueError,
     r"counts must be one of \['count', 'cumsum'\], got 'sum'"),
    (lambda d: moe_permute(torch.randn(3, 4, device=d), torch.zeros(3, 0, dtype=torch.int32, device=d),
                           num_experts=4), ValueError, "K >= 1"),
    (lambda d: moe_unpermute(torch.randn(6, 4, device=d), torch.zeros(6, dtype=torch.int32, device=d),
                             torch.rand(3, 3, device=d)), ValueError,
     # K comes from probs here: the message names probs, never a topk the caller did not pass.
     r"probs must be \[T, K\] with T \* K = 6 \(the entries of expanded_row_idx\), got shape \(3, 3\) "
     r"\(T \* K = 9\)"),
    (lambda d: moe_unpermute(torch.randn(6, 4, device=d), torch.zeros(6, dtype=torch.int32, device=d),
                             torch.rand(4, 4, device=d)), ValueError,
     r"probs has shape \(4, 4\), so K = 4, but expanded_row_idx has 6 entries, not a multiple of 4"),
    (lambda d: moe_unpermute(torch.randn(6, 4, device=d), torch.zeros(6, dtype=torch.int32, device=d),
                             torch.rand(2, 2, device=d), topk=3), ValueError,
     r"probs must be \[T, K\] = \[2, 3\] to match expanded_row_idx \(6 entries\) and topk = 3"),
    (lambda d: moe_unpermute(torch.randn(6, 4, device=d), torch.zeros(6, dtype=torch.int32, device=d),
                             torch.rand(2, 3, device=d, dtype=torch.float64)), TypeError,
     "probs must be torch.float32 or the dtype of permuted"),
    (lambda d: moe_unpermute(torch.randn(6, 4, device=d), torch.zeros(7, dtype=torch.int32, device=d),
                             topk=2), ValueError, "7 entries, not a multiple of topk = 2"),
    (lambda d: moe_unpermute(torch.randn(6, 4, device=d), torch.zeros(6, dtype=torch.int32, device=d)),
     ValueError, "pass topk="),
])
def test_bad_arguments_are_refused_on_every_backend(device, call, exception, message):
    with pytest.raises(exception, match=message):
        call(device)


def test_cpu_refuses_bad_row_indices():
    with pytest.raises(ValueError, match=r"expanded_row_idx must be in \[-1, 4\).*got 4 at index 1"):
        moe_unpermute(torch.randn(4, 2), torch.tensor([0, 4], dtype=torch.int32), topk=2)
    permuted = torch.randn(4, 2, requires_grad=True)
    out = moe_unpermute(permuted, torch.tensor([1, 1], dtype=torch.int32), topk=2)  # forward is fine
    with pytest.raises(ValueError, match="each row at most once, but row 1 appears at index 0 and at index 1"):
        out.sum().backward()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_is_refused():
    with pytest.raises(ValueError, match="topk_ids is on cpu and hidden_states is on cuda"):
        moe_permute(torch.randn(3, 4, device="cuda"), torch.zeros(3, 2, dtype=torch.int32), num_experts=4)


def test_non_contiguous_inputs_are_accepted(device):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(16, 10, generator=generator).to(device).t().contiguous().t()[:, ::2]  # strided
    ids = torch.randint(0, 6, (3, 16), generator=generator, dtype=torch.int32).to(device).t()
    got = moe_permute(hidden, ids, num_experts=6)
    assert_permute_matches(got, moe_permute_reference(hidden.cpu(), ids.cpu(), 6))
    probs = torch.rand(3, 16, generator=generator).to(device).t()
    out = moe_unpermute(got.permuted, got.expanded_row_idx, probs)
    torch.testing.assert_close(out.cpu(), hidden.cpu() * probs.cpu().sum(1, keepdim=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case,message", [
    ("moe_ext.ops.moe_permute(torch.randn(3, 8, device='cuda'), "
     "torch.tensor([[0, 1], [9, 2], [3, 4]], dtype=torch.int32, device='cuda'), num_experts=8)",
     "topk_ids out of range"),
    ("moe_ext.ops.moe_unpermute(torch.randn(4, 8, device='cuda'), "
     "torch.tensor([0, 4], dtype=torch.int32, device='cuda'), topk=2)", "expanded_row_idx out of range"),
    ("torch.ops.moe_ext.moe_unpermute_backward(torch.randn(1, 8, device='cuda'), "
     "torch.randn(4, 8, device='cuda'), torch.tensor([1, 1], dtype=torch.int32, device='cuda'), None, 2, "
     "False)", "names a row twice"),
    # The same checks in the backward's large-row (flat) kernel: 2048 tokens, K=8, rows of 2048 bf16.
    ("torch.ops.moe_ext.moe_unpermute_backward(torch.randn(2048, 2048, device='cuda', dtype=torch.bfloat16), "
     "torch.randn(16384, 2048, device='cuda', dtype=torch.bfloat16), "
     "torch.arange(16384, dtype=torch.int32, device='cuda').index_fill_(0, torch.tensor([9000], device='cuda'), 77), "
     "torch.rand(2048, 8, device='cuda'), 8, True)", "names a row twice"),
    ("torch.ops.moe_ext.moe_unpermute_backward(torch.randn(2048, 2048, device='cuda', dtype=torch.bfloat16), "
     "torch.randn(16384, 2048, device='cuda', dtype=torch.bfloat16), "
     "torch.arange(16384, dtype=torch.int32, device='cuda').index_fill_(0, torch.tensor([9000], device='cuda'), "
     "16384), torch.rand(2048, 8, device='cuda'), 8, True)", "expanded_row_idx out of range"),
])
def test_cuda_bad_values_stop_with_a_device_assert(case, message):
    assert_stops_with_device_assert(case, message)


# ---------------------------------------------------------------- torch integration

def test_opcheck(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(12, 8, generator=generator, device="cpu").to(device)
    ids = random_routing(generator, 12, 3, 6, skewed=False).to(device)
    expert_map = torch.tensor([2, 0, 1, 3, 5, 4], dtype=torch.int32, device=device)
    permute = torch.ops.moe_ext.moe_permute.default
    # All rows valid: the tail that moe_permute leaves unwritten would make eager and traced runs differ.
    for args in [(hidden, ids, 6, 0, 6, None, False), (hidden, ids.long(), 6, 0, 6, expert_map, True),
                 (hidden[:0], ids[:0], 6, 2, 4, None, False)]:
        torch.library.opcheck(permute, args)
    permuted, row_idx, _ = moe_permute(hidden, ids, num_experts=6, active_expert_range=(1, 5))
    permuted = permuted.clone()
    permuted[int((row_idx >= 0).sum()):] = 0
    probs = torch.rand(12, 3, generator=generator).to(device)
    for args in [(permuted, row_idx, probs, 3), (permuted, row_idx, None, 3),
                 (permuted.double(), row_idx.long(), probs.double(), 3)]:
        torch.library.opcheck(torch.ops.moe_ext.moe_unpermute.default, args)
    grad = torch.randn(12, 8, generator=generator).to(device)
    # Every row named: the CUDA backward leaves unnamed rows unwritten (as moe_permute leaves its tail).
    full_permuted, full_row_idx, _ = moe_permute(hidden, ids, num_experts=6)
    for args in [(grad, full_permuted, full_row_idx, probs, 3, True), (grad, full_permuted, full_row_idx, None, 3,
                                                                         False)]:
        torch.library.opcheck(torch.ops.moe_ext.moe_unpermute_backward.default, args)
    for args in [(ids, 6), (ids.long(), 10), (ids[:0], 3)]:
        torch.library.opcheck(torch.ops.moe_ext.expert_histogram.default, args)


def test_torch_compile_fullgraph(device):
    def layer(hidden, ids, probs):
        permuted, row_idx, tokens = moe_permute(hidden, ids, num_experts=8, active_expert_range=(2, 6))
        return moe_unpermute(permuted * 2, row_idx, probs), tokens, expert_histogram(ids, 8)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(20, 16, generator=generator).to(device).requires_grad_()
    ids = random_routing(generator, 20, 2, 8, skewed=False).to(device)
    probs = torch.rand(20, 2, generator=generator).to(device).requires_grad_()
    got = compiled(hidden, ids, probs)
    want = layer(hidden, ids, probs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    got[0].sum().backward()
    grads = hidden.grad.clone(), probs.grad.clone()
    hidden.grad = probs.grad = None
    want[0].sum().backward()
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], probs.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay():
    generator = torch.Generator().manual_seed(12)
    hidden = torch.randn(64, 32, generator=generator).cuda()
    ids = random_routing(generator, 64, 4, 16, skewed=False).cuda()
    probs = torch.rand(64, 4, generator=generator).cuda()

    def step():
        permuted, row_idx, tokens = moe_permute(hidden, ids, num_experts=16, active_expert_range=(4, 12))
        return moe_unpermute(permuted, row_idx, probs), row_idx, tokens, expert_histogram(ids, 16)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    new_ids = random_routing(generator, 64, 4, 16, skewed=True)
    ids.copy_(new_ids.cuda())
    hidden.copy_(torch.randn(64, 32, generator=generator).cuda())
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    for g, w in zip(outputs, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offsets_beyond_int32():
    # T*K*H > 2^31 elements: row offsets must be computed in int64.
    num_tokens, topk, hidden_size, num_experts = 37_500, 8, 7168, 256
    generator = torch.Generator().manual_seed(13)
    ids = random_routing(generator, num_tokens, topk, num_experts, skewed=False)
    hidden = (torch.arange(num_tokens, dtype=torch.float32) % 251)[:, None].expand(-1, hidden_size)
    hidden = hidden.to(torch.bfloat16).cuda()
    permuted, row_idx, tokens = moe_permute(hidden, ids.cuda(), num_experts=num_experts)
    assert permuted.numel() > 2 ** 31
    _, want_row_idx, want_tokens = moe_permute_reference(hidden[:, :1].cpu(), ids, num_experts)
    torch.testing.assert_close(row_idx.cpu(), want_row_idx, rtol=0, atol=0)
    torch.testing.assert_close(tokens.cpu(), want_tokens, rtol=0, atol=0)
    last_rows = torch.arange(num_tokens * topk - 64, num_tokens * topk)
    source_token = torch.argsort(want_row_idx.long())[last_rows] // topk
    torch.testing.assert_close(permuted[last_rows.cuda()].float().cpu(),
                               (source_token % 251).float()[:, None].expand(-1, hidden_size))
    out = moe_unpermute(permuted, row_idx, topk=topk)
    last_tokens = torch.arange(num_tokens - 16, num_tokens)
    torch.testing.assert_close(out[last_tokens.cuda()].float().cpu(),
                               (topk * (last_tokens % 251)).float()[:, None].expand(-1, hidden_size)
                               .bfloat16().float())
    del out
    # The backward writes rows past 2^31 elements too: grad_permuted[row] = grad_out[token of row].
    grad_out = (torch.arange(num_tokens, dtype=torch.float32) % 241)[:, None].expand(-1, hidden_size)
    grad_permuted, _ = torch.ops.moe_ext.moe_unpermute_backward(grad_out.to(torch.bfloat16).cuda(), permuted,
                                                                row_idx, None, topk, False)
    del permuted
    torch.testing.assert_close(grad_permuted[last_rows.cuda()].float().cpu(),
                               (source_token % 241).float()[:, None].expand(-1, hidden_size))
