"""The demo's settings, checked before any process is spawned."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from moe_ext.errors import ArgumentError

__all__ = ["DemoConfig", "COMM_METHOD_CHOICES", "DEVICE_CHOICES", "PRESETS", "MAX_TIMEOUT"]

# "dummy" (moe_ext.moe's no-communication method for profiling) is left out: it computes no real output.
COMM_METHOD_CHOICES = ("auto", "allgather", "native_allgather", "alltoall", "mc2")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "npu")
MAX_TIMEOUT = 7 * 24 * 3600.0  # seconds; timeouts become datetime.timedelta, which overflows far beyond this

# --preset NAME: a named set of sizes (explicit options still win).
PRESETS = {
    # DeepSeek-V3's routed experts at full size: 256 experts of hidden 7168 and MoE
    # intermediate 2048 (about 176 MiB each in fp32), 32 redundant slots as its EPLB
    # deployment uses, top-8 of 8 groups keeping 4. Every rank also holds the logical
    # weights for the dense check (about 45 GiB), so this is for one GPU / NPU per rank.
    "deepseek-v3": dict(experts=256, redundant_experts=32, top_k=8, hidden_size=7168, intermediate_size=2048,
                        expert_groups=8, topk_group=4, tokens_per_rank=256, tolerance=1e-3),
}


@dataclass
class DemoConfig:
    """Everything one demo run depends on (the JSON report echoes it).

    The layer: ``num_experts`` logical experts in ``num_physical_experts =
    num_experts + redundant_experts`` slots spread evenly over ``ranks``;
    DeepSeek-like routing (sigmoid scores, grouped top-k over ``expert_groups``
    groups keeping the best ``topk_group``, renormalised) and SwiGLU experts.
    Each step every rank gets ``tokens_per_rank`` tokens; their topics follow
    a Zipf law of exponent ``skew`` over the experts, so a few experts are hot.
    """

    ranks: int = 4
    experts: int = 16
    redundant_experts: Optional[int] = None  # None: 4, or the next count that fills every rank equally
    top_k: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    expert_groups: int = 4
    topk_group: int = 2
    tokens_per_rank: int = 128
    steps: int = 40
    rebalance_interval: int = 10
    max_moves: Optional[int] = None  # slots per rebalance; None: a quarter of the slots
    skew: float = 1.5
    comm_method: str = "auto"
    device: str = "auto"
    seed: int = 0
    tolerance: Optional[float] = None  # None: 1e-4, or 1e-1 with mc2 (it moves bf16 activations)
    timeout: float = 60.0  # seconds without a finished step, once every rank has started
    startup_timeout: float = 180.0  # seconds for spawning, imports, process group and layer, before step 0
    # Hidden test hooks: make one rank die (os._exit), corrupt its weights, stall
    # (sleep in Python) or stop itself (SIGSTOP) at a step.
    kill_rank: Optional[int] = None
    kill_step: Optional[int] = None
    corrupt_rank: Optional[int] = None
    corrupt_step: Optional[int] = None
    stall_rank: Optional[int] = None
    stall_step: Optional[int] = None
    stop_rank: Optional[int] = None
    stop_step: Optional[int] = None

    def __post_init__(self) -> None:
        if self.redundant_experts is None and isinstance(self.ranks, int) and self.ranks >= 1 \
                and isinstance(self.experts, int):
            # The fewest replicas from 4 up that give every rank the same number of slots.
            self.redundant_experts = 4 + (-(self.experts + 4)) % self.ranks
        if self.tolerance is None:
            # MC2's operators take bf16/fp16 activations only, so an MC2 layer runs in bf16.
            self.tolerance = 1e-1 if self.comm_method == "mc2" else 1e-4

    @property
    def num_physical_experts(self) -> int:
        return self.experts + self.redundant_experts

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical_experts // self.ranks

    @property
    def move_bound(self) -> int:
        """Most slots whose expert may change in one rebalance."""
        if self.max_moves is not None:
            return self.max_moves
        return max(1, self.num_physical_experts // 4)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def bytes_per_expert(self) -> int:
        """fp32 bytes of one expert's weights (w13 [H, 2I] and w2 [I, H])."""
        return 3 * self.hidden_size * self.intermediate_size * 4

    def validate(self) -> None:
        """Raise ArgumentError (a ValueError) naming the argument for any impossible combination."""
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ArgumentError(message)

        for name in ("ranks", "experts", "top_k", "hidden_size", "intermediate_size", "expert_groups",
                     "topk_group", "tokens_per_rank", "steps", "rebalance_interval"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        need(isinstance(self.redundant_experts, int) and self.redundant_experts >= 0,
             f"--redundant-experts must be an integer >= 0, got {self.redundant_experts!r}")
        need(self.num_physical_experts % self.ranks == 0,
             f"--experts + --redundant-experts ({self.experts} + {self.redundant_experts} = "
             f"{self.num_physical_experts} expert slots) must be divisible by --ranks ({self.ranks})")
        need(self.top_k <= self.experts, f"--top-k must be <= --experts ({self.experts}), got {self.top_k}")
        need(self.experts % self.expert_groups == 0,
             f"--expert-groups must divide --experts ({self.experts}), got {self.expert_groups}")
        need(self.topk_group <= self.expert_groups,
             f"--topk-group must be <= --expert-groups ({self.expert_groups}), got {self.topk_group}")
        need(self.top_k <= self.topk_group * (self.experts // self.expert_groups),
             f"--top-k ({self.top_k}) must be <= the experts of the --topk-group best groups "
             f"({self.topk_group} * {self.experts // self.expert_groups})")
        need(math.isfinite(self.skew) and self.skew >= 0, f"--skew must be a finite number >= 0, got {self.skew}")
        need(math.isfinite(self.tolerance) and self.tolerance > 0,
             f"--tolerance must be a finite number > 0, got {self.tolerance}")
        for name in ("timeout", "startup_timeout"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                 and 0 < value <= MAX_TIMEOUT,
                 f"--{name.replace('_', '-')} must be a finite number of seconds in (0, {MAX_TIMEOUT:.0f}], "
                 f"got {value!r}")
        need(self.max_moves is None or self.max_moves >= 0, f"--max-moves must be >= 0, got {self.max_moves}")
        need(self.comm_method in COMM_METHOD_CHOICES,
             f"--comm-method must be one of {', '.join(COMM_METHOD_CHOICES)}, got {self.comm_method!r}")
        need(self.comm_method != "mc2" or self.ranks >= 2,
             f"--comm-method mc2 needs --ranks >= 2, got {self.ranks}")
        need(self.device in DEVICE_CHOICES,
             f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        for hook in ("kill", "corrupt", "stall", "stop"):
            rank, step = getattr(self, f"{hook}_rank"), getattr(self, f"{hook}_step")
            if rank is not None or step is not None:
                need(rank is not None and step is not None and 0 <= rank < self.ranks and 0 <= step < self.steps,
                     f"--{hook}-rank/--{hook}-step must both be given, rank in [0, {self.ranks}) and step in "
                     f"[0, {self.steps}), got {rank!r}, {step!r}")
