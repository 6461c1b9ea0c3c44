"""What each spawned rank runs: the MoE steps, the checks, the rebalances.

Every rank takes part in every collective of every step (the error check and
the load all-reduce included), so the ranks stay in step, all agree on when
the output has diverged, and all plan the same placement from the same loads.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time

import torch
import torch.distributed as dist

from moe_ext.demo import pieces
from moe_ext.demo.config import DemoConfig
from moe_ext.demo.launch import mark_step
from moe_ext.demo.model import initial_placement, make_batch, make_weights
from moe_ext.demo.report import Progress

if importlib.util.find_spec("torch_npu") is not None:  # registers the HCCL backend before the ranks start it
    import torch_npu  # noqa: F401

__all__ = ["DemoDivergence", "run_rank", "KILLED_EXIT_CODE"]

KILLED_EXIT_CODE = 17  # the exit code of a rank killed by the --kill-rank test hook


class DemoDivergence(RuntimeError):
    """The expert-parallel output left the dense reference by more than the tolerance."""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize()  # type: ignore[attr-defined]


def _device_for(device_type: str) -> torch.device:
    """This rank's device: the accelerator numbered LOCAL_RANK (set by torchrun, or by the demo's own launcher)."""
    index = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device_type == "npu":
        torch.npu.set_device(index)  # type: ignore[attr-defined]
        return torch.device("npu", index)
    return torch.device("cpu")


def run_rank(rank: int, world_size: int, config: DemoConfig, device_type: str, interactive: bool) -> dict:
    """One rank of the demo (the function ``launch`` spawns). Returns this rank's numbers."""
    from moe_ext.eplb import LoadRecorder, placement_imbalance, plan_placement

    device = _device_for(device_type)
    groups = pieces.make_ep_groups(world_size)
    eplb_group = pieces.EPGroups.process_group(groups.eplb)
    ep_group = pieces.EPGroups.process_group(groups.ep)
    weights = make_weights(config, device)
    placement = initial_placement(config)
    layer = pieces.build_layer(config, groups, placement, weights, rank, device)
    recorder = LoadRecorder(1, config.experts, window=config.rebalance_interval, device=device, group=eplb_group)
    progress = Progress(config.steps, enabled=rank == 0, interactive=interactive)
    tokens, slots = config.tokens_per_rank, config.slots_per_rank

    step_imbalance: list[float] = []
    step_rank_load: list[list[int]] = []
    step_max_error: list[float] = []
    rebalances: list[dict] = []
    comm_methods: set[str] = set()
    forward_seconds = 0.0
    max_error = 0.0

    first_step_at = time.time()  # wall clock: the parent compares it with its own start (start-up time)
    for step in range(config.steps):
        mark_step(step)  # the launcher's heartbeat reports it
        if config.kill_rank == rank and config.kill_step == step:
            os._exit(KILLED_EXIT_CODE)  # test hook: die abruptly, as a crashed process would
        if config.stop_rank == rank and config.stop_step == step:
            os.kill(os.getpid(), signal.SIGSTOP)  # test hook: freeze, as a process stopped from outside would
        if config.stall_rank == rank and config.stall_step == step:
            while True:  # test hook: stall in Python outside any collective (the process stays alive)
                time.sleep(1.0)
        if config.corrupt_rank == rank and config.corrupt_step == step:
            layer.corrupt()  # test hook: a wrong weight must be caught by the reference check
        x = make_batch(config, weights, step)[rank * tokens:(rank + 1) * tokens].to(device)

        _synchronize(device)
        started = time.perf_counter()
        out = layer.forward(x)
        _synchronize(device)
        forward_seconds += time.perf_counter() - started
        comm_methods.add(str(layer.last_comm_method))

        # Loads: logical counts into the recorder (all-reduced only when planning),
        # and the global per-slot load of this step for the measured imbalance.
        slot_load = layer.last_expert_load.to(device=device, dtype=torch.int64)
        logical_load = torch.zeros(config.experts, dtype=torch.int64, device=device)
        logical_load.scatter_add_(0, placement.to(device), slot_load)
        recorder.record_layer(0, logical_load)
        recorder.step()
        global_slot_load = slot_load.clone()
        dist.all_reduce(global_slot_load, group=ep_group)
        rank_load = global_slot_load.view(world_size, slots).sum(dim=1).cpu()
        step_rank_load.append(rank_load.tolist())
        step_imbalance.append(float(rank_load.max()) / max(float(rank_load.float().mean()), 1e-12))

        # The check: this rank's output against the dense reference of the same tokens.
        reference = pieces.dense_reference(config, x, weights)
        error = torch.tensor([float((out.float() - reference.float()).abs().max()) if out.numel() else 0.0],
                             dtype=torch.float64, device=device)
        errors = groups.ep.all_gather(error, dim=0).cpu()  # every rank's, so every rank can name the worst
        worst_rank = int(errors.argmax())
        step_error = float(errors.max())
        step_max_error.append(step_error)
        max_error = max(max_error, step_error)
        if not bool((errors <= config.tolerance).all()):  # also catches NaN
            raise DemoDivergence(f"step {step}: the output for rank {worst_rank}'s tokens differs from the dense "
                                 f"reference by {float(errors[worst_rank]):.3e} > tolerance {config.tolerance:.1e}")

        event = None
        if (step + 1) % config.rebalance_interval == 0 and step + 1 < config.steps:
            event = _rebalance(config, step, layer, placement, recorder, groups, rank, device,
                               plan_placement, placement_imbalance, weights.bytes_per_expert)
            placement = event.pop("new_placement")
            rebalances.append(event)
        progress.update(step + 1, step_imbalance[-1], max_error, event)

    progress.close()
    pieces.destroy_ep_groups()
    return {
        "rank": rank,
        "device": str(device),
        "first_step_at": first_step_at,
        "tokens": tokens * config.steps,
        "forward_seconds": forward_seconds,
        "tokens_per_second": tokens * config.steps / forward_seconds if forward_seconds > 0 else 0.0,
        "max_error": max_error,
        "step_imbalance": step_imbalance,
        "step_rank_load": step_rank_load,
        "step_max_error": step_max_error,
        "rebalances": rebalances,
        "comm_methods": sorted(comm_methods),
        "final_placement": placement.tolist(),
    }


