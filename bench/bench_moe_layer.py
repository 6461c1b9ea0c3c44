"""MoE layer latency per comm method, split into routing / communication / expert compute.

GPU (the lead's 2-GPU run):
    python bench/bench_moe_layer.py --backend nccl --world-size 2
CPU smoke run (tiny sizes, gloo):
    python bench/bench_moe_layer.py --backend gloo --world-size 2 --tiny

Each rank holds ``tokens`` tokens; the methods run the same layer (same
weights, same tokens). Phases: top-k routing; prepare/finalize (the DP
all-gather and reduce-scatter of the all-gather methods, the TP split of the
others); permute/unpermute (local routing, and for all-to-all also the count
exchange and both token all-to-alls); experts (grouped matmul). Phases are timed with device synchronisation and a
barrier around each (so the split adds a little to the total; the total is
also measured without the split). Prints one table per size (rank 0) and the
method :func:`select_comm_method` picks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_rank(rank, world_size, args):
    from moe_ext.moe import (MoEConfig, MoELayer, build_forward_context, make_comm_method, make_moe_groups,
                             run_local_experts, select_comm_method)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    groups = make_moe_groups(world_size, 1)
    config = MoEConfig(num_experts=args.experts, top_k=args.top_k, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, dtype=dtype, **groups)
    torch.manual_seed(0)
    layer = MoELayer(config, device=device)
    with torch.no_grad():
        layer.gate_weight.normal_()
        layer.w13.normal_(std=args.hidden ** -0.5)
        layer.w2.normal_(std=args.intermediate ** -0.5)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, device=device, dtype=dtype)
        context = build_forward_context(config, tokens, device)
        auto = select_comm_method(config, context.max_tokens_across_dp)
        for method in args.methods:
            comm = make_comm_method(method, config)
            names = ("top-k", "prepare/finalize", "permute/unpermute", "experts", "total (split)", "total")
            samples = {name: [] for name in names}

            def timed(spent, name, fn, *a):
                _sync(device); dist.barrier()
                start = time.perf_counter()
                out = fn(*a)
                _sync(device)
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
                return out

            with torch.no_grad():
                for iteration in range(args.warmup + args.iters):
                    spent = {}
                    weights, slots = timed(spent, "top-k", layer.route, x)
                    prepared = timed(spent, "prepare/finalize", comm.prepare, x, slots, weights, context)
                    routed = timed(spent, "permute/unpermute", comm.permute, *prepared)
                    out = timed(spent, "experts", run_local_experts, routed, layer.w13, layer.w2)
                    combined = timed(spent, "permute/unpermute", comm.unpermute, out)
                    timed(spent, "prepare/finalize", comm.finalize, combined, True)
                    spent["total (split)"] = sum(spent.values())
                    _sync(device); dist.barrier()
                    begin = time.perf_counter()
                    w, s = layer.route(x)
                    routed, metadata = comm.dispatch(x, s, w, context)
                    comm.combine(run_local_experts(routed, layer.w13, layer.w2), metadata, True)
                    _sync(device)
                    spent["total"] = time.perf_counter() - begin
                    if iteration >= args.warmup:
                        for name in names:
                            samples[name].append(spent[name])
            per_iter = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
            rows.append((tokens, method, per_iter, auto))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="nccl")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke run")
    parser.add_argument("--methods", nargs="+", default=["allgather", "alltoall", "native_allgather"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.experts, args.top_k, args.intermediate, args.tokens = 64, 16, 4, 32, [8, 128]
        args.iters, args.warmup = 3, 1
    else:
        args.hidden, args.experts, args.top_k, args.intermediate, args.tokens = 7168, 256, 8, 2048, [64, 8192]
    from moe_ext.testing.distributed import run_distributed
    results = run_distributed(_bench_rank, args.world_size, args, backend=args.backend, timeout=1800)
    rows = results[0]
    print(f"MoE layer, EP {args.world_size} ({args.backend}), hidden {args.hidden}, {args.experts} experts, "
          f"top-{args.top_k}, intermediate {args.intermediate}; median ms per forward on rank 0")
    names = ("top-k", "prepare/finalize", "permute/unpermute", "experts", "total (split)", "total")
    print("| tokens/rank | method | " + " | ".join(names) + " | auto pick |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " | --- |")
    for tokens, method, t, auto in rows:
        print(f"| {tokens} | {method} | " + " | ".join(f"{t[n]:.3f}" for n in names) + f" | {auto} |")
    for tokens in args.tokens:
        best = min((r for r in rows if r[0] == tokens), key=lambda r: r[2]["total"])
        print(f"tokens/rank {tokens}: fastest {best[1]}, automatic choice {best[3]}")


if __name__ == "__main__":
    main()
