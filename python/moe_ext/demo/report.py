"""Plain-text output of the demo: the progress bar (rank 0) and the closing tables."""

from __future__ import annotations

import sys
from typing import Optional, TextIO

__all__ = ["Progress", "format_report", "format_bytes"]


class Progress:
    """A one-line progress bar over steps, redrawn with ``\\r`` on a terminal.

    Elsewhere (logs, CI, pytest) it prints a line every tenth of the run and at
    each rebalance instead, so the output stays readable.
    """

    def __init__(self, total: int, *, enabled: bool = True, interactive: Optional[bool] = None,
                 stream: Optional[TextIO] = None, width: int = 24):
        self.total, self.enabled, self.width = total, enabled, width
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every = max(1, total // 10)
        self._open_line = False

    def update(self, done: int, imbalance: float, max_error: float, rebalance: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"step {done:>{len(str(self.total))}}/{self.total} [{bar}] imbalance {imbalance:5.2f}  "
                f"max error {max_error:.1e}")
        if rebalance is not None:
            note = (f"rebalance @ step {rebalance['step']}: planned imbalance {rebalance['imbalance_before']:.2f} -> "
                    f"{rebalance['imbalance_after']:.2f}, {rebalance['slots_moved']} slots moved, "
                    f"{format_bytes(rebalance['bytes_moved'])} in {rebalance['transfer_seconds'] * 1e3:.1f} ms")
            if self.interactive:
                self.stream.write("\r\033[K" + note + "\n")
            else:
                self.stream.write(note + "\n")
        if self.interactive:
            self.stream.write("\r\033[K" + line)
            self._open_line = True
        elif done % self.every == 0 or done == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


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
    out.append(_table(["#", "step", "before", "after", "bound", "measured", "slots moved", "rows moved",
                       "bytes moved", "plan ms", "transfer ms"], rows) if rows else "  (no rebalance ran)")
    first, last = result["measured_imbalance_first_interval"], result["measured_imbalance_last_interval"]
    out.append("")
    out.append(f"Measured imbalance: {first:.3f} over the first {config['rebalance_interval']} steps -> "
               f"{last:.3f} over the last {config['rebalance_interval']}")
    verdict = "OK" if result["correct"] else "FAILED"
    out.append(f"Correctness: {verdict}: max |EP output - dense reference| = {result['max_error']:.2e} over "
               f"{config['steps']} steps x {config['ranks']} ranks (tolerance {config['tolerance']:.0e})")
    per_rank = result["tokens_per_second_per_rank"]
    out.append("Throughput (forward only, tokens/s per rank): "
               + ", ".join(f"rank {rank}: {value:,.0f}" for rank, value in enumerate(per_rank)))
    out.append(f"Comm method: {', '.join(result['comm_methods'])}; wall time {result['wall_seconds']:.1f} s")
    return "\n".join(out)
