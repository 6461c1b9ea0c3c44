"""Per-expert load recording over a sliding window of steps, on the device.

Each step's counts accumulate into a [layers, experts] tensor on the device;
`step()` writes it into a ring buffer of `window` steps. Nothing reads a value
back to the host while recording (the ring position is host-side bookkeeping),
so recording never synchronises with the device and is CUDA-graph friendly
apart from `step()`'s Python-side position. `load()` sums the window and, given
a process group, all-reduces it so every rank plans from the same loads.

`moe_ext.moe.MoELayer` calls `record_layer(layer_index, counts)` with counts per
*logical* expert (size the recorder with the model's logical expert count);
until issue 16 it handed per-physical-slot counts.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["LoadRecorder"]


def _histogram_op():
    """moe_ext.ops.expert_histogram when that op exists in this build, else None."""
    try:
        from moe_ext import ops  # noqa: PLC0415 - optional, may not be built
    except Exception:  # noqa: BLE001 - any import problem means: not available
        return None
    return getattr(ops, "expert_histogram", None)


class LoadRecorder:
    """Sliding-window per-expert load counter.

    Args:
        num_layers, num_experts: shape of the loads [layers, experts].
        window: steps kept; `load()` sums the last `window` completed steps.
        device: where the counters live (the device the router runs on).
        group: a torch.distributed process group; `load()` all-reduces over it.
    """

    def __init__(self, num_layers: int, num_experts: int, *, window: int = 128,
                 device: Optional[torch.device | str] = None, group=None) -> None:
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoadRecorder: {name} must be an int >= 1, got {value!r}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.window = window
        self.group = group
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._ring = torch.zeros(window, num_layers, num_experts, dtype=torch.int64, device=self.device)
        self._current = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=self.device)
        self._position = 0
        self._filled = 0
        self._histogram = _histogram_op()

    @property
    def steps_recorded(self) -> int:
        """Completed steps in the window (at most `window`)."""
        return self._filled

    def _check_counts(self, name: str, counts: torch.Tensor, shape: tuple) -> None:
        if not isinstance(counts, torch.Tensor):
            raise ValueError(f"LoadRecorder: {name} must be a torch.Tensor, got {type(counts).__name__}")
        if counts.dtype.is_floating_point or counts.is_complex() or counts.dtype == torch.bool:
            raise ValueError(f"LoadRecorder: {name} must be an integer tensor, got {counts.dtype}")
        if tuple(counts.shape) != shape:
            raise ValueError(f"LoadRecorder: {name} must have shape {list(shape)}, got {list(counts.shape)}")

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"LoadRecorder: layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def record(self, counts: torch.Tensor) -> None:
        """Add this step's counts [layers, experts] (any int dtype)."""
        self._check_counts("counts", counts, (self.num_layers, self.num_experts))
        self._current.add_(counts.to(device=self.device, dtype=torch.int64, non_blocking=True))

    def record_layer(self, layer: int, counts: torch.Tensor) -> None:
        """Add this step's counts [experts] of one layer."""
        self._check_layer(layer)
        self._check_counts("counts", counts, (self.num_experts,))
        self._current[layer].add_(counts.to(device=self.device, dtype=torch.int64, non_blocking=True))

    def record_topk(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count the routed expert ids [tokens, k] of one layer; ids outside [0, experts) are ignored."""
        self._check_layer(layer)
        if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
            raise ValueError(f"LoadRecorder: topk_ids must be an integer tensor, got "
                             f"{getattr(topk_ids, 'dtype', type(topk_ids).__name__)}")
        ids = topk_ids.to(device=self.device).reshape(-1)
        if self._histogram is not None:
            counts = self._histogram(ids, self.num_experts)
            self._current[layer].add_(counts.to(torch.int64))
            return
        # Out-of-range ids (e.g. -1 padding) go to a spill bin that is dropped.
        ids = ids.to(torch.int64)
        valid = (ids >= 0) & (ids < self.num_experts)
        bins = torch.where(valid, ids, torch.full_like(ids, self.num_experts))
        counts = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=self.device)
        counts.scatter_add_(0, bins, torch.ones_like(bins))
        self._current[layer].add_(counts[: self.num_experts])

    def step(self) -> None:
        """Close the current step: it enters the window (replacing the oldest when full)."""
        self._ring[self._position].copy_(self._current)
        self._current.zero_()
        self._position = (self._position + 1) % self.window
        self._filled = min(self._filled + 1, self.window)

    def load(self) -> torch.Tensor:
        """Summed counts of the window [layers, experts] int64 on `device`, all-reduced over `group`."""
        total = self._ring.sum(dim=0)
        if self.group is not None:
            import torch.distributed as dist  # noqa: PLC0415

            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def history(self) -> torch.Tensor:
        """The completed steps of the window, oldest first: [steps_recorded, layers, experts] int64.

        The shape `plan_placement` takes as a load history (each step a window; sum
        consecutive steps first for coarser windows). All-reduced over `group` like `load()`.
        """
        if self._filled < self.window:
            steps = self._ring[: self._filled]
        else:  # the ring is full: the oldest step sits at the write position
            steps = torch.cat([self._ring[self._position:], self._ring[: self._position]])
        steps = steps.clone()
        if self.group is not None:
            import torch.distributed as dist  # noqa: PLC0415

            dist.all_reduce(steps, op=dist.ReduceOp.SUM, group=self.group)
        return steps

    def reset(self) -> None:
        """Forget every recorded step."""
        self._ring.zero_()
        self._current.zero_()
        self._position = 0
        self._filled = 0
