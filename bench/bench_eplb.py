"""EPLB placement: moe_ext's planner vs the public greedy algorithm, same traces, same run.

    PYTHONPATH=python taskset -c 0 python bench/bench_eplb.py [--quick]

Four tables (Markdown, for docs/PERFORMANCE.md):
1. balance: imbalance (max GPU load / mean GPU load; mean over layers / worst layer) of the public
   algorithm, of moe_ext with the hierarchy kept (strict, the default) and relaxed
   (allow_cross_node=True), with the strict (node-level) and global lower bounds;
2. speed: medians of the C++ planner on one thread (no log2phy) and of the full Python call, the
   public algorithm's time (one run), and migration planning (`current` given) vs from scratch;
3. migration: slots moved after a 10% drift (every load times U(0.9, 1.1)) and the imbalance
   ratio to the from-scratch plan, strict and relaxed;
4. drift: plan on windows 1..k, evaluate on window k+1, on synthetic traces with log-normal drift
   and regime switches (prefill-like vs decode-like load mixes): point planning (last window),
   the summed window (what engines do), history planning ([windows, layers, experts]) and the
   public algorithm on the summed window.

Traces (seeded): [layers, 256 experts], 8 groups; log-normal loads (sigma 0.8) or Zipf 1.2
(per-layer random permutation of 1/rank^1.2). The public algorithm is
moe_ext.eplb.public_reference (our reimplementation from its published description).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from moe_ext import _native
from moe_ext.eplb import placement_imbalance, plan_placement
from moe_ext.eplb.public_reference import public_rebalance_experts

CASES = [  # (label, layers, slots, gpus, nodes, trace)
    ("288 slots, 32 GPUs, 4 nodes, log-normal", 58, 288, 32, 4, "lognormal"),
    ("320 slots, 64 GPUs, 8 nodes, log-normal", 58, 320, 64, 8, "lognormal"),
    ("288 slots, 32 GPUs, 4 nodes, Zipf 1.2", 58, 288, 32, 4, "zipf"),
    ("512 slots, 256 GPUs, 32 nodes (global), 61 layers", 61, 512, 256, 32, "lognormal"),
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


def median_time(fn, repeats: int) -> float:
    """Median CPU time of this process (all its threads) over `repeats` calls. The machine is
    shared: CPU time leaves out the waits for a core that wall time would count (it still feels a
    busy sibling hyperthread), and medians, not best-of, are reported."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return float(np.median(times))


def mean_worst(values: torch.Tensor) -> str:
    return f"{float(values.mean()):.3f} / {float(values.max()):.3f}"


TRACE_KINDS = {  # name: (log-load random-walk sigma per window, per-window noise sigma, regime switches)
    "drift": (0.15, 0.10, False),    # drift dominated: the last window predicts best
    "noisy": (0.03, 0.40, False),    # sampling noise dominated (short windows)
    "regimes": (0.05, 0.20, True),   # prefill-like / decode-like mixes switching
}


