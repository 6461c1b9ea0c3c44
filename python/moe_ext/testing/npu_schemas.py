"""The real schemas of the torch_npu operators moe_ext calls, pinned to one torch-npu release.

``torch_npu.npu_X`` is ``torch.ops.npu.npu_X`` (torch_npu's
``_init/core/_exports.py`` and ``utils/custom_ops.py``), so a real call is
bound by torch's own schema matcher against the operator's declared schema:
argument names, positional versus keyword-only, required arguments, types and
the number of returns. The schemas are declared in
``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`` inside the wheel.

Why a checked-in copy of the needed lines, not the wheel at test time: the
binding check runs in every test process that touches the NPU call sites
(many spawned ranks), offline and in milliseconds, and can never be skipped;
the wheel is 44 MB and cannot be imported here (it needs CANN, and installing
it pins torch). What keeps the copy honest is
``tests/test_npu_schemas.py::test_checked_in_schemas_match_the_wheel``: it
fetches the pinned wheel from PyPI (``pip download``), checks its sha256 and
that every line below occurs verbatim in the wheel's yaml. When PyPI cannot
be reached that test is *skipped with a loud warning* (never passed);
``MOE_EXT_REQUIRE_TORCH_NPU_WHEEL=1`` turns the skip into a failure.

To move to another torch-npu release: change the three constants, run that
test with ``MOE_EXT_TORCH_NPU_WHEEL=/path/to/wheel`` and copy the lines it
reports as different.

:func:`bound_operators` registers these schemas in a scratch ``torch.library``
namespace; :mod:`moe_ext.testing.npu` routes every emulated operator through
it, so a call that the real operator would refuse at binding time (a wrong
keyword, a keyword-only argument passed by position, a missing required
argument, a wrong type) fails the same way under the emulation, and an
emulation that returns the wrong number or kind of outputs fails too.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict

import torch

__all__ = ["TORCH_NPU_VERSION", "TORCH_NPU_WHEEL", "TORCH_NPU_WHEEL_SHA256", "SCHEMA_FILE_IN_WHEEL", "SCHEMAS",
           "SCHEMAS_BY_PACKET", "CALL_SITE_OPERATORS", "SCRATCH_NAMESPACE", "bound_operators", "calling",
           "schema_defaults", "schema_lines_in_wheel"]

TORCH_NPU_VERSION = "2.14.0"
TORCH_NPU_WHEEL = "torch_npu-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl"
TORCH_NPU_WHEEL_SHA256 = "7736f7d82cf9f16c7dfc4537f7e7c638153da760273a193455e70857f912189e"
SCHEMA_FILE_IN_WHEEL = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"

# Verbatim ``func:`` lines of the wheel's yaml (torch-npu 2.13.0 declares the same for these operators).
SCHEMAS: Dict[str, str] = {
    'npu_moe_init_routing_v2':
        'npu_moe_init_routing_v2(Tensor x, Tensor expert_idx, *, Tensor? scale=None, Tensor? offset=None, int active_num=-1, int expert_capacity=-1, int expert_num=-1, int drop_pad_mode=0, int expert_tokens_num_type=0, bool expert_tokens_num_flag=False, int quant_mode=-1, int[2] active_expert_range=[], int row_idx_type=0, int? x_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)',
    'npu_moe_token_unpermute':
        'npu_moe_token_unpermute(Tensor permuted_tokens, Tensor sorted_indices, Tensor? probs=None, bool padded_mode=False, int[]? restore_shape=None) -> Tensor',
    'npu_grouped_matmul':
        'npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, Tensor[]? per_token_scale=None, Tensor? group_list=None, Tensor[]? activation_input=None, Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, int? group_type=None, int? group_list_type=0, int? act_type=0, int[]? tuning_config=None, int? output_dtype=None, int? x_dtype=None, int? weight_dtype=None, int? scale_dtype=None, int? per_token_scale_dtype=None) -> Tensor[]',
    'npu_grouped_matmul.List':
        'npu_grouped_matmul.List(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, Tensor[]? per_token_scale=None, int[]? group_list=None, Tensor[]? activation_input=None, Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, int? group_type=None, int? group_list_type=0, int? act_type=0, ScalarType? output_dtype=None) -> Tensor[]',
    'npu_swiglu':
        'npu_swiglu(Tensor self, int dim=-1) -> Tensor',
    'npu_moe_distribute_dispatch':
        'npu_moe_distribute_dispatch(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, Tensor? scales=None, Tensor? x_active_mask=None, Tensor? expert_scales=None, str group_tp="", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, int quant_mode=0, int global_bs=0, int expert_token_nums_type=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)',
    'npu_moe_distribute_dispatch_v2':
        'npu_moe_distribute_dispatch_v2(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, Tensor? scales=None, Tensor? x_active_mask=None, Tensor? expert_scales=None, Tensor? elastic_info=None, Tensor? performance_info=None, str group_tp="", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, int quant_mode=0, int global_bs=0, int expert_token_nums_type=1, str comm_alg="", int zero_expert_num=0, int copy_expert_num=0, int const_expert_num=0, int? y_dtype=None, int? x_dtype=None, int? scales_dtype=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)',
    'npu_moe_distribute_combine':
        'npu_moe_distribute_combine(Tensor expand_x, Tensor expert_ids, Tensor expand_idx, Tensor ep_send_counts, Tensor expert_scales, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, Tensor? tp_send_counts=None, Tensor? x_active_mask=None, Tensor? activation_scale=None, Tensor? weight_scale=None, Tensor? group_list=None, Tensor? expand_scales=None, Tensor? shared_expert_x=None, str group_tp="", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, int global_bs=0, int out_dtype=0, int comm_quant_mode=0, int group_list_type=0) -> Tensor',
    'npu_moe_distribute_combine_v2':
        'npu_moe_distribute_combine_v2(Tensor expand_x, Tensor expert_ids, Tensor assist_info_for_combine, Tensor ep_send_counts, Tensor expert_scales, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, Tensor? tp_send_counts=None, Tensor? x_active_mask=None, Tensor? expand_scales=None, Tensor? shared_expert_x=None, Tensor? elastic_info=None, Tensor? ori_x=None, Tensor? const_expert_alpha_1=None, Tensor? const_expert_alpha_2=None, Tensor? const_expert_v=None, Tensor? performance_info=None, str group_tp="", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, int global_bs=0, int comm_quant_mode=0, str comm_alg="", int zero_expert_num=0, int copy_expert_num=0, int const_expert_num=0) -> Tensor',
    'npu_mm_all_reduce_base':
        "npu_mm_all_reduce_base(Tensor x1, Tensor x2, str hcom, *, str reduce_op='sum', Tensor? bias=None, Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, Tensor? x3=None, Tensor? dequant_scale=None, Tensor? pertoken_scale=None, Tensor? comm_quant_scale_1=None, Tensor? comm_quant_scale_2=None, int antiquant_group_size=0, int comm_turn=0, int[]? group_sizes=None, int? y_dtype=None, int? x1_dtype=None, int? x2_dtype=None, int? dequant_scale_dtype=None, int? pertoken_scale_dtype=None, int comm_quant_mode=0, str? comm_mode=None) -> Tensor",
    'npu_mm_reduce_scatter_base':
        "npu_mm_reduce_scatter_base(Tensor self, Tensor x2, str hcom, int world_size, *, str reduce_op='sum', Tensor? bias=None, Tensor? x1_scale=None, Tensor? x2_scale=None, int comm_turn=0, ScalarType? output_dtype=None, str? comm_mode=None) -> Tensor",
}

# Every torch_npu operator moe_ext calls or will call (platform/npu.py); a test asserts each is bound at least once.
CALL_SITE_OPERATORS = ("npu_moe_init_routing_v2", "npu_moe_token_unpermute", "npu_grouped_matmul", "npu_swiglu",
                       "npu_moe_distribute_dispatch", "npu_moe_distribute_dispatch_v2",
                       "npu_moe_distribute_combine", "npu_moe_distribute_combine_v2",
                       "npu_mm_all_reduce_base", "npu_mm_reduce_scatter_base")

SCRATCH_NAMESPACE = "moe_ext_torch_npu_" + TORCH_NPU_VERSION.replace(".", "_")

# packet (``torch_npu.npu_X``) -> its overload names ("" for the default overload)
SCHEMAS_BY_PACKET: Dict[str, tuple] = {}
for _name in SCHEMAS:
    _packet, _, _overload = _name.partition(".")
    SCHEMAS_BY_PACKET[_packet] = SCHEMAS_BY_PACKET.get(_packet, ()) + (_overload,)
del _name, _packet, _overload


def schema_defaults(packet: str) -> Dict[str, Any]:
    """Argument name -> default value of the default overload of ``packet`` (required ones absent)."""
    schema = torch._C.parse_schema(SCHEMAS[packet])
    return {a.name: a.default_value for a in schema.arguments if a.has_default_value()}

_lock = threading.Lock()
_library = None
_active = threading.local()


def _bind_arguments(schema: torch._C.FunctionSchema, args: tuple, kwargs: dict) -> dict:
    """Every argument of ``schema`` by name, defaults filled in (the kernel receives only what was passed)."""
    bound = {}
    positional = list(args)
    for argument in schema.arguments:
        if not argument.kwarg_only and positional:
            bound[argument.name] = positional.pop(0)
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:  # the dispatcher already refused this; keep the invariant loud
            raise AssertionError(f"{schema.name}: no value for {argument.name}")
    return bound


def _kernel(packet: str, schema_text: str) -> Callable[..., Any]:
    schema = torch._C.parse_schema(schema_text)

    def kernel(*args, **kwargs):
        implementation = getattr(_active, "implementation", None)
        if implementation is None:
            raise RuntimeError(f"{SCRATCH_NAMESPACE}::{packet} was called outside an emulated torch_npu call")
        return implementation(packet, schema.overload_name, _bind_arguments(schema, args, kwargs))
    return kernel


def bound_operators():
    """``torch.ops.<SCRATCH_NAMESPACE>``: the pinned schemas, registered once per process.

    Call an operator inside :func:`calling` so that its kernel reaches the
    emulation: ``with calling(fn): torch.ops.<ns>.npu_swiglu(x, dim=-1)``,
    where ``fn(packet, overload, arguments_by_name)`` computes the outputs.
    """
    global _library
    with _lock:
        if _library is None:
            library = torch.library.Library(SCRATCH_NAMESPACE, "DEF")
            for name, schema_text in SCHEMAS.items():
                library.define(schema_text)
                packet = name.split(".")[0]
                # CompositeImplicitAutograd: the emulation's own torch ops carry autograd, as the
                # differentiable NPU operators (npu_moe_token_unpermute, npu_grouped_matmul) do.
                library.impl(name, _kernel(packet, schema_text), "CompositeImplicitAutograd")
            _library = library
    return getattr(torch.ops, SCRATCH_NAMESPACE)


class calling:
    """Context: operators of :func:`bound_operators` called inside run ``implementation``."""

    def __init__(self, implementation: Callable[[str, str, dict], Any]):
        self.implementation = implementation

    def __enter__(self):
        self.previous = getattr(_active, "implementation", None)
        _active.implementation = self.implementation
        return self

    def __exit__(self, *exc):
        _active.implementation = self.previous
        return False


def schema_lines_in_wheel(wheel_path: str) -> Dict[str, str]:
    """The ``func:`` line of each operator in :data:`SCHEMAS` as the wheel declares it ('' if absent)."""
    import zipfile
    with zipfile.ZipFile(wheel_path) as wheel:
        text = wheel.read(SCHEMA_FILE_IN_WHEEL).decode("utf-8")
    found = {name: "" for name in SCHEMAS}
    for line in text.splitlines():
        stripped = line.strip().removeprefix("- ").strip()
        if not stripped.startswith("func: "):
            continue
        schema = stripped[len("func: "):].strip()
        name = schema.split("(", 1)[0]
        if name in found:
            if found[name] and found[name] != schema:
                raise ValueError(f"{wheel_path}: {name} is declared twice, differently")
            found[name] = schema
    return found
