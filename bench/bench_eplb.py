"""EPLB placement: moe_ext's planner vs the public greedy algorithm, same traces, same run.

    PYTHONPATH=python python bench/bench_eplb.py [--quick]

Traces (seeded): [layers, 256 experts], 8 groups; log-normal loads (sigma 0.8) or Zipf 1.2
(per-layer random permutation of 1/rank^1.2). Drift: every load times U(0.9, 1.1).
The public algorithm is moe_ext.eplb.public_reference (our reimplementation from its
published description; the original is not installable from a registry).
Prints a Markdown table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from moe_ext.eplb import placement_imbalance, plan_placement
from moe_ext.eplb.public_reference import public_rebalance_experts
from moe_ext import _native

CASES = [  # (label, layers, slots, gpus, nodes, trace)
    ("288 slots, 32 GPUs, 4 nodes, log-normal", 58, 288, 32, 4, "lognormal"),
    ("320 slots, 64 GPUs, 8 nodes, log-normal", 58, 320, 64, 8, "lognormal"),
    ("288 slots, 32 GPUs, 4 nodes, Zipf 1.2", 58, 288, 32, 4, "zipf"),
    ("512 slots, 256 GPUs, 32 nodes, 61 layers", 61, 512, 256, 32, "lognormal"),
]
EXPERTS, GROUPS = 256, 8


def trace(kind: str, layers: int, seed: int = 0) -> torch.Tensor:
    generator = np.random.default_rng(seed)
    if kind == "lognormal":
        loads = generator.lognormal(0.0, 0.8, size=(layers, EXPERTS))
    else:
        base = 1.0 / np.arange(1, EXPERTS + 1) ** 1.2
        loads = np.stack([base[generator.permutation(EXPERTS)] for _ in range(layers)])
    return torch.tensor(loads * 1e4)


def drift(loads: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return loads * torch.from_numpy(np.random.default_rng(seed).uniform(0.9, 1.1, size=tuple(loads.shape)))


def best_time(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls (the machine is shared: medians, not best-of)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    rows = []
    for label, layers, slots, gpus, nodes, kind in CASES:
        loads = trace(kind, layers)
        drifted = drift(loads)
        shape = (slots, GROUPS, nodes, gpus)
        numpy_loads = loads.numpy()

        started = time.perf_counter()
        public_before, _, _ = public_rebalance_experts(loads, *shape)
        public_seconds = time.perf_counter() - started
        public_after, _, _ = public_rebalance_experts(drifted, *shape)
        public_imbalance = placement_imbalance(loads, public_before, gpus)
        public_changed = (public_after != public_before).double().mean().item()

        ours = plan_placement(loads, *shape)
        core_1 = best_time(lambda: _native.eplb_plan(numpy_loads, *shape, num_threads=1, with_log2phy=False), repeats)
        core_2 = best_time(lambda: _native.eplb_plan(numpy_loads, *shape, num_threads=2, with_log2phy=False), repeats)
        core_fast = best_time(lambda: _native.eplb_plan(numpy_loads, *shape, num_threads=1, with_log2phy=False, refine_counts=False), repeats)
        fast_plan = plan_placement(loads, *shape, refine_counts=False)
        full_1 = best_time(lambda: plan_placement(loads, *shape, num_threads=1), repeats)
        scratch_after = plan_placement(drifted, *shape)
        ours_changed = (scratch_after.phy2log != ours.phy2log).double().mean().item()
        migrated = plan_placement(drifted, *shape, current=ours.phy2log)
        migration_seconds = best_time(lambda: plan_placement(drifted, *shape, current=ours.phy2log), 3)
        moved = migrated.moves.double().sum().item() / (layers * slots)
        worst_layer_moved = migrated.moves.max().item() / slots
        ratio = (migrated.imbalance / scratch_after.imbalance)
        rows.append(
            f"| {label} | {public_seconds:.2f} s | {public_imbalance.mean():.3f} / {public_imbalance.max():.3f} "
            f"| {100 * public_changed:.0f}% "
            f"| {core_1 * 1e3:.1f} / {core_2 * 1e3:.1f} ms ({full_1 * 1e3:.1f} ms; no count moves {core_fast * 1e3:.1f} ms, {fast_plan.imbalance.mean():.3f}) "
            f"| {ours.imbalance.mean():.3f} / {ours.imbalance.max():.3f} "
            f"| {ours.lower_bound.max():.3f} | {int(ours.hierarchy_relaxed.sum())} "
            f"| {100 * ours_changed:.0f}% "
            f"| {100 * moved:.1f}% (worst layer {100 * worst_layer_moved:.0f}%), "
            f"{migrated.imbalance.mean():.3f} / {migrated.imbalance.max():.3f}, "
            f"max ratio to scratch {ratio.max():.3f}, {migration_seconds * 1e3:.0f} ms |")
        print(rows[-1], flush=True)
    print()
    print("| case | public: time | public: imbalance mean / worst | public: slots changed after drift "
          "| moe_ext: plan time 1 / 2 threads (full call, 1 thread) | moe_ext: imbalance mean / worst "
          "| lower bound (worst) | layers relaxed | moe_ext from scratch: slots changed after drift "
          "| moe_ext with current: slots moved, imbalance mean / worst, time |")
    print("|" + " --- |" * 10)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
