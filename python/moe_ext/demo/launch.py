"""Spawn the demo's ranks, watch them, and name the one that broke the run.

Like :func:`moe_ext.testing.distributed.run_distributed`, with what the demo needs:

- **Attribution.** When a rank dies abruptly its peers fail a moment later on a
  closed connection, and whichever report arrives first must not be blamed. After
  the first failure the launcher waits briefly for the whole picture and names the
  root cause: a rank that died without reporting comes before a rank that raised.
- **Start-up apart from steps.** Spawning, importing torch, joining the process
  group and building the layer take seconds to minutes on a busy machine; they are
  bounded by ``startup_timeout``. From the moment every rank has started its first
  step, ``step_timeout`` bounds the time without progress (no rank finishing a
  step), not the whole run.
- **Heartbeats.** Each rank runs a heartbeat thread that reports, every
  :data:`HEARTBEAT_SECONDS`, its step and whether its main thread is waiting inside
  ``torch.distributed`` (a collective) or doing something else. When progress stops,
  the launcher names the rank: one whose heartbeat stopped (a SIGSTOP-ed or frozen
  process; /proc tells which), else one behind the others' step, else one busy
  outside a collective while the others wait for it in one.

Every process is stopped before :func:`launch` returns or raises.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional, Sequence

from moe_ext.testing.distributed import find_free_port, stop_processes

__all__ = ["RankFailure", "launch", "mark_step", "HEARTBEAT_SECONDS"]

_SETTLE_SECONDS = 2.0  # after a first failure: time for a dead peer's exit to become visible
HEARTBEAT_SECONDS = 0.5  # how often each rank's heartbeat thread reports
_SILENT_BEATS = 10  # a rank silent for this many heartbeat periods (5 s) has stopped responding


class RankFailure(RuntimeError):
    """A rank died, raised, stopped or stalled; ``rank`` names it (the root cause), ``str()`` says what happened."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


# ----------------------------------------------------------------- the rank side

_step = -1  # the step this rank's main loop is in (-1: starting up); read by the heartbeat thread
_report: Optional[Callable[[int], None]] = None  # set in a launched rank: sends a step change to the parent


def mark_step(step: int) -> None:
    """Called by the rank's loop as it starts ``step``: the parent hears of it at once (no-op outside a launch).

    Cheap: a small message handed to the queue's feeder thread, once per step.
    """
    global _step
    _step = step
    if _report is not None:
        _report(step)


def _main_thread_place(main_id: int) -> tuple[bool, str]:
    """(is the main thread inside torch.distributed, its innermost frame as 'file:line in function')."""
    frame = sys._current_frames().get(main_id)
    if frame is None:
        return False, "?"
    where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
    in_collective = False
    while frame is not None:
        if f"torch{os.sep}distributed{os.sep}" in frame.f_code.co_filename:
            in_collective = True
            break
        frame = frame.f_back
    return in_collective, where


def _heartbeat(rank: int, results: "mp.Queue", stop: threading.Event, main_id: int) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        in_collective, where = _main_thread_place(main_id)
        results.put(("beat", rank, _step, in_collective, where))


def _rank_main(rank: int, world_size: int, port: int, backend: str, group_timeout: float, fn: Callable[..., Any],
               args: Sequence[Any], results: "mp.Queue") -> None:
    global _report
    _report = lambda step: results.put(("beat", rank, step, False, "starting the step"))  # noqa: E731
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(rank, results, stop, threading.get_ident()), daemon=True,
                     name="moe-ext-demo-heartbeat").start()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share the cores; oversubscription slows every one of them
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        device_id = None
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device_id = torch.device("cuda", rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                                timeout=datetime.timedelta(seconds=group_timeout), device_id=device_id)
        value = fn(rank, world_size, *args)
        stop.set()
        results.put(("done", rank, True, value))
    except BaseException as error:  # noqa: BLE001 - every failure is reported to the parent
        stop.set()
        last_line = f"{type(error).__name__}: {error}".splitlines()[0]
        results.put(("done", rank, False, (last_line, traceback.format_exc())))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


# --------------------------------------------------------------- the parent side


