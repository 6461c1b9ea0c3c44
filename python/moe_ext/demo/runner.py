"""The parent side of the demo: check the arguments, pick the device, spawn the ranks, sum up."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from moe_ext.demo.config import DemoConfig

__all__ = ["DemoFailure", "resolve_device", "run_demo"]


class DemoFailure(RuntimeError):
    """The demo ran but failed: a rank died, timed out or diverged from the reference."""


def resolve_device(requested: str, ranks: int) -> tuple[str, str]:
    """(device type, torch.distributed backend) for ``--device``; ValueError if it cannot work here."""
    from moe_ext import platform

    import torch

    npu_count = torch.npu.device_count() if platform.has_npu() else 0  # type: ignore[attr-defined]
    cuda_count = torch.cuda.device_count() if platform.has_cuda() else 0
    if requested == "auto":
        if npu_count >= ranks:
            return "npu", "hccl"
        if cuda_count >= ranks:
            return "cuda", "nccl"
        return "cpu", "gloo"
    if requested == "cuda":
        if cuda_count < ranks:
            raise ValueError(f"--device cuda needs one GPU per rank: --ranks {ranks}, GPUs seen {cuda_count}")
        return "cuda", "nccl"
    if requested == "npu":
        if npu_count < ranks:
            raise ValueError(f"--device npu needs one NPU per rank (torch_npu): --ranks {ranks}, NPUs seen {npu_count}")
        return "npu", "hccl"
    return "cpu", "gloo"


def _mean_rows(rows: list[list[int]]) -> list[float]:
    if not rows:
        return []
    return [sum(column) / len(rows) for column in zip(*rows)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _summarise(config: DemoConfig, device_type: str, backend: str, per_rank: list[dict], wall: float) -> dict:
    from moe_ext.demo import pieces

    first = per_rank[0]
    interval = config.rebalance_interval
    imbalance = first["step_imbalance"]
    rebalances = []
    for index, event in enumerate(first["rebalances"]):
        event = dict(event)
        # Times: the slowest rank's (the step waits for it).
        event["plan_seconds"] = max(r["rebalances"][index]["plan_seconds"] for r in per_rank)
        event["transfer_seconds"] = max(r["rebalances"][index]["transfer_seconds"] for r in per_rank)
        following = imbalance[event["step"]:event["step"] + interval]
        event["measured_imbalance_next_interval"] = _mean(following) if following else None
        event["measured_imbalance_previous_interval"] = _mean(imbalance[max(0, event["step"] - interval):event["step"]])
        rebalances.append(event)
    max_error = max(r["max_error"] for r in per_rank)
    return {
        "config": config.to_dict(),
        "device": device_type,
        "backend": backend,
        "devices": [r["device"] for r in per_rank],
        "pieces": pieces.describe(),
        "correct": max_error <= config.tolerance,
        "max_error": max_error,
        "max_error_per_step": first["step_max_error"],
        "imbalance_per_step": imbalance,
        "rank_load_per_step": first["step_rank_load"],
        "rank_load_first_interval": _mean_rows(first["step_rank_load"][:interval]),
        "rank_load_last_interval": _mean_rows(first["step_rank_load"][-interval:]),
        "measured_imbalance_first_interval": _mean(imbalance[:interval]),
        "measured_imbalance_last_interval": _mean(imbalance[-interval:]),
        "rebalances": rebalances,
        "tokens_per_second_per_rank": [r["tokens_per_second"] for r in per_rank],
        "comm_methods": sorted({m for r in per_rank for m in r["comm_methods"]}),
        "final_placement": first["final_placement"],
        "wall_seconds": wall,
    }


def run_demo(config: DemoConfig, *, interactive: Optional[bool] = None, stream: Optional[TextIO] = None) -> dict:
    """Run the demo and return its summary (the JSON report).

    Raises ValueError for impossible arguments (before anything is spawned) and
    :class:`DemoFailure` when a rank dies, hangs or diverges from the reference.
    """
    config.validate()
    device_type, backend = resolve_device(config.device, config.ranks)
    stream = stream or sys.stdout
    if interactive is None:
        interactive = stream.isatty()

    from moe_ext.demo import pieces
    from moe_ext.demo.rank import run_rank
    from moe_ext.demo.launch import RankFailure, launch

    used = pieces.describe()
    stream.write(f"moe-ext demo: {config.ranks} ranks on {device_type} ({backend}); {config.experts} experts in "
                 f"{config.num_physical_experts} slots ({config.slots_per_rank} per rank), top-{config.top_k}, "
                 f"hidden {config.hidden_size}, {config.tokens_per_rank} tokens/rank/step, {config.steps} steps, "
                 f"rebalance every {config.rebalance_interval} (at most {config.move_bound} slots moved)\n")
    if device_type == "cpu" and config.device == "auto":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus:
            stream.write(f"note: {gpus} GPU(s) seen, fewer than --ranks {config.ranks}; on GPUs run "
                         f"--ranks {gpus} (one rank per GPU, NCCL)\n")
    stream.write("pieces: " + ", ".join(f"{name}={source}" for name, source in used.items()) + "\n")
    stream.flush()
    started = time.perf_counter()
    try:
        per_rank = launch(run_rank, config.ranks, (config, device_type, interactive), backend=backend,
                          timeout=config.timeout)
    except RankFailure as error:
        raise DemoFailure(str(error)) from None
    return _summarise(config, device_type, backend, per_rank, time.perf_counter() - started)
