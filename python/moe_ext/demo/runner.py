"""The parent side of the demo: check the arguments, pick the device, start the ranks, sum up.

Two ways to get ranks:

- **self-spawned** (the default): :func:`moe_ext.demo.launch.launch` starts
  ``--ranks`` local processes on 127.0.0.1 and watches them (start-up and step
  timeouts, heartbeats, naming the rank at fault);
- **under a launcher** (``torchrun``, single or multi node, or anything that sets
  torch's ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` environment): every process the
  launcher started runs one rank in the launcher's process group (joined through
  its ``env://`` rendezvous unless the caller already initialised one), the device
  is ``LOCAL_RANK``'s, rank 0 prints and writes the report, and failure handling is
  the launcher's (``torchrun --max-restarts``, its rendezvous timeouts).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Optional, TextIO

from moe_ext.demo.config import DemoConfig
from moe_ext.errors import ArgumentError

__all__ = ["DemoFailure", "launcher_environment", "resolve_device", "run_demo"]


class DemoFailure(RuntimeError):
    """The demo ran but failed: a rank died, timed out or diverged from the reference."""


def launcher_environment() -> Optional[dict]:
    """The layout an external launcher gave this process (torchrun sets these variables), or None.

    Keys: rank, world_size, local_rank, local_world_size (ints), and launcher (a name for the report).
    """
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or not ("MASTER_ADDR" in env or "TORCHELASTIC_RUN_ID" in env):
        return None
    try:
        layout = {name: int(env[key]) for name, key in (("rank", "RANK"), ("world_size", "WORLD_SIZE"))}
        layout["local_rank"] = int(env.get("LOCAL_RANK", "0"))
        layout["local_world_size"] = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    except ValueError as error:
        raise ArgumentError(f"the launcher's environment is not integers: {error}") from None
    layout["launcher"] = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "external launcher"
    return layout


def resolve_device(requested: str, ranks: int) -> tuple[str, str]:
    """(device type, torch.distributed backend) for ``--device``, ``ranks`` being the ranks on this host.

    ValueError if it cannot work here.
    """
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


def _summarise(config: DemoConfig, device_type: str, backend: str, per_rank: list[dict], wall: float,
               started_at: float) -> dict:
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
        # Every rank's tokens over the slowest rank's forward time: the layer's throughput as a whole.
        "tokens_per_second_total": (sum(r["tokens"] for r in per_rank) / max(r["forward_seconds"] for r in per_rank)
                                    if max(r["forward_seconds"] for r in per_rank) > 0 else 0.0),
        "host_cpu_count": os.cpu_count(),
        "startup_seconds": max(0.0, max(r["first_step_at"] for r in per_rank) - started_at),
        "comm_methods": sorted({m for r in per_rank for m in r["comm_methods"]}),
        "final_placement": first["final_placement"],
        "wall_seconds": wall,
    }


def _check_memory(config: DemoConfig, device_type: str, ranks_here: int) -> None:
    """Refuse sizes that cannot fit: every rank holds the logical weights (dense check) and its slots."""
    per_rank = (config.experts + config.slots_per_rank) * config.bytes_per_expert
    if device_type == "cpu":
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        what, total = f"the {available / 2**30:.0f} GiB of host memory", per_rank * ranks_here
    elif device_type == "cuda":
        import torch

        available = torch.cuda.get_device_properties(0).total_memory
        what, total = f"one GPU's {available / 2**30:.0f} GiB", per_rank
    else:
        return
    if total > 0.8 * available:
        raise ArgumentError(f"these sizes need about {total / 2**30:.1f} GiB ({config.experts} logical experts for the "
                            f"dense check + {config.slots_per_rank} slots per rank, {config.bytes_per_expert / 2**20:.0f} "
                            f"MiB each, x {ranks_here if device_type == 'cpu' else 1} ranks), more than 80% of {what}; "
                            "use fewer or smaller experts, or one GPU / NPU per rank (--device cuda / npu)")


def _header(config: DemoConfig, device_type: str, backend: str, how: str) -> str:
    return (f"moe-ext demo: {config.ranks} ranks on {device_type} ({backend}, {how}); {config.experts} experts in "
            f"{config.num_physical_experts} slots ({config.slots_per_rank} per rank), top-{config.top_k}, "
            f"hidden {config.hidden_size}, intermediate {config.intermediate_size}, {config.tokens_per_rank} "
            f"tokens/rank/step, {config.steps} steps, rebalance every {config.rebalance_interval} (at most "
            f"{config.move_bound} slots moved)\n")


def run_demo(config: DemoConfig, *, interactive: Optional[bool] = None, stream: Optional[TextIO] = None) -> dict:
    """Run the demo and return its summary (the JSON report).

    Spawns ``config.ranks`` local ranks, or, when :func:`launcher_environment`
    finds a launcher (torchrun), runs this process's rank in the launcher's
    process group. Raises ValueError for impossible arguments (before anything
    is spawned or joined) and :class:`DemoFailure` when a rank dies, hangs or
    diverges from the reference.
    """
    config.validate()
    stream = stream or sys.stdout
    if interactive is None:
        interactive = stream.isatty()
    layout = launcher_environment()
    if layout is not None:
        return _run_under_launcher(config, layout, interactive, stream)
    device_type, backend = resolve_device(config.device, config.ranks)
    _check_memory(config, device_type, config.ranks)

    from moe_ext.demo import pieces
    from moe_ext.demo.rank import run_rank
    from moe_ext.demo.launch import RankFailure, launch

    used = pieces.describe()
    stream.write(_header(config, device_type, backend, "self-spawned on 127.0.0.1"))
    if device_type == "cpu" and config.device == "auto":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus:
            stream.write(f"note: {gpus} GPU(s) seen, fewer than --ranks {config.ranks}; on GPUs run "
                         f"--ranks {gpus} (one rank per GPU, NCCL)\n")
    stream.write("pieces: " + ", ".join(f"{name}={source}" for name, source in used.items()) + "\n")
    stream.flush()
    started, started_at = time.perf_counter(), time.time()
    try:
        per_rank = launch(run_rank, config.ranks, (config, device_type, interactive), backend=backend,
                          timeout=config.timeout, startup_timeout=config.startup_timeout)
    except RankFailure as error:
        raise DemoFailure(str(error)) from None
    result = _summarise(config, device_type, backend, per_rank, time.perf_counter() - started, started_at)
    result["launcher"] = "self-spawned"
    return result


def _run_under_launcher(config: DemoConfig, layout: dict, interactive: bool, stream: TextIO) -> dict:
    """This process's rank of a launcher's job; every rank returns the summary (rank 0 reports it)."""
    import torch
    import torch.distributed as dist

    rank, world_size = layout["rank"], layout["world_size"]
    if config.ranks != world_size:
        raise ArgumentError(f"--ranks must match the launcher's WORLD_SIZE ({world_size}) or be left out, "
                            f"got {config.ranks}")
    device_type, backend = resolve_device(config.device, layout["local_world_size"])
    _check_memory(config, device_type, layout["local_world_size"])

    from moe_ext.demo import pieces
    from moe_ext.demo.rank import run_rank  # imports torch_npu where present (registers HCCL)

    if rank == 0:
        stream.write(_header(config, device_type, backend, f"{layout['launcher']}'s process group"))
        stream.write("pieces: " + ", ".join(f"{name}={source}" for name, source in pieces.describe().items()) + "\n")
        stream.flush()
    started, started_at = time.perf_counter(), time.time()
    owned = not dist.is_initialized()
    if owned:
        device_id = None
        if backend == "nccl":
            torch.cuda.set_device(layout["local_rank"])
            device_id = torch.device("cuda", layout["local_rank"])
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.startup_timeout + config.timeout),
                                device_id=device_id)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ArgumentError(f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                            f"does not match the launcher's RANK {rank} / WORLD_SIZE {world_size}")
    try:
        try:
            mine = run_rank(rank, world_size, config, device_type, interactive)
        except Exception as error:  # noqa: BLE001 - reported like the self-spawned mode's rank failures
            raise DemoFailure(f"rank {rank} failed: {type(error).__name__}: {str(error).splitlines()[0]}") from error
        per_rank: list = [None] * world_size
        dist.all_gather_object(per_rank, mine)
        # Nobody tears down while a peer may still be talking to it (a rank leaving early makes the
        # others' gloo connections close under them).
        dist.barrier()
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
    result = _summarise(config, device_type, backend, per_rank, time.perf_counter() - started, started_at)
    result["launcher"] = layout["launcher"]
    result["this_rank"] = rank
    return result
