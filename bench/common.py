"""Timing helpers shared by the benchmarks: median of repeated runs, events on CUDA."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_us(fn: Callable[[], object], device: str, warmup: int = 10, repeats: int = 50,
            inner: int = 1) -> float:
    """Median microseconds per call of ``fn`` (``inner`` calls per timed sample)."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1000.0 / inner)
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - begin) * 1e6 / inner)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: str, num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) measured now."""
    source = torch.empty(num_bytes // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    microseconds = time_us(lambda: target.copy_(source), device, warmup=3, repeats=10)
    return num_bytes / (microseconds * 1e-6) / 1e9


def print_table(headers: list[str], rows: list[list[object]]) -> str:
    """Print (and return) a Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
