"""Spawn the demo's ranks and name the one that broke the run.

Like :func:`moe_ext.testing.distributed.run_distributed`, with one difference
the demo needs: when a rank dies abruptly, its peers fail a moment later on a
closed connection, and whichever report arrives first must not be blamed.
So after the first failure the launcher waits briefly for the whole picture
and names the root cause: a rank that died without reporting comes before a
rank that raised. Every process is stopped before it returns or raises.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Sequence

from moe_ext.testing.distributed import find_free_port, stop_processes

__all__ = ["RankFailure", "launch"]

_SETTLE_SECONDS = 2.0  # after a first failure: time for a dead peer's exit to become visible


class RankFailure(RuntimeError):
    """A rank died, raised or hung; ``rank`` names it (the root cause), ``str()`` says what happened."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def _rank_main(rank: int, world_size: int, port: int, backend: str, timeout: float, fn: Callable[..., Any],
               args: Sequence[Any], results: "mp.Queue") -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share the cores; oversubscription slows every one of them
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    try:
        device_id = None
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device_id = torch.device("cuda", rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                                timeout=datetime.timedelta(seconds=timeout), device_id=device_id)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException as error:  # noqa: BLE001 - every failure is reported to the parent
        last_line = f"{type(error).__name__}: {error}".splitlines()[0]
        results.put((rank, False, (last_line, traceback.format_exc())))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def launch(fn: Callable[..., Any], world_size: int, args: Sequence[Any], *, backend: str = "gloo",
           timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return the results by rank.

    Raises :class:`RankFailure` naming the rank at the root of a failure, or
    the ranks still running after ``timeout`` seconds.
    """
    context = mp.get_context("spawn")
    results: "mp.Queue" = context.Queue()
    port = find_free_port()
    processes = [context.Process(target=_rank_main, args=(rank, world_size, port, backend, timeout, fn, args, results),
                                 daemon=True) for rank in range(world_size)]
    for process in processes:
        process.start()
    done: dict[int, Any] = {}
    failed: dict[int, tuple[str, str]] = {}
    first_failure_at = None
    deadline = time.monotonic() + timeout
    clean = False
    try:
        while True:
            try:
                rank, ok, value = results.get(timeout=0.2)
                (done if ok else failed)[rank] = value
                if not ok and first_failure_at is None:
                    first_failure_at = time.monotonic()
            except queue.Empty:
                pass
            dead = [rank for rank, process in enumerate(processes)
                    if process.exitcode is not None and rank not in done and rank not in failed]
            if dead and first_failure_at is None:
                first_failure_at = time.monotonic()  # let its report (if any) arrive before judging
            settled = first_failure_at is not None and time.monotonic() - first_failure_at > _SETTLE_SECONDS
            if dead and settled:
                rank = dead[0]
                raise RankFailure(rank, f"rank {rank} died (exit code {processes[rank].exitcode}) without "
                                        f"reporting; the other ranks were stopped")
            if failed and (settled or len(done) + len(failed) == world_size):
                rank = min(failed)
                raise RankFailure(rank, f"rank {rank} failed: {failed[rank][0]}")
            if len(done) == world_size:
                clean = True
                return [done[rank] for rank in range(world_size)]
            if time.monotonic() > deadline:
                missing = [rank for rank in range(world_size) if rank not in done]
                raise RankFailure(missing[0], f"ranks {missing} did not finish within {timeout:.0f} s "
                                              "(--timeout); they were stopped")
    finally:
        stop_processes(processes, grace=10.0 if clean else 0.0)
