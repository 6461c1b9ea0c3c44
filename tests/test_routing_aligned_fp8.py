"""moe_permute with alignment (grouped GEMMs) and fp8 rows with scales (issue 20, items 4 and 5).

Every backend against moe_ext.testing.reference.moe_permute_padded_reference; the
padded layout through moe_unpermute and both backwards; opcheck; torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from moe_ext.ops import moe_permute, moe_unpermute
from moe_ext.testing.reference import (moe_permute_padded_reference, moe_permute_reference,
                                       moe_unpermute_reference)

FP8 = torch.float8_e4m3fn


def routing(generator, num_tokens, topk, num_experts, pad_fraction=0.0):
    """Random [T, K] int32 ids, distinct per token where possible, some -1 ("no expert")."""
    if num_tokens == 0:
        return torch.empty((0, topk), dtype=torch.int32)
    weights = torch.ones(num_experts).expand(num_tokens, -1)
    ids = torch.multinomial(weights, topk, replacement=topk > num_experts, generator=generator).to(torch.int32)
    if pad_fraction:
        ids[torch.rand(ids.shape, generator=generator) < pad_fraction] = -1
    return ids


def hidden_rows(generator, num_tokens, hidden_size, dtype):
    x = torch.randn(num_tokens, hidden_size, generator=generator) * 4
    return x.to(dtype)


def scale_rows(generator, num_tokens, hidden_size, kind):
    if kind is None:
        return None
    shape = {"token1d": (num_tokens,), "token2d": (num_tokens, 1),
             "block": (num_tokens, -(-hidden_size // 128))}[kind]
    return torch.rand(shape, generator=generator) + 0.5


def bits(t):
    """A view that compares bit for bit (float8 has no equality in some torch builds)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def check_against_reference(device, hidden, ids, num_experts, *, active=None, expert_map=None, counts="count",
                            alignment=1, scales=None):
    got = moe_permute(hidden.to(device), ids.to(device), num_experts=num_experts, active_expert_range=active,
                      expert_map=None if expert_map is None else expert_map.to(device), counts=counts,
                      alignment=alignment, scales=None if scales is None else scales.to(device))
    want = moe_permute_padded_reference(hidden, ids, num_experts, active, expert_map, counts, alignment, scales)
    want_permuted, want_scales, want_idx, want_padded, want_unpadded = want
    permuted, expanded_row_idx, expert_tokens = got  # the three-field unpacking keeps working
    assert permuted.shape == want_permuted.shape and permuted.dtype == hidden.dtype
    assert expanded_row_idx.dtype == torch.int32 and expert_tokens.dtype == torch.int64
    assert torch.equal(expanded_row_idx.cpu(), want_idx)
    assert torch.equal(expert_tokens.cpu(), want_padded)
    assert torch.equal(got.expert_tokens_unpadded.cpu(), want_unpadded)
    padded_total = int(want_padded[-1] if counts == "cumsum" else want_padded.sum()) if want_padded.numel() else 0
    # Every row up to the padded total is defined: routed rows bit for bit, pad rows zero.
    assert torch.equal(bits(permuted[:padded_total].cpu()), bits(want_permuted[:padded_total]))
    if scales is None:
        assert got.permuted_scales is None
    else:
        assert got.permuted_scales.shape == want_scales.shape and got.permuted_scales.dtype == torch.float32
        assert torch.equal(got.permuted_scales[:padded_total].cpu(), want_scales[:padded_total])
    return got, padded_total


