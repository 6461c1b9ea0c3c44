"""The demo's output: progress (rank 0) and the closing summary.

rich draws the progress bar on a terminal and the tables when it is installed
(optional: ``pip install rich``); without it, or when the output is not a
terminal, plain lines (see :mod:`moe_ext.cli.table`).
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

from moe_ext.cli.table import format_table, have_rich

__all__ = ["EXIT_NO_REBALANCE", "Progress", "format_report", "format_bytes", "rebalance_shortfall"]


class Progress:
    """Progress over steps, on rank 0.

    On a terminal with rich installed: a rich progress bar (steps, elapsed, an
    estimate of the time left, the step's imbalance and the largest error so
    far), with each rebalance printed above it. Elsewhere (no terminal: logs,
    CI, pytest; or no rich): a plain line every tenth of the run and one per
    rebalance, each rebalance after the progress line of its step.
    """

    def __init__(self, total: int, *, enabled: bool = True, interactive: Optional[bool] = None,
                 stream: Optional[TextIO] = None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every = max(1, total // 10)
        self._rich = None
        if enabled and self.interactive and have_rich():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            console = Console(file=self.stream, force_terminal=True)
            self._rich = RichProgress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                      TextColumn("{task.fields[status]}"),
                                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                      console=console)
            self._task = self._rich.add_task("steps", total=total, status="")
            self._rich.start()

    @staticmethod
    def rebalance_note(rebalance: dict) -> str:
        return (f"rebalance @ step {rebalance['step']}: planned imbalance {rebalance['imbalance_before']:.2f} -> "
                f"{rebalance['imbalance_after']:.2f}, {rebalance['slots_moved']} slots moved, "
                f"{format_bytes(rebalance['bytes_moved'])} in {rebalance['transfer_seconds'] * 1e3:.1f} ms")

    def update(self, done: int, imbalance: float, max_error: float, rebalance: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=done,
                              status=f"imbalance {imbalance:5.2f}  max error {max_error:.1e}")
            if rebalance is not None:
                self._rich.console.print(self.rebalance_note(rebalance), highlight=False)
            return
        if done % self.every == 0 or done == self.total or rebalance is not None:
            self.stream.write(f"step {done:>{len(str(self.total))}}/{self.total}  imbalance {imbalance:5.2f}  "
                              f"max error {max_error:.1e}\n")
        if rebalance is not None:
            self.stream.write(self.rebalance_note(rebalance) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def format_report(result: dict) -> str:
    """The closing summary: rebalances, correctness, throughput per rank."""
    config = result["config"]
    out = []
    rows = []
    for index, event in enumerate(result["rebalances"], 1):
        measured = event.get("measured_imbalance_next_interval")
        rows.append([str(index), str(event["step"]), f"{event['imbalance_before']:.3f}",
                     f"{event['imbalance_after']:.3f}", f"{event['lower_bound']:.3f}",
                     "-" if measured is None else f"{measured:.3f}",
                     f"{event['slots_moved']}/{event['max_moves']}", str(event["rows_moved"]),
                     format_bytes(event["bytes_moved"]), f"{event['plan_seconds'] * 1e3:.2f}",
                     f"{event['transfer_seconds'] * 1e3:.2f}"])
    out.append("Rebalances (imbalance = busiest rank's tokens / mean over ranks; before/after: planner's view of "
               "the recorded window; measured: mean over the next interval)")
    out.append(format_table(["#", "step", "before", "after", "bound", "measured", "slots moved", "rows moved",
                       "bytes moved", "plan ms", "transfer ms"], rows) if rows else "  (no rebalance ran)")
    first, last = result["measured_imbalance_first_interval"], result["measured_imbalance_last_interval"]
    out.append("")
    out.append(f"Measured imbalance: {first:.3f} over the first {config['rebalance_interval']} steps -> "
               f"{last:.3f} over the last {config['rebalance_interval']}")
    verdict = "OK" if result["correct"] else "FAILED"
    out.append(f"Correctness: {verdict}: max |EP output - dense reference| = {result['max_error']:.2e} over "
               f"{config['steps']} steps x {config['ranks']} ranks (tolerance {config['tolerance']:.0e})")
    per_rank = result["tokens_per_second_per_rank"]
    out.append(f"Throughput (forward only): {result.get('tokens_per_second_total', 0.0):,.0f} tokens/s over all "
               f"ranks (every rank's tokens / the slowest rank's time in the layer's forward); per rank: "
               + ", ".join(f"rank {rank}: {value:,.0f}" for rank, value in enumerate(per_rank)))
    out.append("  Per rank = its own tokens / its time in forward. That time includes waiting for the other ranks in "
               "dispatch and combine, so a rank that is scheduled late makes the others wait and look slow too.")
    cores = result.get("host_cpu_count")
    if result.get("device") == "cpu" and cores and cores < config["ranks"]:
        out.append(f"  Here {config['ranks']} ranks share {cores} CPU cores: the per-rank numbers differ with how "
                   "the OS schedules them (up to a few x), not with their expert load.")
    out.append(f"Comm method: {', '.join(result['comm_methods'])}; ranks: {result.get('launcher', 'self-spawned')}; "
               f"wall time {result['wall_seconds']:.1f} s (of which start-up {result.get('startup_seconds', 0.0):.1f} s)")
    return "\n".join(out)


#: the exit code of a run that was correct but showed no rebalance (see :func:`rebalance_shortfall`)
EXIT_NO_REBALANCE = 3


def rebalance_shortfall(result: dict) -> Optional[str]:
    """Why the run showed no rebalance, or None when it did.

    The demo exists to show EPLB at work, so a run where no rebalance ran, no
    slot moved, or the measured imbalance did not fall (last interval against
    the first) did not do its job even when every output was correct: the
    command says so and exits :data:`EXIT_NO_REBALANCE`, not 0.
    """
    config = result["config"]
    rebalances = result["rebalances"]
    interval, steps = config["rebalance_interval"], config["steps"]
    if not rebalances:
        return (f"no rebalance ran: rebalances happen at steps {interval}, {2 * interval}, ... before the last step, "
                f"and --steps {steps} leaves none; use --steps > --rebalance-interval (e.g. --steps {4 * interval})")
    moved = sum(event["slots_moved"] for event in rebalances)
    if moved == 0:
        if all(event["max_moves"] == 0 for event in rebalances):
            return "no slot moved: --max-moves 0 forbids every move; give it a positive bound (or leave it out)"
        before = max(event["imbalance_before"] for event in rebalances)
        return (f"no slot moved in {len(rebalances)} rebalance(s): the planner found no better placement (imbalance "
                f"at most {before:.3f} before, lower bound {rebalances[0]['lower_bound']:.3f}); the routing is "
                f"already about balanced: raise --skew (now {config['skew']}) or try another --seed")
    first, last = result["measured_imbalance_first_interval"], result["measured_imbalance_last_interval"]
    if not last < first:
        return (f"the measured imbalance did not fall: {first:.3f} over the first {interval} steps -> {last:.3f} "
                f"over the last {interval}, though {moved} slot(s) moved; the step-to-step noise of the routing is "
                f"larger than what the moves gained: run more --steps, raise --skew (now {config['skew']}) or "
                f"--tokens-per-rank")
    return None