def _rebalance(config: DemoConfig, step: int, layer, placement: torch.Tensor, recorder, groups, rank: int,
               device: torch.device, plan_placement, placement_imbalance, bytes_per_expert: int) -> dict:
    """Plan from the recorded window, move the weights, switch the layer to the new placement."""
    load = recorder.load().cpu()  # [1, E], summed over the window and all ranks
    current = placement.reshape(1, -1)
    before = float(placement_imbalance(load, current, config.ranks)[0])
    started = time.perf_counter()
    plan = plan_placement(load, config.num_physical_experts, config.expert_groups, 1, config.ranks,
                          current=current, max_moves=config.move_bound)
    plan_seconds = time.perf_counter() - started
    new_placement = plan.phy2log[0].clone()

    _synchronize(device)
    dist.barrier(group=pieces.EPGroups.process_group(groups.eplb))
    started = time.perf_counter()
    rows_moved = pieces.rearrange_weights(placement, new_placement, layer.expert_weight_tensors(), groups)
    _synchronize(device)
    transfer_seconds = time.perf_counter() - started
    layer.set_placement(new_placement)
    return {
        "step": step + 1,
        "window_steps": recorder.steps_recorded,
        "imbalance_before": before,
        "imbalance_after": float(plan.imbalance[0]),
        "lower_bound": float(plan.lower_bound[0]),
        "slots_moved": int(plan.moves[0]),
        "max_moves": config.move_bound,
        "rows_moved": rows_moved,
        "bytes_moved": rows_moved * bytes_per_expert,
        "plan_seconds": plan_seconds,
        "transfer_seconds": transfer_seconds,
        "new_placement": new_placement,
    }