def _process_state(pid: Optional[int]) -> str:
    """'stopped (SIGSTOP)', 'zombie', ... from /proc (Linux); '' where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError, TypeError):
        return ""
    return {"T": "stopped (SIGSTOP or a debugger)", "t": "stopped by a debugger", "Z": "a zombie",
            "D": "in uninterruptible sleep (I/O)"}.get(state, "")


class _Watch:
    """What the parent knows of each rank from its heartbeats."""

    def __init__(self, world_size: int):
        now = time.monotonic()
        self.last_beat = [now] * world_size
        self.step = [-1] * world_size
        self.in_collective = [False] * world_size
        self.where = ["(starting)"] * world_size
        self.beats = [0] * world_size
        self.last_progress = now

    def beat(self, rank: int, step: int, in_collective: bool, where: str) -> None:
        self.last_beat[rank] = time.monotonic()
        self.beats[rank] += 1
        if step > self.step[rank]:
            self.last_progress = time.monotonic()
        self.step[rank] = max(self.step[rank], step)
        self.in_collective[rank], self.where[rank] = in_collective, where

    def started(self) -> bool:
        return min(self.step) >= 0

    def diagnose(self, pending: list[int], processes: list, limit: float, phase: str) -> RankFailure:
        """Name the rank that holds the others up, from the heartbeats of the ``pending`` ranks."""
        now = time.monotonic()
        silent = [r for r in pending if now - self.last_beat[r] > _SILENT_BEATS * HEARTBEAT_SECONDS]
        if silent:
            rank = silent[0]
            state = _process_state(processes[rank].pid)
            return RankFailure(rank, f"rank {rank} stopped responding during {phase} (no heartbeat for "
                                     f"{now - self.last_beat[rank]:.0f} s, last at step {self.step[rank]}"
                                     + (f"; the process is {state}" if state else "")
                                     + f"; silent ranks: {silent}); the other ranks were stopped")
        if phase == "start-up":
            return RankFailure(pending[0], f"ranks {pending} did not finish start-up (spawn, import, process group, "
                                           f"layer) within {limit:g} s (--startup-timeout); last seen at "
                                           + "; ".join(f"rank {r}: {self.where[r]}" for r in pending)
                                           + "; they were stopped")
        lowest = min(self.step[r] for r in pending)
        behind = [r for r in pending if self.step[r] == lowest]
        busy = [r for r in behind if not self.in_collective[r]]
        waiting = [r for r in pending if r not in busy]
        if len(behind) < len(pending):
            rank = (busy or behind)[0]
            why = f"it is at step {lowest} while ranks {[r for r in pending if r not in behind]} are past it"
        elif busy and waiting:
            rank = busy[0]
            why = f"it is busy outside any collective at {self.where[rank]} while ranks {waiting} wait for it in one"
        else:
            rank = pending[0]
            why = ("every rank is waiting in a collective" if not busy
                   else "no rank is waiting in a collective") + f" (rank {rank} at {self.where[rank]})"
        return RankFailure(rank, f"rank {rank} stalled at step {self.step[rank]}: no step finished for {limit:g} s "
                                 f"(--timeout); {why}; the ranks were stopped")


def launch(fn: Callable[..., Any], world_size: int, args: Sequence[Any], *, backend: str = "gloo",
           timeout: float = 60.0, startup_timeout: float = 180.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return the results by rank.

    ``fn`` calls :func:`mark_step` as it starts each step. ``startup_timeout``
    (seconds) bounds the time until every rank has started step 0;
    ``timeout`` (seconds) bounds the time between two steps' progress after that.
    Each rank's process-group timeout is their sum, so a collective stuck on a
    lost peer ends by itself even if the parent is gone. Raises
    :class:`RankFailure` naming the rank at the root of a failure.
    """
    context = mp.get_context("spawn")
    # One queue per rank: a rank stopped while holding a shared queue's write lock would silence every rank.
    queues: list = [context.Queue() for _ in range(world_size)]
    port = find_free_port()
    group_timeout = startup_timeout + timeout
    processes = [context.Process(target=_rank_main,
                                 args=(rank, world_size, port, backend, group_timeout, fn, args, queues[rank]),
                                 daemon=True) for rank in range(world_size)]
    for process in processes:
        process.start()
    spawned = time.monotonic()
    watch = _Watch(world_size)
    done: dict[int, Any] = {}
    failed: dict[int, tuple[str, str]] = {}
    first_failure_at = None
    clean = False
    try:
        while True:
            time.sleep(0.1)
            for rank_queue in queues:
                while True:
                    try:
                        message = rank_queue.get_nowait()
                    except queue.Empty:
                        break
                    if message[0] == "beat":
                        watch.beat(*message[1:])
                    else:
                        _, rank, ok, value = message
                        (done if ok else failed)[rank] = value
                        if not ok and first_failure_at is None:
                            first_failure_at = time.monotonic()
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
            if first_failure_at is not None:
                continue
            pending = [rank for rank in range(world_size) if rank not in done]
            now = time.monotonic()
            if not watch.started():
                if now - spawned > startup_timeout:
                    raise watch.diagnose([r for r in pending if watch.step[r] < 0], processes, startup_timeout,
                                         "start-up")
                watch.last_progress = now  # the step clock starts when the last rank has started
            elif now - watch.last_progress > timeout:
                raise watch.diagnose(pending, processes, timeout, "the steps")
    finally:
        stop_processes(processes, grace=10.0 if clean else 0.0)
