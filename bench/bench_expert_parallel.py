"""Training step (forward + backward) of an expert-parallel MoE layer: moe_ext vs the seed vs torchtitan.

    python bench/bench_expert_parallel.py                       # NCCL on 2 GPUs (the issue's sizes)
    python bench/bench_expert_parallel.py --backend gloo --small  # CPU smoke run

Each rank routes ``--tokens`` tokens (top-``--topk`` of ``--experts`` experts, random),
hidden ``--dim``, expert intermediate ``--inter``, bf16 on GPU. The experts are the same
:class:`moe_ext.parallel.GroupedExperts` (``torch._grouped_mm`` on GPU) in every column;
what differs is the token path around them:

- moe_ext: ``moe_permute`` -> count exchange + all-to-all -> ``group_by_local_expert`` ...
  ``ungroup_by_local_expert`` -> all-to-all -> ``moe_unpermute`` (fp32 combine);
- seed: ``argsort`` + gather -> ``all_to_all_single_autograd`` -> ``vstack`` of a zero row +
  gather ... index put -> all-to-all -> score multiply + ``index_add_`` (seed 003's path);
- torchtitan: torchtitan 0.3's ``AllToAllTokenDispatcher`` (when torchtitan imports).

Printed per column: median ms per step over ``--steps`` steps after warm-up (CUDA events
on GPU), and the ratio to moe_ext. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from moe_ext.testing.distributed import run_distributed


def _seed_path(x, scores, ids, experts, group, num_experts):
    """Seed 003's token path (plain torch)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    from moe_ext.ops import generate_permute_indices

    ep = dist.get_world_size(group)
    local = num_experts // ep
    top_k = ids.shape[1]
    order = torch.argsort(ids.reshape(-1), stable=True)
    token_of_row = order // top_k
    routed = x[token_of_row]
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
    counts_group = torch.empty_like(counts)
    dist.all_to_all_single(counts_group, counts, group=group)
    input_splits = counts.view(ep, -1).sum(1).tolist()
    output_splits = counts_group.view(ep, -1).sum(1).tolist()
    arrived = all_to_all_single_autograd(routed, output_splits, input_splits, group)
    max_len = arrived.shape[0] + local * 8
    with torch.no_grad():
        permuted_indices, m_sizes, _ = generate_permute_indices(counts_group, local, ep, max_len, 8)
    with_zero = torch.vstack((arrived, arrived.new_zeros((1, arrived.shape[1]))))
    safe = torch.where(permuted_indices >= 0, permuted_indices, arrived.shape[0]).long()
    grouped = with_zero[safe]
    out_rows = experts(grouped, m_sizes)
    back = out_rows.new_empty(with_zero.shape)
    back = back.index_put((safe,), out_rows)[:-1]
    returned = all_to_all_single_autograd(back, input_splits, output_splits, group)
    weighted = returned * scores.reshape(-1)[order].unsqueeze(1).to(returned.dtype)
    return torch.zeros_like(x).index_add(0, token_of_row, weighted)


def _moe_ext_path(x, scores, ids, experts, group, num_experts):
    from moe_ext.ops import moe_permute, moe_unpermute
    from moe_ext.parallel.expert_parallel import combine_tokens, dispatch_tokens

    permuted, row_idx, counts = moe_permute(x, ids, num_experts=num_experts)
    rows, m_sizes, metadata = dispatch_tokens(permuted, counts, group, alignment=8)
    back = combine_tokens(experts(rows, m_sizes), metadata, group)
    return moe_unpermute(back, row_idx, scores)


def _torchtitan_path(dispatcher):
    def run(x, scores, ids, experts, group, num_experts):
        counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
        rows, local_counts, metadata = dispatcher.dispatch(x, scores, ids, counts)
        return dispatcher.combine(experts(rows, local_counts), metadata, x)
    return run


def _bench(rank, world_size, args):
    from torch.distributed.device_mesh import init_device_mesh

    from moe_ext.parallel.expert_parallel import GroupedExperts

    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mesh = init_device_mesh(device.type, (world_size,))
    group = mesh.get_group()
    local = args.experts // world_size
    torch.manual_seed(rank)
    experts = GroupedExperts(args.dim, args.inter, local, dtype=dtype, device=device)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    ids = torch.stack([torch.randperm(args.experts)[:args.topk] for _ in range(args.tokens)]).to(device)
    scores = torch.rand(args.tokens, args.topk, device=device, requires_grad=True)
    grad = torch.randn_like(x)

    paths = {"moe_ext": _moe_ext_path, "seed": _seed_path}
    try:
        from torchtitan.distributed.utils import set_spmd_backend
        from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

        set_spmd_backend("partial_dtensor")
        dispatcher = AllToAllTokenDispatcher(AllToAllTokenDispatcher.Config(num_experts=args.experts,
                                                                            top_k=args.topk))
        dispatcher.wire_meshes(ep_mesh=mesh)
        paths["torchtitan"] = _torchtitan_path(dispatcher)
    except Exception as error:  # not installed, or not importable on this torch: bench the others
        paths["torchtitan"] = None
        note = f"torchtitan not importable ({type(error).__name__}: {error})"
    else:
        note = "torchtitan 0.3 AllToAllTokenDispatcher"

    results = {}
    for name, path in paths.items():
        if path is None:
            continue
        if name == "torchtitan":  # it may import yet fail on this torch at its first call
            try:
                path(x, scores, ids, experts, group, args.experts).sum().backward()
            except Exception as error:  # noqa: BLE001 - any failure: leave the column out, say why
                note = f"torchtitan fails on this torch ({type(error).__name__}: {error})"
                continue
            finally:
                x.grad = scores.grad = None
                experts.zero_grad(set_to_none=True)
        times = []
        for step in range(args.warmup + args.steps):
            dist.barrier(group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            out = path(x, scores, ids, experts, group, args.experts)
            (out.float() * grad.float()).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append((time.perf_counter() - begin) * 1e3)
            x.grad = scores.grad = None
            experts.zero_grad(set_to_none=True)
        results[name] = statistics.median(times)
    return results, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny sizes for a CPU smoke run")
    args = parser.parse_args()
    if args.small:
        args.tokens, args.dim, args.inter, args.steps, args.warmup = 256, 64, 32, 3, 1
    results = run_distributed(_bench, args.world_size, args, backend=args.backend, timeout=540)
    per_rank, note = zip(*results)
    name = torch.cuda.get_device_name() if args.backend == "nccl" else "CPU"
    print(f"# expert-parallel training step, {args.world_size} x {name}, {args.backend}, torch {torch.__version__}; "
          f"{args.tokens} tokens/rank, dim {args.dim}, inter {args.inter}, {args.experts} experts, top-{args.topk}; "
          f"{note[0]}")
    print("| path | ms per step (max over ranks, median of steps) | / moe_ext |")
    print("| --- | --- | --- |")
    ours = max(r["moe_ext"] for r in per_rank)
    for path in per_rank[0]:
        ms = max(r[path] for r in per_rank)
        print(f"| {path} | {ms:.2f} | {ms / ours:.2f} |")


if __name__ == "__main__":
    main()