@pytest.mark.parametrize("trial", range(12))
def test_random_cases_match_the_reference(device, trial):
    generator = torch.Generator().manual_seed(100 + trial)
    num_tokens = [0, 1, 5, 33, 130, 300][trial % 6]
    topk = [1, 2, 4, 8][trial % 4]
    num_experts = [1, 4, 16, 64][trial % 4]
    hidden_size = [1, 16, 200, 256][trial % 4]
    alignment = [1, 2, 8, 16, 128, 3][trial % 6]
    dtype = [torch.bfloat16, FP8, torch.float32, FP8][trial % 4]
    kind = [None, "token1d", "token2d", "block"][(trial // 2) % 4]
    ids = routing(generator, num_tokens, topk, num_experts, pad_fraction=0.2 if trial % 3 == 0 else 0.0)
    hidden = hidden_rows(generator, num_tokens, hidden_size, dtype)
    scales = scale_rows(generator, num_tokens, hidden_size, kind)
    mode = trial % 3
    active, expert_map = None, None
    if mode == 1:
        active = (num_experts // 4, num_experts - num_experts // 4)
    elif mode == 2:
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        local = max(1, num_experts // 2)
        chosen = torch.randperm(num_experts, generator=generator)[:local]
        expert_map[chosen] = torch.arange(local, dtype=torch.int32)
        active = (0, local)
    counts = "cumsum" if trial % 2 else "count"
    check_against_reference(device, hidden, ids, num_experts, active=active, expert_map=expert_map,
                            counts=counts, alignment=alignment, scales=scales)


@pytest.mark.parametrize("case", ["no tokens", "one expert", "all dropped by -1", "empty range", "map drops all",
                                  "K=1", "H not a multiple of 128", "H=1 block scale", "alignment 1 fp8"])
def test_degenerate_shapes(device, case):
    generator = torch.Generator().manual_seed(7)
    num_tokens, topk, num_experts, hidden_size, alignment = 9, 2, 4, 64, 8
    active, expert_map, kind = None, None, "block"
    ids = routing(generator, num_tokens, topk, num_experts)
    if case == "no tokens":
        num_tokens, ids = 0, ids[:0]
    elif case == "one expert":
        num_experts, topk = 1, 1
        ids = torch.zeros((num_tokens, 1), dtype=torch.int32)
    elif case == "all dropped by -1":
        ids = torch.full_like(ids, -1)
    elif case == "empty range":
        active = (2, 2)
    elif case == "map drops all":
        expert_map = torch.full((num_experts,), -1, dtype=torch.int64)
        active = (0, 2)
    elif case == "K=1":
        topk, ids = 1, ids[:, :1].contiguous()
    elif case == "H not a multiple of 128":
        hidden_size = 300  # 3 blocks, the last one partial
    elif case == "H=1 block scale":
        hidden_size = 1
    elif case == "alignment 1 fp8":
        alignment = 1
    hidden = hidden_rows(generator, num_tokens, hidden_size, FP8)
    scales = scale_rows(generator, num_tokens, hidden_size, kind)
    got, total = check_against_reference(device, hidden, ids, num_experts, active=active, expert_map=expert_map,
                                         alignment=alignment, scales=scales)
    start, end = active or (0, num_experts)
    assert got.permuted.shape[0] == num_tokens * topk + (end - start) * (alignment - 1)
    if case in ("all dropped by -1", "empty range", "map drops all", "no tokens"):
        assert total == 0 and bool((got.expanded_row_idx == -1).all())


def test_alignment_semantics_by_hand():
    # Experts 0..3 get 3, 2, 0, 1 rows; A = 4: blocks of 4, 4, 0, 4 starting at 0, 4, 8, 8.
    ids = torch.tensor([[0, 1], [1, -1], [0, 3], [0, -1]], dtype=torch.int32)
    hidden = torch.arange(4, dtype=torch.float32).repeat_interleave(2).view(4, 2) + 1
    result = moe_permute(hidden, ids, num_experts=4, alignment=4)
    assert result.expert_tokens.tolist() == [4, 4, 0, 4]
    assert result.expert_tokens_unpadded.tolist() == [3, 2, 0, 1]
    # Stable within a block: token order. Expert 0: tokens 0, 2, 3 -> rows 0-2; expert 1: tokens 0, 1 -> rows 4, 5;
    # expert 3: token 2 -> row 8.
    assert result.expanded_row_idx.tolist() == [0, 4, 5, -1, 1, 8, 2, -1]
    assert result.permuted.shape == (8 + 4 * 3, 2)
    assert result.permuted[:12, 0].tolist() == [1, 3, 4, 0, 1, 2, 0, 0, 3, 0, 0, 0]
    cumsum = moe_permute(hidden, ids, num_experts=4, alignment=4, counts="cumsum")
    assert cumsum.expert_tokens.tolist() == [4, 8, 8, 12] and cumsum.expert_tokens_unpadded.tolist() == [3, 5, 5, 6]


def test_default_call_is_unchanged():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 8, generator=generator)
    ids = routing(generator, 10, 2, 4)
    result = moe_permute(hidden, ids, num_experts=4)
    permuted, expanded_row_idx, expert_tokens = result
    want = moe_permute_reference(hidden, ids, 4)
    assert torch.equal(expanded_row_idx, want[1]) and torch.equal(expert_tokens, want[2])
    assert result.expert_tokens_unpadded is expert_tokens and result.permuted_scales is None
    assert len(result) == 3 and result._fields == ("permuted", "expanded_row_idx", "expert_tokens")
    aligned_one = moe_permute(hidden, ids, num_experts=4, alignment=1)
    assert torch.equal(aligned_one.expanded_row_idx, expanded_row_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_and_backward_accept_the_padded_layout(device, dtype):
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(40, 24, generator=generator).to(dtype)
    ids = routing(generator, 40, 4, 8, pad_fraction=0.1)
    probs = torch.rand(40, 4, generator=generator)
    expert_map = torch.tensor([3, -1, 0, 1, -1, 2, -1, -1], dtype=torch.int32)

    def run(alignment):
        x = hidden.to(device).requires_grad_()
        p = probs.to(device).requires_grad_()
        result = moe_permute(x, ids.to(device), num_experts=8, expert_map=expert_map.to(device),
                             active_expert_range=(0, 4), alignment=alignment)
        rows = result.permuted * 3  # the "experts"
        out = moe_unpermute(rows, result.expanded_row_idx, p)
        out.float().pow(2).sum().backward()
        return out.detach().cpu(), x.grad.cpu(), p.grad.cpu()

    plain, padded = run(1), run(16)
    # The gradient of the padded rows themselves: pad rows (inside the groups) get zeros.
    result = moe_permute(hidden.to(device), ids.to(device), num_experts=8, expert_map=expert_map.to(device),
                         active_expert_range=(0, 4), alignment=16)
    rows = result.permuted.detach().clone().requires_grad_()
    moe_unpermute(rows, result.expanded_row_idx, probs.to(device)).float().sum().backward()
    total = int(result.expert_tokens.sum())
    named = torch.zeros(rows.shape[0], dtype=torch.bool)
    named[result.expanded_row_idx[result.expanded_row_idx >= 0].long().cpu()] = True
    assert bool((rows.grad[:total].cpu()[~named[:total]] == 0).all()) and total > int(named.sum())
    for a, b in zip(plain, padded):
        assert torch.equal(a, b)  # the same sums in the same order: bit for bit
    # And against the reference combine on the padded layout.
    reference = moe_permute_padded_reference(hidden, ids, 8, (0, 4), expert_map, alignment=16)
    want = moe_unpermute_reference(reference[0] * 3, reference[2], probs)
    # CPU sums exactly as the reference does; the CUDA kernel may contract to FMA (1 ulp in fp32, seen on an H200).
    torch.testing.assert_close(padded[0], want, **({} if device == "cuda" else dict(rtol=0, atol=0)))


def test_gradcheck_aligned_fp64_and_scales():
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    scales = torch.rand(6, 1, generator=generator, dtype=torch.float32)
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [3, 1], [0, 3], [-1, 2]], dtype=torch.int32)

    def permute_rows(x):  # the rows up to the padded total (the tail is unwritten)
        result = moe_permute(x, ids, num_experts=4, alignment=4)
        return result.permuted[:16]

    assert int(moe_permute(hidden, ids, num_experts=4, alignment=4).expert_tokens.sum()) == 16

    torch.autograd.gradcheck(permute_rows, (hidden,))
    # Scales (float32: checked by hand): grad of token t = sum over its routed rows.
    s = scales.clone().requires_grad_()
    result = moe_permute(hidden.detach().float(), ids, num_experts=4, alignment=4, scales=s)
    weights = torch.randn(result.permuted_scales.shape, generator=generator)
    (result.permuted_scales * weights).sum().backward()
    want = torch.zeros(6, 1)
    for f, row in enumerate(result.expanded_row_idx.tolist()):
        if row >= 0:
            want[f // 2] += weights[row]
    torch.testing.assert_close(s.grad, want)


def test_fp8_has_no_gradient_and_unpermute_refuses_fp8():
    source = torch.randn(4, 8, requires_grad=True)
    scales = torch.ones(4, requires_grad=True)
    ids = torch.tensor([[0], [1], [0], [1]], dtype=torch.int32)
    result = moe_permute(source.to(FP8), ids, num_experts=2, scales=scales)
    # fp8 rows are detached: no gradient reaches the bf16 source; the scales get theirs.
    (result.permuted.float().sum() + result.permuted_scales.sum()).backward()
    assert source.grad is None and torch.equal(scales.grad, torch.ones(4))
    assert not moe_permute(source.to(FP8), ids, num_experts=2).permuted.requires_grad
    with pytest.raises(TypeError, match="permuted is torch.float8_e4m3fn; unpermute combines expert outputs"):
        moe_unpermute(result.permuted, result.expanded_row_idx, topk=1)


@pytest.mark.parametrize("call,exception,message", [
    (lambda d: moe_permute(torch.randn(3, 8, device=d), torch.zeros(3, 2, dtype=torch.int32, device=d),
                           num_experts=4, alignment=0), ValueError, "alignment must be >= 1, got 0"),
    (lambda d: moe_permute(torch.randn(3, 8, device=d), torch.zeros(3, 2, dtype=torch.int32, device=d),
                           num_experts=4, alignment=8.0), TypeError, "alignment must be an int"),
    (lambda d: moe_permute(torch.randn(3, 8, device=d), torch.zeros(3, 2, dtype=torch.int32, device=d),
                           num_experts=4, scales=torch.ones(3, 2, device=d)), ValueError,
     r"scales must be \[T\] or \[T, 1\] \(per token\) or \[T, ceil\(H / 128\)\] = \[3, 1\].*got shape \(3, 2\)"),
    (lambda d: moe_permute(torch.randn(3, 8, device=d), torch.zeros(3, 2, dtype=torch.int32, device=d),
                           num_experts=4, scales=torch.ones(3, device=d, dtype=torch.float16)), TypeError,
     "scales must be torch.float32, got torch.float16"),
    (lambda d: moe_permute(torch.randn(3, 8, device=d), torch.zeros(3, 2, dtype=torch.int32, device=d),
                           num_experts=4, scales=torch.ones(2, device=d)), ValueError, "got shape \\(2,\\)"),
    (lambda d: moe_permute(torch.randn(3, 8, device=d), torch.zeros(3, 2, dtype=torch.int32, device=d),
                           num_experts=1024, alignment=2**21 + 1), ValueError,
     r"T \* K \+ num_active_experts \* \(alignment - 1\) = 6 \+ 1024 \* 2097152 = .* more than 2\^31"),
    (lambda d: moe_permute(torch.randn(3, 8, device=d).to(torch.int8),
                           torch.zeros(3, 2, dtype=torch.int32, device=d), num_experts=4), TypeError,
     "hidden_states must be .*torch.float8_e4m3fn or torch.float8_e5m2, got torch.int8"),
])
def test_bad_arguments(device, call, exception, message):
    with pytest.raises(exception, match=message):
        call(device)


def test_cpu_refuses_bad_ids_before_writing():
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, num_experts=4\) or -1 \(no expert\), got 5"):
        moe_permute(torch.randn(3, 8), torch.tensor([[0, 5]] * 3, dtype=torch.int32), num_experts=4, alignment=4)


def test_direct_op_checks_match_the_wrapper():
    # The C++ checks (what a direct torch.ops call gets) refuse the same things.
    hidden, ids = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="alignment must be in"):
        torch.ops.moe_ext.moe_permute_padded(hidden, None, ids, 4, 0, 4, None, False, 0)
    with pytest.raises(ValueError, match=r"scales must be \[T\], \[T, 1\] or \[T, ceil\(H / 128\)\]"):
        torch.ops.moe_ext.moe_permute_padded(hidden, torch.ones(3, 3), ids, 4, 0, 4, None, False, 1)
    with pytest.raises(ValueError, match="more than 2\\^31"):
        torch.ops.moe_ext.moe_permute_padded(hidden, None, ids, 1024, 0, 1024, None, False, 2**21 + 1)


# ---------------------------------------------------------------- torch integration

def test_opcheck(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    generator = torch.Generator().manual_seed(9)
    # Every expert gets 1 or 5 rows and A = 4: the padded total equals the static bound, so no row is left
    # unwritten (an unwritten tail would make eager and traced outputs differ).
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 1], [0, 1], [0, 1], [0, 1]], dtype=torch.int32).to(device)
    hidden = torch.randn(7, 8, generator=generator).to(device)
    scales = (torch.rand(7, 1, generator=generator) + 0.5).to(device)
    op = torch.ops.moe_ext.moe_permute_padded.default
    for args in [(hidden, None, ids, 6, 0, 6, None, False, 4),
                 (hidden, scales, ids.long(), 6, 0, 6, None, True, 4),
                 (hidden[:0], scales[:0], ids[:0], 6, 0, 6, None, False, 1),
                 (hidden.requires_grad_(), None, ids, 6, 0, 6, None, False, 1)]:
        torch.library.opcheck(op, args)
    # float8 inputs: opcheck's schema test multiplies inputs, which CPU float8 lacks; the rest applies.
    torch.library.opcheck(op, (hidden.detach().to(FP8), scales.squeeze(1), ids, 6, 0, 6, None, False, 4),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(device):
    def layer(hidden, scales, ids, probs):
        fp8 = moe_permute(hidden.to(FP8), ids, num_experts=8, active_expert_range=(2, 6), alignment=16,
                          scales=scales)
        rows = fp8.permuted.float() * fp8.permuted_scales  # dequantise (per-token scale)
        result = moe_permute(hidden, ids, num_experts=8, active_expert_range=(2, 6), alignment=16)
        combined = moe_unpermute(result.permuted * 2, result.expanded_row_idx, probs)
        return combined, moe_unpermute(rows, fp8.expanded_row_idx, probs), result.expert_tokens, \
            result.expert_tokens_unpadded

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(20, 16, generator=generator).to(device).requires_grad_()
    scales = (torch.rand(20, 1, generator=generator) + 0.5).to(device)
    ids = routing(generator, 20, 2, 8, pad_fraction=0.1).to(device)
    probs = torch.rand(20, 2, generator=generator).to(device)
    got = compiled(hidden, scales, ids, probs)
    want = layer(hidden, scales, ids, probs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    got[0].sum().backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    want[0].sum().backward()
    torch.testing.assert_close(grad, hidden.grad)


@pytest.mark.parametrize("alignment,kind", [(128, "block"), (16, "token2d"), (1, "token1d")])
def test_large_case(device, alignment, kind):
    # > 4096 routed rows: the multi-block index build on CUDA; EP-style map, -1 padding tokens.
    generator = torch.Generator().manual_seed(21)
    num_tokens, topk, num_experts, hidden_size = 1100, 8, 256, 384
    ids = routing(generator, num_tokens, topk, num_experts, pad_fraction=0.05)
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[64:128] = torch.arange(64, dtype=torch.int32)
    hidden = hidden_rows(generator, num_tokens, hidden_size, FP8)
    check_against_reference(device, hidden, ids, num_experts, active=(0, 64), expert_map=expert_map,
                            alignment=alignment, scales=scale_rows(generator, num_tokens, hidden_size, kind))
    check_against_reference(device, hidden.float().to(torch.bfloat16), ids, num_experts, alignment=alignment,
                            counts="cumsum")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay():
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(64, 256, generator=generator).to(FP8).cuda()
    scales = (torch.rand(64, 2, generator=generator) + 0.5).cuda()
    ids = routing(generator, 64, 4, 16, pad_fraction=0.1).cuda()
    run = lambda: moe_permute(hidden, ids, num_experts=16, active_expert_range=(4, 12), alignment=32,  # noqa: E731
                              scales=scales)
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = run()
    new_ids = routing(generator, 64, 4, 16, pad_fraction=0.3)
    ids.copy_(new_ids.cuda())
    scales.copy_(torch.rand(64, 2, generator=generator).cuda())
    graph.replay()
    torch.cuda.synchronize()
    want = moe_permute_padded_reference(hidden.cpu(), new_ids, 16, (4, 12), None, "count", 32, scales.cpu())
    total = int(want[3].sum())
    assert torch.equal(result.expanded_row_idx.cpu(), want[2]) and torch.equal(result.expert_tokens.cpu(), want[3])
    assert torch.equal(bits(result.permuted[:total].cpu()), bits(want[0][:total]))
    assert torch.equal(result.permuted_scales[:total].cpu(), want[1][:total])


# ---------------------------------------------------------------- fuzz: the new arguments

from hypothesis import given, strategies as st  # noqa: E402

from test_ops_reliability import FUZZ, int_like, permute_args, run_both  # noqa: E402


@st.composite
def valid_permute_args(draw):
    """Mostly valid calls (the generic permute_args is mostly refused), so that results get compared."""
    num_tokens, topk = draw(st.integers(0, 6)), draw(st.integers(1, 3))
    hidden_size, num_experts = draw(st.sampled_from([0, 1, 3, 130])), draw(st.integers(1, 6))
    ids = torch.tensor(draw(st.lists(st.integers(-1, num_experts - 1), min_size=num_tokens * topk,
                                     max_size=num_tokens * topk)), dtype=torch.int64).reshape(num_tokens, topk)
    start = draw(st.integers(0, num_experts))
    args = dict(hidden_states=torch.randn(num_tokens, hidden_size).to(draw(st.sampled_from([torch.float32,
                                                                                           torch.bfloat16]))),
                topk_ids=ids.to(draw(st.sampled_from([torch.int32, torch.int64]))), num_experts=num_experts,
                active_expert_range=(start, draw(st.integers(start, num_experts))), expert_map=None,
                counts=draw(st.sampled_from(["count", "cumsum"])))
    if draw(st.booleans()):
        args["expert_map"] = torch.tensor(draw(st.lists(st.integers(-1, num_experts - 1), min_size=num_experts,
                                                        max_size=num_experts)), dtype=torch.int32)
    return args


@st.composite
def padded_permute_args(draw):
    args = draw(st.one_of(valid_permute_args(), valid_permute_args(), permute_args()))
    args["alignment"] = draw(st.one_of(st.integers(1, 9), st.integers(1, 9), int_like(-1, 9),
                                       st.sampled_from([128, 2**31 - 1, 2**31])))
    hidden = args["hidden_states"]
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and draw(st.booleans()):
        args["hidden_states"] = hidden.float().to(FP8)
    kind = draw(st.sampled_from([None, None, "token1d", "token2d", "block", "block", "wide", "fp16", "list"]))
    if kind is not None and isinstance(hidden, torch.Tensor) and hidden.dim() == 2:
        num_tokens, hidden_size = hidden.shape
        shape = {"token1d": (num_tokens,), "token2d": (num_tokens, 1), "fp16": (num_tokens,),
                 "block": (num_tokens, -(-hidden_size // 128)), "wide": (num_tokens, 3),
                 "list": (num_tokens,)}[kind]
        scales = torch.rand(shape, dtype=torch.float16 if kind == "fp16" else torch.float32)
        args["scales"] = scales.tolist() if kind == "list" else scales
    return args


@FUZZ
@given(padded_permute_args())
def test_fuzz_moe_permute_alignment_and_scales(args):
    """Either the reference result or TypeError / ArgumentError, the same on meta (run_both)."""
    cpu = run_both(moe_permute, args, ["hidden_states", "topk_ids", "expert_map", "scales"])
    if isinstance(cpu, Exception):
        return
    start, end = args["active_expert_range"] or (0, int(args["num_experts"]))
    want = moe_permute_padded_reference(args["hidden_states"], args["topk_ids"], int(args["num_experts"]),
                                        (int(start), int(end)), args["expert_map"], args["counts"],
                                        int(args["alignment"]), args.get("scales"))
    assert torch.equal(cpu.expanded_row_idx, want[2]) and torch.equal(cpu.expert_tokens, want[3])
    total = int(want[3][-1] if args["counts"] == "cumsum" else want[3].sum()) if want[3].numel() else 0
    assert torch.equal(bits(cpu.permuted[:total]), bits(want[0][:total]))
    if want[1] is not None:
        assert torch.equal(cpu.permuted_scales[:total], want[1][:total])


def test_huge_alignment_zeroes_every_pad_row(device):
    # More pad rows per expert than the CUDA zeroing grid covers in one sweep (65535 chunks of 4 rows).
    generator = torch.Generator().manual_seed(12)
    ids = torch.tensor([[0], [1], [1], [-1]], dtype=torch.int32)
    hidden = torch.randn(4, 8, generator=generator)
    scales = torch.rand(4, 1, generator=generator)
    got, total = check_against_reference(device, hidden, ids, 2, alignment=300_001, scales=scales)
    assert total == 600_002 and got.permuted.shape == (4 + 2 * 300_000, 8)


def test_torch_compile_dynamic_token_count():
    # The padded row bound is an expression of T: one dynamic graph serves every token count.
    def layer(x, ids, scales):
        result = moe_permute(x, ids, num_experts=8, alignment=16, scales=scales)
        rows = result.permuted.float() * result.permuted_scales[:, :1]
        return moe_unpermute(rows, result.expanded_row_idx, topk=2), result.expert_tokens

    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    generator = torch.Generator().manual_seed(13)
    for num_tokens in (5, 9, 17):
        x = torch.randn(num_tokens, 130, generator=generator).to(FP8)
        ids = torch.randint(-1, 8, (num_tokens, 2), generator=generator, dtype=torch.int32)
        scales = torch.rand(num_tokens, 2, generator=generator)
        for got, want in zip(compiled(x, ids, scales), layer(x, ids, scales)):
            assert torch.equal(got, want)