def drifting_trace(layers: int, windows: int, seed: int, kind: str) -> torch.Tensor:
    """[windows, layers, experts]: a random walk of log-loads (log-normal drift), optional regime
    switches between a prefill-like and a decode-like mix (two different hot sets, switching with
    probability 0.35 per window), and per-window log-normal noise."""
    walk_sigma, noise_sigma, regimes = TRACE_KINDS[kind]
    generator = np.random.default_rng(seed)
    prefill = generator.lognormal(0.0, 0.8, size=(layers, EXPERTS))
    decode = generator.lognormal(0.0, 0.8, size=(layers, EXPERTS))
    walk = np.zeros((layers, EXPERTS))
    regime = 0
    out = []
    for _ in range(windows):
        walk += generator.normal(0.0, walk_sigma, size=walk.shape)
        if regimes and generator.random() < 0.35:
            regime = 1 - regime
        share = 0.8 if regime == 0 else 0.2  # the prefill-like share of tokens in this window
        mix = share * prefill + (1 - share) * decode if regimes else prefill
        noise = generator.lognormal(0.0, noise_sigma, size=walk.shape)
        out.append(mix * np.exp(walk) * noise * 1e4)
    return torch.tensor(np.stack(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats and drift steps")
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (this process may use "
          f"{affinity}), torch {torch.__version__}")

    balance, speed, migration = [], [], []
    for label, layers, slots, gpus, nodes, kind in CASES:
        loads = trace(kind, layers)
        shape = (slots, GROUPS, nodes, gpus)
        numpy_loads = loads.numpy()
        started = time.process_time()
        public_phy2log, _, _ = public_rebalance_experts(loads, *shape)
        public_seconds = time.process_time() - started
        public = placement_imbalance(loads, public_phy2log, gpus)
        strict = plan_placement(loads, *shape)
        relaxed = plan_placement(loads, *shape, allow_cross_node=True)
        twins = int(strict.same_gpu_duplicates.sum())
        balance.append(
            f"| {label} | {mean_worst(public)} | {mean_worst(strict.imbalance)} | "
            f"{mean_worst(strict.lower_bound)} | {float((strict.imbalance / strict.lower_bound).max()):.3f} | "
            f"{mean_worst(strict.relaxed_imbalance)} | {mean_worst(relaxed.imbalance)} | "
            f"{mean_worst(relaxed.global_lower_bound)} | {int(relaxed.hierarchy_relaxed.sum())} | {twins} |")
        print(balance[-1], flush=True)

        core_strict = median_time(lambda: _native.eplb_plan(numpy_loads, *shape, num_threads=1,
                                                            with_log2phy=False), repeats)
        core_no_relax = median_time(lambda: _native.eplb_plan(numpy_loads, *shape, num_threads=1, with_log2phy=False,
                                                              evaluate_relaxed=False), repeats)
        core_relaxed = median_time(lambda: _native.eplb_plan(numpy_loads, *shape, num_threads=1, with_log2phy=False,
                                                             allow_cross_node=True), repeats)
        full = median_time(lambda: plan_placement(loads, *shape), repeats)
        drifted = drift(loads)
        drifted_np = drifted.numpy()
        current_np = strict.phy2log.numpy()
        scratch_drift = median_time(lambda: _native.eplb_plan(drifted_np, *shape, num_threads=1, with_log2phy=False),
                                    repeats)
        migrate = median_time(lambda: _native.eplb_plan(drifted_np, *shape, current=current_np, num_threads=1,
                                                        with_log2phy=False), max(3, repeats // 3))
        speed.append(
            f"| {label} | {public_seconds * 1e3:.0f} ms | {core_strict * 1e3:.1f} ms | {core_no_relax * 1e3:.1f} ms | "
            f"{core_relaxed * 1e3:.1f} ms | {full * 1e3:.1f} ms | {public_seconds / core_strict:.0f}x | "
            f"{migrate * 1e3:.1f} ms ({migrate / scratch_drift:.1f}x scratch) |")
        print(speed[-1], flush=True)

        cells = []
        for cross, before in ((False, strict), (True, relaxed)):
            scratch = plan_placement(drifted, *shape, allow_cross_node=cross)
            moved = plan_placement(drifted, *shape, current=before.phy2log, allow_cross_node=cross)
            fraction = moved.moves.double().sum().item() / (layers * slots)
            cells.append(f"{100 * fraction:.1f}% (worst layer {100 * moved.moves.max().item() / slots:.0f}%), "
                         f"ratio to scratch mean {float((moved.imbalance / scratch.imbalance).mean()):.3f} "
                         f"max {float((moved.imbalance / scratch.imbalance).max()):.3f}")
        public_after, _, _ = public_rebalance_experts(drifted, *shape)
        public_changed = (public_after != public_phy2log).double().mean().item()
        migration.append(f"| {label} | {100 * public_changed:.0f}% | {cells[0]} | {cells[1]} |")
        print(migration[-1], flush=True)

    drift_rows = []
    steps = 4 if args.quick else 10
    k = 6
    recency = torch.tensor([2.0 ** i for i in range(k)])
    for kind in TRACE_KINDS:
        for nodes, gpus, slots in ((4, 32, 288), (32, 256, 512)):
            history_all = drifting_trace(16, k + steps, seed=3, kind=kind)
            shape = (slots, GROUPS, nodes, gpus)
            results = {"point (last window)": [], "sum of windows": [], "history": [], "history, recent x2": [],
                       "public (sum)": []}
            for t in range(k, k + steps):
                past, future = history_all[t - k:t], history_all[t]
                plans = {
                    "point (last window)": plan_placement(past[-1], *shape).phy2log,
                    "sum of windows": plan_placement(past.sum(0), *shape).phy2log,
                    "history": plan_placement(past, *shape).phy2log,
                    "history, recent x2": plan_placement(past, *shape, window_weights=recency).phy2log,
                    "public (sum)": public_rebalance_experts(past.sum(0), *shape)[0],
                }
                for name, phy2log in plans.items():
                    results[name].append(placement_imbalance(future, phy2log, gpus).mean().item())
            means = {name: float(np.mean(values)) for name, values in results.items()}
            point = means["point (last window)"] - 1
            gains = [100 * (point - (means[name] - 1)) / max(point, 1e-12) for name in ("history", "history, recent x2")]
            drift_rows.append(f"| {kind}, {slots} slots / {gpus} GPUs / {nodes} nodes | "
                              + " | ".join(f"{means[name]:.3f}" for name in results)
                              + f" | {gains[0]:.0f}% / {gains[1]:.0f}% |")
            print(drift_rows[-1], flush=True)

    print()
    print("Balance (imbalance mean / worst over layers):")
    print("| case | public | moe_ext strict | strict bound | worst strict / bound | strict: relaxed would give "
          "| moe_ext relaxed | global bound | layers relaxed | twins |")
    print("|" + " --- |" * 10)
    print("\n".join(balance))
    print()
    print("Speed (medians of the process's CPU time, one thread; public: one run; 'relaxed not evaluated' is "
          "the drop-in rebalance_experts path):")
    print("| case | public | moe_ext strict (core) | strict, relaxed not evaluated | relaxed (core) | full call "
          "| public / strict | migration (core) |")
    print("|" + " --- |" * 8)
    print("\n".join(speed))
    print()
    print("Migration after a 10% drift (slots moved; imbalance vs a from-scratch plan of the drifted loads):")
    print("| case | public: slots changed | moe_ext strict | moe_ext relaxed |")
    print("|" + " --- |" * 4)
    print("\n".join(migration))
    print()
    print(f"Next-window imbalance (plan on the {k} previous windows, mean over {steps} steps x 16 layers):")
    print("| trace | point (last window) | sum of windows | history | history, recent x2 | public (sum) "
          "| history / recent x2: closer to 1 than point |")
    print("|" + " --- |" * 7)
    print("\n".join(drift_rows))


if __name__ == "__main__":
    main()
