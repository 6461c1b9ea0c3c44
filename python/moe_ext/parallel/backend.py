"""Matmul + collective steps, fused where the backend has an operator for them.

Three steps cover every op of :mod:`moe_ext.parallel.ops`:

=========================  ===============================  ==================================  ==================
step                       NPU (torch_npu, platform.npu)    CUDA (torch symmetric memory)       otherwise
=========================  ===============================  ==================================  ==================
``linear_all_reduce``      ``npu_mm_all_reduce_base`` (A2)  — (no fused operator in torch)      matmul, all-reduce
``linear_reduce_scatter``  ``npu_mm_reduce_scatter_base``   ``fused_matmul_reduce_scatter``     matmul, reduce-scatter
``all_gather_linear``      — (not wired)                    ``fused_all_gather_matmul``         all-gather, matmul
=========================  ===============================  ==================================  ==================

(the CUDA operators are ``torch.ops.symm_mem.*``).

:class:`LinearBackend` ``fusion`` chooses: ``"auto"`` takes the fused operator
when the call is within its documented limits and falls back to the unfused
pair otherwise; ``"fused"`` requires it (``ArgumentError`` saying why not,
raised on every rank before any communication: the reasons depend only on
facts every member shares); ``"unfused"`` never uses it. The fused operators
have no backward: ``"auto"`` takes the unfused, differentiable pair whenever
autograd records the call, and ``"fused"`` refuses it.

CUDA fused operators run over symmetric memory on an NCCL group; they are
always called with ``return_A=True`` so that the multicast (NVLink SHARP)
variant is never selected: the shared GPU machines run with
``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from moe_ext.distributed.group import ParallelGroup
from moe_ext.errors import ArgumentError, check_choice
from moe_ext.parallel import _collectives
from moe_ext.platform import npu as npu_platform
from moe_ext.platform.npu import NpuRuntime

__all__ = ["FUSION_MODES", "LinearBackend", "linear_all_reduce", "linear_reduce_scatter", "all_gather_linear",
           "cuda_fused_ops_available"]

FUSION_MODES = ("auto", "fused", "unfused")


@dataclass(frozen=True)
class LinearBackend:
    """How the ops run their matmul + collective steps.

    Args:
        fusion: ``"auto"``, ``"fused"`` or ``"unfused"`` (see the module docstring).
        npu: the torch_npu runtime (``moe_ext.platform.npu.detect_npu_runtime()``
            on an Ascend machine, ``moe_ext.testing.npu.emulated_runtime()`` in
            tests); ``None``: the NPU operators are not used.
    """

    fusion: str = "auto"
    npu: Optional[NpuRuntime] = None

    def __post_init__(self) -> None:
        check_choice("LinearBackend.fusion", self.fusion, FUSION_MODES)
        if self.npu is not None and not isinstance(self.npu, NpuRuntime):
            raise TypeError(f"LinearBackend.npu must be an NpuRuntime or None, got {type(self.npu).__name__}")


def cuda_fused_ops_available() -> bool:
    """Whether the installed torch has the symmetric-memory fused matmul operators."""
    try:  # the operators are registered when torch's symmetric-memory module is imported
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    symm = getattr(torch.ops, "symm_mem", None)
    try:
        return (symm is not None and hasattr(symm, "fused_all_gather_matmul")
                and hasattr(symm, "fused_matmul_reduce_scatter"))
    except RuntimeError:  # pragma: no cover - torch builds without distributed
        return False


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cuda_reason(x: torch.Tensor, weight: torch.Tensor, group: ParallelGroup) -> Optional[str]:
    if not x.is_cuda:
        return f"the CUDA fused operators need CUDA tensors, got {x.device}"
    if not cuda_fused_ops_available():
        return f"this torch ({torch.__version__}) has no torch.ops.symm_mem fused matmul operators"
    if group.backend != "nccl":
        return f"the CUDA fused operators need an NCCL group, {group.name!r} is {group.backend!r}"
    if x.dim() != 2 or not x.dtype.is_floating_point or weight.dtype != x.dtype:
        return (f"the CUDA fused operators take a 2-D floating input and weight of one dtype, got {x.dtype} "
                f"{tuple(x.shape)}")
    return None


def _decide(step: str, backend: LinearBackend, reason: Optional[str]) -> bool:
    """True: use the fused operator. ``reason``: why it cannot be used (None: it can)."""
    if backend.fusion == "unfused":
        return False
    if reason is None:
        return True
    if backend.fusion == "fused":
        raise ArgumentError(f"{step}: fusion='fused' but the fused operator cannot take this call: {reason}")
    return False


def _ensure_symm_mem(group: ParallelGroup) -> str:
    import torch.distributed._symmetric_memory as symm_mem
    name = group.device_group.group_name
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None and not symm_mem.is_symm_mem_enabled_for_group(name):
        with warnings.catch_warnings():  # deprecated (a no-op need) on recent torch, required on older
            warnings.simplefilter("ignore", FutureWarning)
            enable(name)
    return name


def _symm_mem_matmul_reduce_scatter(x: torch.Tensor, weight_t: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.ops.symm_mem.fused_matmul_reduce_scatter(x, weight_t, "sum", 0, group_name)


def _symm_mem_all_gather_matmul(x: torch.Tensor, weight_t: torch.Tensor, group_name: str) -> torch.Tensor:
    # return_A=True: the multicast (multimem) variant is chosen only with return_A=False.
    return torch.ops.symm_mem.fused_all_gather_matmul(x, [weight_t], 0, group_name, return_A=True)[1][0]


def _comm_name(runtime: NpuRuntime, group: ParallelGroup) -> str:
    # The global rank: Ascend documents get_hccl_comm_name's argument as a global rank ID.
    return npu_platform.hccl_comm_name(runtime, group.device_group, group.rank)


def linear_all_reduce(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], group: ParallelGroup,
                      backend: LinearBackend) -> torch.Tensor:
    """``sum over the group of F.linear(x, weight, bias)``: x [..., k], weight [n, k], bias [n] or None.

    The bias is summed like the rest: pass it on one member only.
    """
    if group.world_size == 1:
        return F.linear(x, weight, bias)
    if backend.npu is not None:
        reason = npu_platform.mm_all_reduce_unsupported(backend.npu, x, weight.t(), group.world_size)
        if reason is None and _needs_grad(x, weight, bias):
            reason = "npu_mm_all_reduce_base has no backward and autograd records this call"
    else:
        reason = "no fused matmul + all-reduce operator outside the NPU (torch has none)"
    if _decide("linear_all_reduce", backend, reason):
        name = _comm_name(backend.npu, group)
        return npu_platform.mm_all_reduce(backend.npu, x, weight.t(), name, bias=bias)
    return _collectives.all_reduce(F.linear(x, weight, bias), group)


def linear_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, group: ParallelGroup,
                          backend: LinearBackend) -> torch.Tensor:
    """This rank's rows of ``sum over the group of x @ weight.T``: x [m, k], weight [n, k] -> [m / size, n].

    ``m`` must divide by the group size (checked by the caller). No bias: the
    fused operators take none; add it to the result.
    """
    if group.world_size == 1:
        return F.linear(x, weight)
    if backend.npu is not None:
        reason = npu_platform.mm_reduce_scatter_unsupported(backend.npu, x, weight.t(), group.world_size)
    else:
        reason = _cuda_reason(x, weight, group)
    if reason is None and _needs_grad(x, weight):
        reason = "the fused operators have no backward and autograd records this call"
    if _decide("linear_reduce_scatter", backend, reason):
        if backend.npu is not None:
            name = _comm_name(backend.npu, group)
            return npu_platform.mm_reduce_scatter(backend.npu, x, weight.t(), name, group.world_size)
        return _symm_mem_matmul_reduce_scatter(x.contiguous(), weight.t(), _ensure_symm_mem(group))
    return _collectives.reduce_scatter(F.linear(x, weight), 0, group)


def all_gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], group: ParallelGroup,
                      backend: LinearBackend) -> torch.Tensor:
    """``F.linear(all_gather(x, dim 0), weight, bias)``: x [m, k] -> [m * size, n]."""
    if group.world_size == 1:
        return F.linear(x, weight, bias)
    if backend.npu is not None:
        reason = "moe_ext wires no fused all-gather + matmul operator on the NPU"
    else:
        reason = _cuda_reason(x, weight, group)
    if reason is None and _needs_grad(x, weight, bias):
        reason = "the fused operators have no backward and autograd records this call"
    if _decide("all_gather_linear", backend, reason):
        out = _symm_mem_all_gather_matmul(x.contiguous(), weight.t(), _ensure_symm_mem(group))
        return out + bias if bias is not None else out
    return F.linear(_collectives.all_gather(x, 0, group), weight, bias)
