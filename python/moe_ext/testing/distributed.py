"""Run a function on several local ranks, for tests, benchmarks and the demo.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes,
initialises ``torch.distributed`` in each (a free TCP port on 127.0.0.1, gloo
by default), calls ``fn(rank, world_size, *args)`` and returns the per-rank
results. A failure on any rank is raised in the parent with that rank's
traceback; a rank that hangs or dies takes the whole group down within
``timeout`` seconds, so a test never hangs. ``fn`` must be picklable: a
module-level function.

With ``backend="nccl"`` each rank uses ``cuda:<rank>``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["DistributedRunError", "find_free_port", "run_distributed", "stop_processes", "test_backend"]


class DistributedRunError(RuntimeError):
    """A rank failed, died or timed out; the message names the rank."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_backend() -> str:
    """The backend multi-process tests run on: $MOE_EXT_TEST_BACKEND, default gloo."""
    return os.environ.get("MOE_EXT_TEST_BACKEND", "gloo")


@dataclass
class _Outcome:
    rank: int
    ok: bool
    value: Any = None
    error: str = ""


def _worker(rank: int, world_size: int, port: int, backend: str, timeout: float,
            fn: Callable[..., Any], args: Sequence[Any], results: "mp.Queue[_Outcome]") -> None:
    import datetime

    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)  # ranks share few cores; oversubscription only slows all of them
    try:
        device_id = None
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device_id = torch.device("cuda", rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}",
                                timeout=datetime.timedelta(seconds=timeout), device_id=device_id)
        value = fn(rank, world_size, *args)
        results.put(_Outcome(rank, True, value))
    except BaseException:  # report everything, including assertion failures
        results.put(_Outcome(rank, False, error=traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                    timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks.

    Returns the list of return values, indexed by rank (values must be
    picklable). Raises :class:`DistributedRunError` naming the first failing
    rank with its traceback, or the ranks that did not finish in ``timeout``.
    """
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    context = mp.get_context("spawn")
    results: "mp.Queue[_Outcome]" = context.Queue()
    port = find_free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, backend, timeout, fn, args, results),
                        daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, _Outcome] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                outcome = results.get(timeout=0.2)
                outcomes[outcome.rank] = outcome
                if not outcome.ok:
                    break  # one failure: the others may now hang on a collective
                continue
            except queue.Empty:
                pass
            dead = [rank for rank, process in enumerate(processes)
                    if rank not in outcomes and process.exitcode is not None]
            if dead:
                time.sleep(0.5)  # its report may still be in the pipe
                while True:
                    try:
                        outcome = results.get_nowait()
                        outcomes[outcome.rank] = outcome
                    except queue.Empty:
                        break
                dead = [rank for rank in dead if rank not in outcomes]
                if dead:
                    raise DistributedRunError(
                        f"rank {dead[0]} died with exit code {processes[dead[0]].exitcode} "
                        f"before reporting (ranks that died: {dead})")
                if any(not o.ok for o in outcomes.values()):
                    break
            if time.monotonic() > deadline:
                missing = [rank for rank in range(world_size) if rank not in outcomes]
                raise DistributedRunError(f"ranks {missing} did not finish within {timeout:.0f} s")
    finally:
        finished = len(outcomes) == world_size and all(o.ok for o in outcomes.values())
        stop_processes(processes, grace=10.0 if finished else 0.0)
    failures = sorted((o for o in outcomes.values() if not o.ok), key=lambda o: o.rank)
    if failures:
        first = failures[0]
        raise DistributedRunError(f"rank {first.rank} of {world_size} failed:\n{first.error}")
    return [outcomes[rank].value for rank in range(world_size)]


def stop_processes(processes: list[Any], grace: float) -> None:
    """Let ranks exit within ``grace`` seconds, then terminate, then kill."""
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=2.0)
        if process.is_alive():
            process.kill()
            process.join(timeout=2.0)
