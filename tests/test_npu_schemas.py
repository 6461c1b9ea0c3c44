"""The torch_npu call sites are bound by the real schemas of the pinned torch-npu release.

- the checked-in schema lines are those of the wheel (fetched from PyPI; a
  loud skip, never a pass, when it cannot be fetched);
- a call the real operator would refuse at binding time fails under the
  emulation the same way, and so does an emulation with the wrong outputs;
- every operator in the call-site list is bound at least once by the call
  sites themselves (test_npu_emulation.py's multi-process grid asserts the
  whole list; the single-process ones are checked here too).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from moe_ext.platform import npu as adapter
from moe_ext.testing import npu_schemas
from moe_ext.testing.npu import EmulatedTorchNpu, emulated_runtime

REQUIRE_WHEEL = os.environ.get("MOE_EXT_REQUIRE_TORCH_NPU_WHEEL") == "1"


def _wheel_path() -> Path:
    """The pinned wheel: $MOE_EXT_TORCH_NPU_WHEEL, a cached copy, or ``pip download`` (44 MB)."""
    given = os.environ.get("MOE_EXT_TORCH_NPU_WHEEL")
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe_ext" / "torch_npu_wheel"
    wheel = cache / npu_schemas.TORCH_NPU_WHEEL
    if wheel.exists():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    # The exact file whatever the test machine's Python: pin platform, interpreter and ABI.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
               "--abi", "cp311", "-d", str(cache), f"torch-npu=={npu_schemas.TORCH_NPU_VERSION}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"{' '.join(command)}: {error}") from error
    if done.returncode != 0 or not wheel.exists():
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wheel


def test_checked_in_schemas_match_the_wheel():
    try:
        wheel = _wheel_path()
    except RuntimeError as error:
        message = (f"NOT VERIFIED: the checked-in torch_npu schemas were not compared with torch-npu "
                   f"{npu_schemas.TORCH_NPU_VERSION}'s wheel, which could not be fetched: {error}")
        if REQUIRE_WHEEL:
            pytest.fail(message)
        warnings.warn(message)
        pytest.skip(message)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert digest == npu_schemas.TORCH_NPU_WHEEL_SHA256, f"{wheel}: sha256 {digest}"
    found = npu_schemas.schema_lines_in_wheel(str(wheel))
    different = {name: line for name, line in found.items() if line != npu_schemas.SCHEMAS[name]}
    assert not different, f"schema lines that differ from {wheel.name} (paste these into npu_schemas.SCHEMAS):\n" + \
        "\n".join(f"{name!r}: {line!r}" for name, line in different.items())


def test_every_call_site_operator_has_a_pinned_schema():
    assert set(npu_schemas.CALL_SITE_OPERATORS) <= set(npu_schemas.SCHEMAS_BY_PACKET)
    ops = npu_schemas.bound_operators()
    for packet in npu_schemas.SCHEMAS_BY_PACKET:
        assert hasattr(ops, packet)


def test_binding_refuses_what_the_real_operator_refuses():
    ops = EmulatedTorchNpu()
    x, ids = torch.randn(2, 4), torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    good = dict(expert_num=2, expert_tokens_num_type=1, expert_tokens_num_flag=True)
    ops.npu_moe_init_routing_v2(x, ids, **good)
    with pytest.raises(RuntimeError, match="keyword"):           # a keyword the schema does not have
        ops.npu_moe_init_routing_v2(x, ids, num_experts=2, expert_tokens_num_type=1, expert_tokens_num_flag=True)
    with pytest.raises(RuntimeError, match="positional"):        # a keyword-only argument passed by position
        ops.npu_moe_init_routing_v2(x, ids, None)
    with pytest.raises(RuntimeError, match="missing value for argument 'expert_idx'"):
        ops.npu_moe_init_routing_v2(x, **good)
    with pytest.raises(RuntimeError, match="Expected a value of type .int."):  # a wrong type: a float where int is declared
        ops.npu_moe_init_routing_v2(x, ids, **{**good, "expert_num": 2.0})
    with pytest.raises(RuntimeError, match="positional"):        # grouped matmul: only x and weight positional
        ops.npu_grouped_matmul([x], [x.unsqueeze(0)], None, group_list=torch.tensor([2]))
    with pytest.raises(RuntimeError):                            # npu_swiglu's input is named `self`
        ops.npu_swiglu(x=x)
    # What the call site unpacks is the declared arity: dispatch returns 7 tensors, not 6.
    assert len(torch._C.parse_schema(npu_schemas.SCHEMAS["npu_moe_distribute_dispatch_v2"]).returns) == 7


class _WrongArity(EmulatedTorchNpu):
    def _npu_moe_token_unpermute(self, permuted_tokens, sorted_indices, probs, padded_mode, restore_shape):
        return permuted_tokens, permuted_tokens


class _NotATensor(EmulatedTorchNpu):
    def _npu_swiglu(self, self_, dim):
        return [self_]


def test_an_emulation_with_the_wrong_outputs_fails():
    rows = torch.randn(2, 3)
    with pytest.raises(RuntimeError):
        _WrongArity().npu_moe_token_unpermute(rows, torch.tensor([1, 0], dtype=torch.int32))
    with pytest.raises(RuntimeError):
        _NotATensor().npu_swiglu(rows)


def test_an_emulation_without_a_pinned_schema_is_refused():
    class Unpinned(EmulatedTorchNpu):
        def npu_not_a_torch_npu_op(self, x):
            return x

    with pytest.raises(AssertionError, match="no pinned schema"):
        Unpinned()


def test_call_sites_bind_every_single_process_operator():
    """The call sites of platform/npu.py that need no process group, through the binding."""
    runtime = emulated_runtime("A3")
    hidden = torch.randn(3, 8)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1]])
    permuted, row_idx, counts = adapter.init_routing(runtime, hidden, ids, num_experts=3, active_expert_range=(0, 2))
    w13, w2 = torch.randn(2, 8, 4), torch.randn(2, 2, 8)
    out = adapter.grouped_gated_mlp(runtime, permuted, counts, 1, w13, w2)
    valid = int(counts.sum())
    dropped = row_idx < 0
    spare = valid + torch.cumsum(dropped.to(torch.int64), 0) - 1
    index = torch.where(dropped, spare, row_idx.to(torch.int64)).to(torch.int32)
    weights = torch.where(dropped.view(3, 2), torch.zeros(3, 2), torch.full((3, 2), 0.5))
    out = torch.where(torch.arange(out.shape[0]).unsqueeze(1) < valid, out, torch.zeros(()))
    y = adapter.token_unpermute(runtime, out, index, weights)
    assert y.shape == (3, 8) and torch.isfinite(y).all()
    single = {"npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu", "npu_moe_token_unpermute"}
    assert single <= set(runtime.ops.calls)
    # The others need a process group: test_npu_emulation.py's grid asserts that all of
    # CALL_SITE_OPERATORS (these four included) were bound there.
