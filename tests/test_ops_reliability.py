"""Reliability of the routing ops on bad and adversarial input (issue 15, items 1-4; issue 20, item 6).

Every input named in the issue is a test here; a hypothesis fuzz test then
walks each op's argument space (types, dtypes, shapes, devices, extreme
integers) and checks the one rule: a call either returns the reference result
or raises TypeError / moe_ext.errors.ArgumentError - never another exception,
never a crash - and meta (fake) kernels refuse whatever the real kernels
refuse without reading values.

The fuzz runs a fixed, derandomised number of examples per op in CI
(``MOE_EXT_FUZZ_EXAMPLES``, default 150; raise it for a longer local run).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_ext.errors import ArgumentError
from moe_ext.ops import (expert_histogram, gather_rows, generate_permute_indices, group_by_local_expert,
                         moe_permute, moe_unpermute, scatter_rows, ungroup_by_local_expert)
from moe_ext.testing.reference import (expert_histogram_reference, moe_permute_reference,
                                       moe_unpermute_reference)
from device_assert import assert_stops_with_device_assert

I64_MIN = -2**63


def _assert_permute_equal(got, want):
    permuted, row_idx, tokens = got
    want_permuted, want_row_idx, want_tokens = want
    assert torch.equal(row_idx.cpu(), want_row_idx.cpu())
    assert torch.equal(tokens.cpu(), want_tokens.cpu())
    valid = int((want_row_idx >= 0).sum())
    assert torch.equal(permuted[:valid].cpu(), want_permuted[:valid].cpu())


# ---------------------------------------------------------------- item 1: expert-map values

@pytest.mark.parametrize("active", [(2, 2), (1, 2), (0, 2)])
def test_corrupt_map_value_is_refused_not_read_out_of_bounds(device, active):
    """Was a segfault ((2, 2)) and a corrupted heap ((1, 2)): key - start overflowed."""
    if device == "cuda":
        pytest.skip("CUDA: device-side assert, see test_cuda_corrupt_map_value_stops_with_a_device_assert")
    with pytest.raises(ArgumentError, match=r"expert_map values must be in \[0, num_experts=2\) or -1 "
                                            r"\(not on this rank\), got expert_map\[0\] = -9223372036854775808"):
        moe_permute(torch.zeros(1, 1), torch.tensor([[0]]), num_experts=2,
                    expert_map=torch.tensor([I64_MIN, 0]), active_expert_range=active)


def test_corrupt_map_value_gave_duplicate_positions():
    """num_experts=3, map [-2^63, 0, 1], range (2, 3), ids [5, 2]: was duplicated garbage positions."""
    expert_map = torch.tensor([I64_MIN, 0, 1])
    ids = torch.tensor([[0, 1], [2, 1], [0, 2], [1, 1], [2, 0]])
    with pytest.raises(ArgumentError, match=r"got expert_map\[0\] = -9223372036854775808"):
        moe_permute(torch.randn(5, 3), ids, num_experts=3, expert_map=expert_map, active_expert_range=(2, 3))
    # The corrupt entry is refused only when a row looks it up; otherwise the
    # layout is exact (keys 0 and 1 fall outside (2, 3): all rows dropped).
    ids = torch.tensor([[1, 2], [2, 1], [1, 2], [1, 1], [2, 2]])
    hidden = torch.randn(5, 3)
    got = moe_permute(hidden, ids, num_experts=3, expert_map=expert_map, active_expert_range=(2, 3))
    assert got.expanded_row_idx.tolist() == [-1] * 10 and got.expert_tokens.tolist() == [0]
    got = moe_permute(hidden, ids, num_experts=3, expert_map=expert_map, active_expert_range=(0, 2))
    _assert_permute_equal(got, moe_permute_reference(hidden, ids, 3, (0, 2), expert_map))


@pytest.mark.parametrize("value", [-2, 3, 2**31, 2**63 - 1])
def test_map_values_outside_the_key_space_are_refused(value):
    with pytest.raises(ArgumentError, match=rf"expert_map\[1\] = {value}"):
        moe_permute(torch.randn(2, 4), torch.tensor([[1], [0]]), num_experts=3,
                    expert_map=torch.tensor([0, value, -1]), active_expert_range=(0, 1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("active", [(2, 2), (1, 2)])
def test_cuda_corrupt_map_value_stops_with_a_device_assert(active):
    assert_stops_with_device_assert(
        f"moe_ext.ops.moe_permute(torch.zeros(1, 1, device='cuda'), torch.tensor([[0]], device='cuda'), "
        f"num_experts=2, expert_map=torch.tensor([-2**63, 0], device='cuda'), active_expert_range={active})",
        "expert_map value out of range")


# ---------------------------------------------------------------- issue 20 item 6: -1 = no expert

@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_minus_one_is_no_expert_on_every_backend(device, id_dtype):
    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 8, (40, 3), generator=generator, dtype=id_dtype)
    ids[torch.rand(40, 3, generator=generator) < 0.3] = -1
    ids[5] = -1  # a whole padding token
    hidden = torch.randn(40, 16, generator=generator)
    expert_map = torch.tensor([2, -1, 0, 1, -1, -1, 3, -1], dtype=torch.int32)
    for kwargs in (dict(), dict(active_expert_range=(2, 6)),
                   dict(expert_map=expert_map, active_expert_range=(0, 4))):
        want = moe_permute_reference(hidden, ids, 8, **kwargs)
        assert bool((want[1][ids.reshape(-1) == -1] == -1).all())
        if "expert_map" in kwargs:
            kwargs = dict(kwargs, expert_map=expert_map.to(device))
        got = moe_permute(hidden.to(device), ids.to(device), num_experts=8, **kwargs)
        _assert_permute_equal(got, want)
    # Counted nowhere, consistently with expert_histogram.
    got = moe_permute(hidden.to(device), ids.to(device), num_experts=8)
    assert torch.equal(got.expert_tokens.cpu(), expert_histogram(ids.to(device), 8).cpu())
    assert int(got.expert_tokens.sum()) == int((ids >= 0).sum())
    # The round trip skips the padding rows: a padding token comes back as zeros.
    out = moe_unpermute(got.permuted, got.expanded_row_idx, topk=3)
    assert torch.equal(out[5].cpu(), torch.zeros(16))
    torch.testing.assert_close(out.cpu(), moe_unpermute_reference(got.permuted.cpu(),
                                                                  got.expanded_row_idx.cpu(), topk=3))


def test_minus_one_gradient_is_zero_for_padding():
    hidden = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, -1], [-1, -1], [1, 0]])
    got = moe_permute(hidden, ids, num_experts=2)
    valid = int(got.expert_tokens.sum())
    got.permuted[:valid].sum().backward()
    assert hidden.grad[1].tolist() == [0.0] * 4
    assert hidden.grad[0].tolist() == [1.0] * 4 and hidden.grad[2].tolist() == [2.0] * 4


@pytest.mark.parametrize("bad", [-2, 8, 2**31 - 1, I64_MIN])
def test_other_out_of_range_ids_stay_errors(bad):
    ids = torch.tensor([[0, bad]])
    with pytest.raises(ArgumentError, match=rf"topk_ids must be in \[0, num_experts=8\) or -1 .*got {bad}"):
        moe_permute(torch.randn(1, 4), ids, num_experts=8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_other_out_of_range_ids_stop_with_a_device_assert():
    assert_stops_with_device_assert(
        "moe_ext.ops.moe_permute(torch.randn(2, 8, device='cuda'), "
        "torch.tensor([[0, -1], [-2, 1]], device='cuda'), num_experts=4)", "topk_ids out of range")


# ---------------------------------------------------------------- item 2: mixed devices

def _meta(t):
    return t.to("meta")


@pytest.mark.parametrize("which", ["hidden_states", "topk_ids", "expert_map"])
def test_permute_mixed_meta_and_cpu_is_refused(which):
    args = dict(hidden_states=torch.randn(4, 8), topk_ids=torch.zeros(4, 2, dtype=torch.int64),
                expert_map=torch.arange(4))
    args[which] = _meta(args[which])
    with pytest.raises(ArgumentError, match=r"all tensor arguments must be on one device, but \w+ is on "
                                            r"(meta|cpu) and \w+ is on (cpu|meta)"):
        moe_permute(args["hidden_states"], args["topk_ids"], num_experts=4, expert_map=args["expert_map"])
    # The same call straight into the op (no wrapper) reaches the fake kernel: it refuses too.
    with pytest.raises(ArgumentError, match="one device"):
        torch.ops.moe_ext.moe_permute(args["hidden_states"], args["topk_ids"], 4, 0, 4, args["expert_map"],
                                      False)


@pytest.mark.parametrize("which", ["permuted", "expanded_row_idx", "probs"])
def test_unpermute_mixed_meta_and_cpu_is_refused(which):
    args = dict(permuted=torch.randn(4, 8), expanded_row_idx=torch.arange(4, dtype=torch.int32),
                probs=torch.rand(2, 2))
    args[which] = _meta(args[which])
    with pytest.raises(ArgumentError, match="one device"):
        moe_unpermute(args["permuted"], args["expanded_row_idx"], args["probs"])
    with pytest.raises(ArgumentError, match="one device"):
        torch.ops.moe_ext.moe_unpermute(args["permuted"], args["expanded_row_idx"], args["probs"], 2)


def test_unpermute_backward_grad_output_on_meta_is_refused():
    with pytest.raises(ArgumentError, match="grad_output is on meta and permuted is on cpu"):
        torch.ops.moe_ext.moe_unpermute_backward(torch.randn(2, 8, device="meta"), torch.randn(4, 8),
                                                 torch.arange(4, dtype=torch.int32), None, 2, False)


def test_rows_and_regroup_mixed_devices_are_refused():
    x, indices = torch.randn(4, 3), torch.tensor([0, 1, -1, 2])
    with pytest.raises(ArgumentError, match="indices is on meta and x is on cpu"):
        gather_rows(x, _meta(indices))
    with pytest.raises(ArgumentError, match="indices is on meta and x is on cpu"):
        scatter_rows(x, _meta(indices), 4)
    with pytest.raises(ArgumentError, match="one device"):
        group_by_local_expert(x, _meta(torch.tensor([1, 1])), 2, 1, 1, 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_mixed_are_refused_naming_both():
    with pytest.raises(ArgumentError, match="topk_ids is on cpu and hidden_states is on cuda:0"):
        moe_permute(torch.randn(3, 4, device="cuda"), torch.zeros(3, 2, dtype=torch.int32), num_experts=4)
    with pytest.raises(ArgumentError, match="probs is on cpu and permuted is on cuda:0"):
        moe_unpermute(torch.randn(4, 4, device="cuda"), torch.arange(4, device="cuda"), torch.rand(2, 2))


# ---------------------------------------------------------------- item 3: silent coercion

@pytest.mark.parametrize("value", [4.7, 4.0, "4", True, None, [4], torch.tensor(4)])
def test_num_experts_must_be_an_int(value):
    with pytest.raises(TypeError, match=r"moe_permute: num_experts must be an int, got "):
        moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), num_experts=value)
    with pytest.raises(TypeError, match=r"expert_histogram: num_experts must be an int"):
        expert_histogram(torch.zeros(2, dtype=torch.int64), value)


def test_numpy_integers_are_ints():
    got = moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), num_experts=np.int64(4),
                      active_expert_range=(np.int32(0), np.int64(2)))
    assert got.expert_tokens.tolist() == [2, 0]


@pytest.mark.parametrize("active", [(0.0, 2), (0, 2.5), ("0", 2), (False, 2)])
def test_range_bounds_must_be_ints(active):
    with pytest.raises(TypeError, match=r"active_expert_range\[[01]\] \((start|end)\) must be an int"):
        moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), num_experts=4,
                    active_expert_range=active)


@pytest.mark.parametrize("call", [
    lambda: moe_unpermute(torch.randn(4, 2), torch.arange(4), topk=2.0),
    lambda: scatter_rows(torch.randn(2, 2), torch.tensor([0, 1]), 3.5),
    lambda: ungroup_by_local_expert(torch.randn(2, 2), torch.tensor([0, 1]), "2"),
    lambda: generate_permute_indices(torch.tensor([1, 1]), 2.0, 1, 8, 1),
    lambda: generate_permute_indices(torch.tensor([1, 1]), 2, True, 8, 1),
    lambda: generate_permute_indices(torch.tensor([1, 1]), 2, 1, 8.0, 1),
    lambda: generate_permute_indices(torch.tensor([1, 1]), 2, 1, 8, None),
    lambda: moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), num_experts=4, counts=1),
])
def test_every_int_and_choice_argument_is_type_checked(call):
    with pytest.raises(TypeError, match="must be an? (int|str)"):
        call()


# ---------------------------------------------------------------- item 4: unclear errors

def test_num_experts_none_names_the_argument():
    with pytest.raises(TypeError, match=r"moe_permute: num_experts must be an int, got NoneType \(None\)"):
        moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), num_experts=None)


def test_three_tuple_range_names_the_argument():
    with pytest.raises(ArgumentError, match=r"active_expert_range must be \(start, end\), 2 ints, got 3 "
                                            r"values \(0, 1, 2\)"):
        moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), num_experts=4,
                    active_expert_range=(0, 1, 2))
    with pytest.raises(TypeError, match="active_expert_range must be a \\(start, end\\) tuple of ints or None, "
                                        "got int"):
        moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), num_experts=4,
                    active_expert_range=3)


def test_list_hidden_states_names_the_argument():
    with pytest.raises(TypeError, match="moe_permute: hidden_states must be a torch.Tensor, got list"):
        moe_permute([[1.0, 2.0]], torch.zeros(1, 1, dtype=torch.int64), num_experts=4)
    with pytest.raises(TypeError, match="moe_unpermute: permuted must be a torch.Tensor, got list"):
        moe_unpermute([[1.0]], torch.zeros(1, dtype=torch.int64), topk=1)
    with pytest.raises(TypeError, match="gather_rows: x must be a torch.Tensor, got list"):
        gather_rows([[1.0]], torch.zeros(1, dtype=torch.int64))


def test_group_counts_past_the_rows_of_x_blame_x():
    with pytest.raises(ArgumentError, match=r"tokens_per_expert_group sums to 7 rows but x has 4 rows"):
        group_by_local_expert(torch.randn(4, 3), torch.tensor([3, 4]), 2, 1, 1, 16)


def test_ungroup_too_small_num_rows_blames_num_rows():
    grouped = group_by_local_expert(torch.randn(6, 3), torch.tensor([2, 4]), 2, 1, 4, 16)
    with pytest.raises(ArgumentError, match=r"ungroup_by_local_expert: num_rows must exceed .*>= 6\), got 3"):
        ungroup_by_local_expert(grouped.rows, grouped.permuted_indices, 3)


@pytest.mark.parametrize("call,message", [
    (lambda: scatter_rows(torch.randn(1, 2), torch.tensor([0]), 2**40), r"num_rows must be <= 2147483647"),
    (lambda: ungroup_by_local_expert(torch.randn(1, 2), torch.tensor([0]), 2**40),
     r"num_rows must be <= 2147483647"),
    (lambda: expert_histogram(torch.zeros(2, dtype=torch.int64), 2**40), r"num_experts must be <= 2147483647"),
    (lambda: moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), num_experts=2**40),
     r"num_experts must be <= 2147483647"),
    (lambda: generate_permute_indices(torch.tensor([1, 1]), 2, 1, 2**40, 1), r"max_len must be <= 2147483648"),
    (lambda: generate_permute_indices(torch.ones(2, dtype=torch.int64), 2**31, 2**31, 8, 1), "overflows int32"),
])
def test_huge_sizes_are_refused_before_allocating(call, message):
    with pytest.raises(ArgumentError, match=message):
        call()


@pytest.mark.parametrize("call", [
    lambda d: moe_permute(torch.randn(2, 4, device=d), torch.zeros(2, 1, dtype=torch.int64, device=d),
                          num_experts=0),
    lambda d: moe_permute(torch.randn(2, 4, device=d), torch.zeros(2, 0, dtype=torch.int64, device=d),
                          num_experts=4),
    lambda d: moe_unpermute(torch.randn(2, 4, device=d), torch.zeros(2, 0, dtype=torch.int64, device=d)),
    lambda d: expert_histogram(torch.zeros(2, dtype=torch.int64, device=d), 0),
    lambda d: scatter_rows(torch.randn(2, 4, device=d), torch.zeros(3, dtype=torch.int64, device=d), 4),
    lambda d: generate_permute_indices(torch.ones(3, dtype=torch.int64, device=d), 2, 1, 8, 1),
])
@pytest.mark.parametrize("device_name", ["cpu", "meta"])
def test_fake_and_real_kernels_refuse_the_same_calls(call, device_name):
    with pytest.raises(ArgumentError):
        call(device_name)


def test_fake_kernels_called_directly_refuse_what_cpu_refuses():
    for device_name in ("cpu", "meta"):
        with pytest.raises(ValueError, match="num_experts must be >= 1"):
            torch.ops.moe_ext.moe_permute(torch.randn(2, 4, device=device_name),
                                          torch.zeros(2, 1, dtype=torch.int64, device=device_name),
                                          0, 0, 0, None, False)
        with pytest.raises(ValueError, match="K >= 1"):
            torch.ops.moe_ext.moe_permute(torch.randn(2, 4, device=device_name),
                                          torch.zeros(2, 0, dtype=torch.int64, device=device_name),
                                          4, 0, 4, None, False)


def test_dtype_names_use_torch_spelling():
    with pytest.raises(TypeError, match=r"topk_ids must be torch.int32 or torch.int64, got torch.int8"):
        moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int8), num_experts=4)
    with pytest.raises(TypeError, match=r"got torch.uint8"):
        expert_histogram(torch.zeros(2, dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match=r"tokens_per_expert_group must be torch.int32 or torch.int64, "
                                        r"got torch.int16"):
        generate_permute_indices(torch.ones(2, dtype=torch.int16), 2, 1, 8, 1)


# ---------------------------------------------------------------- fuzz: each op's argument space

FUZZ_EXAMPLES = int(os.environ.get("MOE_EXT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# Refusals that need tensor values: the meta kernels cannot make them.
VALUE_ERRORS = re.compile(r"topk_ids must be in|expert_map values|must be in \[-1|at most once|"
                          r"tokens_per_expert_group must be >= 0|does not fit in int32|total tokens|"
                          r"the padded layout needs|sums to|num_rows must exceed")

EXTREMES = [-1, -2, 0, 1, 2**31 - 1, 2**31, 2**63 - 1, I64_MIN]  # values inside tensors
# Size arguments: extremes past every cap (a size just under a cap is valid and
# would allocate gigabytes; test_huge_sizes_are_refused_before_allocating
# covers the caps themselves).
SIZE_EXTREMES = [-1, -2, 2**32, 2**63 - 1, I64_MIN]


def int_like(low=-2, high=9):
    """Mostly valid small sizes, sometimes extremes or the wrong type."""
    return st.one_of(st.integers(low, high), st.integers(low, high), st.integers(low, high),
                     st.sampled_from(SIZE_EXTREMES),
                     st.sampled_from([4.0, 2.5, "3", None, True, np.int64(3)]))


def index_tensor(draw, shape, high):
    values = draw(st.lists(st.one_of(st.integers(-1, max(high, 0)), st.integers(-1, max(high, 0)),
                                     st.sampled_from(EXTREMES)),
                           min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int32, torch.int16, torch.float32]))
    tensor = torch.tensor(values, dtype=torch.int64).reshape(shape)
    if dtype == torch.int32:
        tensor = tensor.clamp(-2**31, 2**31 - 1)
    elif dtype == torch.int16:
        tensor = tensor.clamp(-2**15, 2**15 - 1)
    return tensor.to(dtype)


def float_tensor(draw, shape):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int32]))
    return torch.randn(shape).to(dtype)


def run_both(call, args: dict, tensors: list):
    """(cpu outcome, meta outcome): each the result or the exception raised."""
    outcomes = []
    for device_name in ("cpu", "meta"):
        moved = {k: (v.to(device_name) if k in tensors and isinstance(v, torch.Tensor) else v)
                 for k, v in args.items()}
        try:
            outcomes.append(call(**moved))
        except (TypeError, ValueError) as error:
            outcomes.append(error)
    cpu, meta = outcomes
    for outcome in outcomes:
        if isinstance(outcome, ValueError):
            assert isinstance(outcome, ArgumentError), f"a bad value must raise ArgumentError: {outcome!r}"
    if isinstance(meta, Exception):
        assert type(cpu) is type(meta), f"meta refused ({meta!r}) but cpu gave {cpu!r}"
    elif isinstance(cpu, Exception):
        assert VALUE_ERRORS.search(str(cpu)), f"cpu refused ({cpu!r}) a call meta accepted, not a value error"
    else:
        cpu_list = list(cpu) if isinstance(cpu, tuple) else [cpu]
        meta_list = list(meta) if isinstance(meta, tuple) else [meta]
        for a, b in zip(cpu_list, meta_list):
            assert a.shape == b.shape and a.dtype == b.dtype
    return cpu


@st.composite
def permute_args(draw):
    num_tokens, topk, hidden = draw(st.integers(0, 5)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    num_experts = draw(int_like(-1, 6))
    high = num_experts if isinstance(num_experts, int) and 0 < num_experts < 10 else 4
    ids_shape = draw(st.sampled_from([(num_tokens, topk), (num_tokens, topk), (num_tokens + 1, topk),
                                      (num_tokens * topk,)]))
    args = dict(hidden_states=float_tensor(draw, (num_tokens, hidden)),
                topk_ids=index_tensor(draw, ids_shape, high),
                num_experts=num_experts,
                active_expert_range=draw(st.one_of(st.none(), st.tuples(int_like(0, 6), int_like(0, 6)),
                                                   st.just((0, 1, 2)), st.just([0, 1]))),
                expert_map=draw(st.one_of(st.none(), st.none(), st.integers(0, 7))),
                counts=draw(st.sampled_from(["count", "cumsum", "sum", 1])))
    if args["expert_map"] is not None:
        args["expert_map"] = index_tensor(draw, (args["expert_map"],), high)
    if draw(st.integers(0, 15)) == 0:
        args["hidden_states"] = args["hidden_states"].tolist()
    return args


@FUZZ
@given(permute_args())
def test_fuzz_moe_permute(args):
    cpu = run_both(moe_permute, args, ["hidden_states", "topk_ids", "expert_map"])
    if not isinstance(cpu, Exception):
        want = moe_permute_reference(args["hidden_states"], args["topk_ids"], int(args["num_experts"]),
                                     args["active_expert_range"], args["expert_map"], args["counts"])
        _assert_permute_equal(cpu, want)


@st.composite
def unpermute_args(draw):
    rows, hidden = draw(st.integers(0, 6)), draw(st.integers(0, 3))
    entries = draw(st.integers(0, 6))
    topk = draw(st.one_of(st.none(), int_like(-1, 4)))
    idx = index_tensor(draw, (entries,), rows)
    if draw(st.booleans()) and isinstance(topk, int) and topk > 0 and entries % topk == 0:
        idx = idx.reshape(entries // topk, topk)
    probs = None
    if draw(st.booleans()):
        k = topk if isinstance(topk, int) and 0 < topk < 5 else 2
        t = draw(st.sampled_from([max(entries // k, 0), entries]))
        probs = torch.rand(t, k).to(draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])))
    return dict(permuted=float_tensor(draw, (rows, hidden)), expanded_row_idx=idx, probs=probs, topk=topk)


@FUZZ
@given(unpermute_args())
def test_fuzz_moe_unpermute(args):
    cpu = run_both(moe_unpermute, args, ["permuted", "expanded_row_idx", "probs"])
    if not isinstance(cpu, Exception) and cpu.shape[0]:
        idx = args["expanded_row_idx"]
        topk = idx.shape[1] if idx.dim() == 2 else (args["topk"] if args["topk"] is not None
                                                    else args["probs"].shape[1])
        want = moe_unpermute_reference(args["permuted"], idx.reshape(-1), args["probs"], topk)
        torch.testing.assert_close(cpu, want)


@st.composite
def histogram_args(draw):
    shape = draw(st.sampled_from([(0,), (5,), (3, 2), (2, 2, 2)]))
    num_experts = draw(int_like(-1, 6))
    high = num_experts if isinstance(num_experts, int) and 0 < num_experts < 10 else 4
    return dict(topk_ids=index_tensor(draw, shape, high), num_experts=num_experts)


@FUZZ
@given(histogram_args())
def test_fuzz_expert_histogram(args):
    cpu = run_both(expert_histogram, args, ["topk_ids"])
    if not isinstance(cpu, Exception):
        ids = args["topk_ids"].reshape(-1).to(torch.int64)
        kept = ids[(ids >= 0) & (ids < int(args["num_experts"]))]
        assert torch.equal(cpu, expert_histogram_reference(kept, int(args["num_experts"])))


@st.composite
def rows_args(draw):
    rows, hidden, count = draw(st.integers(0, 5)), draw(st.integers(0, 3)), draw(st.integers(0, 5))
    x = torch.randn(rows, hidden).to(draw(st.sampled_from([torch.float32, torch.int64, torch.bfloat16])))
    if draw(st.booleans()):  # scatter: one index per row of x, usually
        count = draw(st.sampled_from([rows, rows, count]))
        num_rows = draw(int_like(-1, 7))
        high = num_rows if isinstance(num_rows, int) and 0 <= num_rows < 10 else 4
        perm = torch.randperm(max(high, count, 1))[:count] - (1 if draw(st.booleans()) else 0)
        indices = perm if draw(st.booleans()) else index_tensor(draw, (count,), high)
        return "scatter", dict(x=x, indices=indices, num_rows=num_rows)
    return "gather", dict(x=x, indices=index_tensor(draw, (count,), rows))


@FUZZ
@given(rows_args())
def test_fuzz_gather_and_scatter_rows(case):
    kind, args = case
    if kind == "gather":
        cpu = run_both(gather_rows, args, ["x", "indices"])
        if not isinstance(cpu, Exception):
            x = args["x"]
            padded = torch.vstack([x, torch.zeros(1, x.shape[1], dtype=x.dtype)])
            assert torch.equal(cpu, padded[args["indices"].long()])
    else:
        cpu = run_both(scatter_rows, args, ["x", "indices"])
        if not isinstance(cpu, Exception):
            want = torch.zeros(int(args["num_rows"]), args["x"].shape[1], dtype=args["x"].dtype)
            taken = args["indices"] >= 0
            want[args["indices"][taken].long()] = args["x"][taken]
            assert torch.equal(cpu, want)


@st.composite
def permute_indices_args(draw):
    experts, ranks = draw(int_like(0, 3)), draw(int_like(0, 3))
    groups = experts * ranks if all(isinstance(v, int) and 0 <= v < 10 for v in (experts, ranks)) else 4
    groups = draw(st.sampled_from([groups, groups, groups + 1]))
    counts = index_tensor(draw, (groups,), 5)
    return dict(tokens_per_expert_group=counts, experts_per_rank=experts, num_ranks=ranks,
                max_len=draw(int_like(-1, 40)), alignment=draw(int_like(0, 4)))


@FUZZ
@given(permute_indices_args())
def test_fuzz_generate_permute_indices(args):
    run_both(generate_permute_indices, args, ["tokens_per_expert_group"])


@st.composite
def regroup_args(draw):
    experts, ranks = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    counts = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=experts * ranks,
                                        max_size=experts * ranks)), dtype=torch.int64)
    rows = int(counts.sum()) + draw(st.integers(-2, 2))
    alignment = draw(st.integers(1, 4))
    x = torch.randn(max(rows, 0), draw(st.integers(0, 3)))
    return dict(x=x, tokens_per_expert_group=counts, experts_per_rank=experts, num_ranks=ranks,
                alignment=alignment, max_len=draw(st.integers(0, 40))), draw(int_like(-1, 12))


@FUZZ
@given(regroup_args())
def test_fuzz_group_and_ungroup(case):
    args, num_rows = case
    grouped = run_both(group_by_local_expert, args, ["x", "tokens_per_expert_group"])
    if isinstance(grouped, Exception):
        return
    back = run_both(ungroup_by_local_expert,
                    dict(grouped=grouped.rows, permuted_indices=grouped.permuted_indices, num_rows=num_rows),
                    ["grouped", "permuted_indices"])
    if not isinstance(back, Exception):
        total = int(args["tokens_per_expert_group"].sum())
        assert torch.equal(back[:total], args["x"][:total])
