"""Benchmark of expert weight rearrangement: planning time, rows moved against
the reference engine's pairing rule, and transfer bandwidth against a plain
send/recv of the same bytes measured in the same run.

    python bench/bench_rearrange.py                 # nccl on 2 GPUs if present, else gloo (small)
    python bench/bench_rearrange.py --backend gloo --world-size 2 --row-shape 3,64,256 --dtype float32

The transfer part spawns its ranks itself (moe_ext.testing.distributed,
no torchrun). Default sizes on GPUs: a DeepSeek-V3 expert (w13 [4096, 7168] +
w2 [7168, 2048] bf16 = 3 x 7168 x 2048 x 2 bytes), 8 slots per rank, 8 layers,
half of every rank's slots refilled from the previous rank, in two
scenarios: "swap" (the rows refilled are rows sent away: all go through the
buffer) and "replace" (they held dropped replicas: received in place).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # seed_rule_stats lives beside its tests

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "float32": torch.float32}


# --------------------------------------------------------------------- planning


def eplb_like_maps(rng: np.random.Generator, num_layers: int, slots: int, experts: int,
                   changed_fraction: float) -> tuple:
    """Old: every expert once plus random replicas, shuffled. New: the old map
    with a fraction of the slots given other experts (1.0: an unrelated placement)."""
    olds, news = [], []
    for _ in range(num_layers):
        old = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
        rng.shuffle(old)
        if changed_fraction >= 1.0:
            new = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
            rng.shuffle(new)
        else:
            new = old.copy()
            changed = rng.choice(slots, int(slots * changed_fraction), replace=False)
            new[changed] = old[rng.permutation(changed)]  # experts move between those slots
        olds.append(old)
        news.append(new)
    return np.stack(olds).astype(np.int64), np.stack(news).astype(np.int64)


def bench_planning(repeats: int) -> list:
    from moe_ext import _native
    from moe_ext.eplb import plan_expert_transfer
    from test_transfer_plan import seed_rule_stats

    rows = []
    rng = np.random.default_rng(0)
    layers, ep, per_rank, experts = 61, 64, 8, 256
    for label, fraction in (("25% of slots change", 0.25), ("unrelated placement", 1.0)):
        old, new = eplb_like_maps(rng, layers, ep * per_rank, experts, fraction)
        for _ in range(5):
            _native.plan_expert_transfer(old, new, ep, per_rank, 8, -1)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _native.plan_expert_transfer(old, new, ep, per_rank, 8, -1)
            times.append(time.perf_counter() - start)
        plan = plan_expert_transfer(old, new, ep, ranks_per_node=8)
        seed = seed_rule_stats(old, new, ep)
        rows.append({
            "maps": label, "plan_ms_median": 1e3 * statistics.median(times), "plan_ms_min": 1e3 * min(times),
            "rows_moved": plan.total_rows_moved, "seed_rows_moved": seed["rows_moved"],
            "max_sent": int(plan.rows_sent.max()), "seed_max_sent": seed["max_rows_sent"],
            "buffer_rows": int(plan.buffer_rows.max()), "seed_buffer_rows": seed["max_buffer_rows"],
        })
    return rows


# --------------------------------------------------------------------- transfer


def half_exchange_maps(num_layers: int, ep: int, per_rank: int, scenario: str) -> tuple:
    """Maps where every rank receives the second half of its slots from the previous rank.

    "swap": every expert once; each rank's second half goes to the next rank, so
    the rows that receive are rows that send: all of them pass through the buffer.
    "replace": the second half holds replicas of the rank's own first half and
    receives the previous rank's first half; the replicas are dropped, so rows
    land straight in place and no buffer is used.
    """
    half = per_rank // 2
    old = np.empty((num_layers, ep * per_rank), dtype=np.int64)
    new = np.empty_like(old)
    for rank in range(ep):
        previous = (rank - 1) % ep
        for row in range(per_rank):
            slot = rank * per_rank + row
            if scenario == "swap":
                old[:, slot] = slot
                new[:, slot] = slot if row < per_rank - half else previous * per_rank + row
            else:
                own = rank * per_rank + row % (per_rank - half)
                old[:, slot] = rank * per_rank + row if row < per_rank - half else own
                new[:, slot] = slot if row < per_rank - half else previous * per_rank + row - (per_rank - half)
    return old, new


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_bench(rank: int, world_size: int, row_shapes: list, dtype_name: str, num_layers: int,
                per_rank: int, repeats: int, scenarios: list) -> list:
    return [_scenario_bench(rank, world_size, row_shapes, dtype_name, num_layers, per_rank, repeats, scenario)
            for scenario in scenarios]


def _scenario_bench(rank: int, world_size: int, row_shapes: list, dtype_name: str, num_layers: int,
                    per_rank: int, repeats: int, scenario: str) -> dict:
    import torch.distributed as dist

    from moe_ext.eplb import rearrange_expert_weights_inplace

    dtype = DTYPES[dtype_name]
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    weights = [[torch.randn(per_rank, *shape, device=device).to(dtype) for shape in row_shapes]
               for _ in range(num_layers)]
    old, new = half_exchange_maps(num_layers, world_size, per_rank, scenario)
    row_bytes = sum(int(np.prod(shape)) for shape in row_shapes) * torch.finfo(dtype).bits // 8
    received_rows = (per_rank // 2) * num_layers
    payload = received_rows * row_bytes  # bytes this rank receives (and sends) per rearrangement

    # Reference: plain batched send/recv of the same bytes, one message per layer and direction.
    layer_bytes = (per_rank // 2) * row_bytes
    send = torch.empty(layer_bytes, dtype=torch.uint8, device=device)
    recv = torch.empty(layer_bytes, dtype=torch.uint8, device=device)
    after, before = (rank + 1) % world_size, (rank - 1) % world_size

    def plain() -> None:
        for _ in range(num_layers):
            ops = [dist.P2POp(dist.isend, send, after), dist.P2POp(dist.irecv, recv, before)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def timed(fn) -> float:
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    plain_times, ours_times = [], []
    plain()
    forward = True
    rearrange_expert_weights_inplace(old, new, weights, allow_dropping_experts=True)  # warm-up (and back below)
    rearrange_expert_weights_inplace(new, old, weights, allow_dropping_experts=True)
    peak_extra = None
    plan = rearrange_expert_weights_inplace(old, new, weights, is_profile=True, allow_dropping_experts=True)
    received = int(plan.rows_received[:, rank].sum())
    assert received == received_rows, (received, received_rows)
    buffer_bytes = _buffer_bytes_of(plan, rank, row_bytes)
    for _ in range(repeats):
        plain_times.append(timed(plain))
        src, dst = (old, new) if forward else (new, old)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        ours_times.append(timed(lambda: rearrange_expert_weights_inplace(src, dst, weights, allow_dropping_experts=True)))
        if device.type == "cuda":
            extra = torch.cuda.max_memory_allocated(device) - baseline
            peak_extra = extra if peak_extra is None else max(peak_extra, extra)
        forward = not forward
    del send, recv
    return {"scenario": scenario, "payload": payload, "row_bytes": row_bytes, "layer_bytes": per_rank * row_bytes,
            "buffer_bytes": buffer_bytes,
            "plain_s": statistics.median(plain_times), "ours_s": statistics.median(ours_times),
            "peak_extra": peak_extra, "device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"}


def _buffer_bytes_of(plan, rank: int, row_bytes: int) -> int:
    return int(plan.buffer_rows[:, rank].max()) * row_bytes if plan.num_layers else 0


def bench_transfer(backend: str, world_size: int, row_shapes: list, dtype: str, num_layers: int,
                   per_rank: int, repeats: int, scenarios: list) -> list:
    from moe_ext.testing.distributed import run_distributed

    return run_distributed(_rank_bench, world_size, row_shapes, dtype, num_layers, per_rank, repeats, scenarios,
                           backend=backend, timeout=600)


# --------------------------------------------------------------------- main


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f}"


def main() -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="nccl" if gpus >= 2 else "gloo")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--slots-per-rank", type=int, default=8)
    parser.add_argument("--row-shape", action="append",
                        help="row shape of one weight tensor, e.g. 4096,7168 (repeatable)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-planning", action="store_true")
    args = parser.parse_args()
    if args.row_shape:
        row_shapes = [tuple(int(x) for x in s.split(",")) for s in args.row_shape]
    elif args.backend == "nccl":
        row_shapes = [(2 * 2048, 7168), (7168, 2048)]  # DeepSeek-V3 expert: w13 and w2
    else:
        row_shapes = [(2 * 64, 256), (256, 64)]  # small, for CPU

    if not args.skip_planning:
        print("## Planning: 61 layers x 512 slots x 64 ranks (256 experts + 256 replicas, 8 ranks per node)\n")
        print("| maps | plan ms (median) | plan ms (min) | rows moved | seed rule rows moved "
              "| max rows sent by one rank in a layer (ours / seed rule) | max buffer rows (ours / seed rule) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for row in bench_planning(repeats=100):
            print(f"| {row['maps']} | {row['plan_ms_median']:.3f} | {row['plan_ms_min']:.3f} | {row['rows_moved']} "
                  f"| {row['seed_rows_moved']} | {row['max_sent']} / {row['seed_max_sent']} "
                  f"| {row['buffer_rows']} / {row['seed_buffer_rows']} |")
        print()

    scenarios = ["swap", "replace"]
    results = bench_transfer(args.backend, args.world_size, row_shapes, args.dtype, args.layers,
                             args.slots_per_rank, args.repeats, scenarios)
    first = results[0][0]
    print(f"## Transfer: backend {args.backend}, {args.world_size} ranks ({first['device']}), {args.layers} layers, "
          f"{args.slots_per_rank} slots per rank, half of them replaced, rows {row_shapes} {args.dtype} "
          f"({first['row_bytes'] / 1e6:.1f} MB per expert), median of {args.repeats}\n")
    print("| maps | rank | MB received | plain send/recv ms | plain GB/s | rearrange ms | rearrange GB/s | ours / plain "
          "| peak extra MB | buffer MB (plan) | one layer of weights MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for index, scenario in enumerate(scenarios):
        for rank, per_rank_results in enumerate(results):
            r = per_rank_results[index]
            plain_bw = r["payload"] / r["plain_s"]
            ours_bw = r["payload"] / r["ours_s"]
            peak = _mb(r["peak_extra"]) if r["peak_extra"] is not None else "n/a (CPU)"
            print(f"| {scenario} | {rank} | {_mb(r['payload'])} | {1e3 * r['plain_s']:.2f} | {plain_bw / 1e9:.1f} "
                  f"| {1e3 * r['ours_s']:.2f} | {ours_bw / 1e9:.1f} | {100 * ours_bw / plain_bw:.0f}% | {peak} "
                  f"| {_mb(r['buffer_bytes'])} | {_mb(r['layer_bytes'])} |")


if __name__ == "__main__":
    main()
