"""What the running machine offers: cpu, cuda or npu, and which ops can run where."""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

__all__ = ["current_platform", "has_cuda", "has_npu", "devices"]


def has_cuda() -> bool:
    return torch.cuda.is_available()


@lru_cache(maxsize=1)
def has_npu() -> bool:
    """True when torch_npu imports and sees a device (never on the dev/CI machines)."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401
    except Exception:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def current_platform() -> str:
    """'npu', 'cuda' or 'cpu': the accelerator the default device would use."""
    if has_npu():
        return "npu"
    if has_cuda():
        return "cuda"
    return "cpu"


def devices() -> list[str]:
    """Names of the devices torch sees here."""
    found = ["cpu"]
    if has_cuda():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if has_npu():
        found += [f"npu:{i}" for i in range(torch.npu.device_count())]
    return found
