"""Parallel linear ops: fused matmul + collective vs the unfused pair vs plain nn.Linear + collective.

GPU (the lead's 2-GPU run; NVLink multicast stays off, set here too):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python bench/bench_linear.py --backend nccl --world-size 2
CPU smoke run (tiny sizes, gloo; the fused column reads "n/a"):
    python bench/bench_linear.py --backend gloo --world-size 2 --tiny

Shapes of a 7168-hidden dense-attention model, bf16, sequence parallel (the
hidden states sharded along tokens over TP = world size):

- ``qkv_proj`` 7168 -> 9216 and ``gate_up_proj`` 7168 -> 2 x 18432, column:
  SequenceColumnParallelOp, all-gather of the token shards + matmul
  (fused: ``torch.ops.symm_mem.fused_all_gather_matmul``);
- ``o_proj`` 7168 -> 7168 and ``down_proj`` 18432 -> 7168, row:
  SequenceRowParallelOp, matmul + reduce-scatter
  (fused: ``torch.ops.symm_mem.fused_matmul_reduce_scatter``), and the plain
  all-reduce row op (RowParallelOp; torch has no fused matmul + all-reduce).

Token counts are the layer's whole batch: decode 64, prefill 8192. Per row:
the op with ``fusion="fused"``, the op with ``fusion="unfused"``, and the
plain reference in the same run: ``F.linear`` on the shard plus the one
``torch.distributed`` collective, no moe_ext code. Median microseconds per
call on rank 0 (CUDA events), and the ratios to the plain reference.
"""

from __future__ import annotations

import argparse
import os
import sys

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {"qkv_proj": ("column", 7168, 9216), "gate_up_proj": ("column", 7168, 36864),
          "o_proj": ("row", 7168, 7168), "down_proj": ("row", 18432, 7168)}
TINY_SHAPES = {"qkv_proj": ("column", 64, 96), "gate_up_proj": ("column", 64, 256),
               "o_proj": ("row", 64, 64), "down_proj": ("row", 192, 64)}


def _bench_rank(rank, world_size, args):
    from common import time_us

    from moe_ext.distributed import ParallelConfig, destroy_parallel_state, get_tp_group, init_parallel_state
    from moe_ext.parallel import (ColumnParallelLinear, LinearBackend, LinearContext, RowParallelLinear, RowParallelOp,
                                  SequenceColumnParallelOp, SequenceRowParallelOp)

    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    init_parallel_state(ParallelConfig(world_size, world_size, 1))
    tp = get_tp_group()
    pg = tp.device_group
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    rows = []

    def timed(fn):
        try:
            return time_us(fn, str(device), warmup=args.warmup, repeats=args.iters)
        except Exception as error:  # noqa: BLE001 - a variant this backend cannot run is reported, not fatal
            return f"n/a ({str(error).split(': ')[-1][:80]})"

    with torch.no_grad():
        for tokens in args.tokens:
            ctx = LinearContext(pad_size=0, sequence_parallel=True)
            for name, (direction, k, n) in args.shapes.items():
                weight = torch.randn(n // world_size if direction == "column" else n,
                                     k if direction == "column" else k // world_size,
                                     device=device, dtype=dtype) * 0.02
                if direction == "column":
                    x = torch.randn(tokens // world_size, k, device=device, dtype=dtype)
                    gathered = torch.empty(tokens, k, device=device, dtype=dtype)

                    def plain():
                        gather(gathered, x, group=pg)
                        return F.linear(gathered, weight)
                    variants = {}
                    for fusion in ("fused", "unfused"):
                        layer = ColumnParallelLinear(k, n, bias=False, return_bias=False, params_dtype=dtype,
                                                     device=device,
                                                     op=SequenceColumnParallelOp(tp, LinearBackend(fusion)))
                        layer.weight.copy_(weight)
                        variants[fusion] = (lambda layer=layer: layer(x, ctx))
                    rows.append((tokens, name, "all-gather + matmul", timed(variants["fused"]),
                                 timed(variants["unfused"]), timed(plain)))
                else:
                    x = torch.randn(tokens, k // world_size, device=device, dtype=dtype)
                    scattered = torch.empty(tokens // world_size, n, device=device, dtype=dtype)

                    def plain_rs():
                        scatter(scattered, F.linear(x, weight), group=pg)
                        return scattered

                    def plain_ar():
                        out = F.linear(x, weight)
                        dist.all_reduce(out, group=pg)
                        return out
                    variants = {}
                    for fusion in ("fused", "unfused"):
                        layer = RowParallelLinear(k, n, bias=False, return_bias=False, params_dtype=dtype,
                                                  device=device, op=SequenceRowParallelOp(tp, LinearBackend(fusion)))
                        layer.weight.copy_(weight)
                        variants[fusion] = (lambda layer=layer: layer(x, ctx))
                    rows.append((tokens, name, "matmul + reduce-scatter", timed(variants["fused"]),
                                 timed(variants["unfused"]), timed(plain_rs)))
                    ar = RowParallelLinear(k, n, bias=False, return_bias=False, params_dtype=dtype, device=device,
                                           op=RowParallelOp(tp, LinearBackend("unfused")))
                    ar.weight.copy_(weight)
                    rows.append((tokens, name, "matmul + all-reduce", "n/a (no fused op in torch)",
                                 timed(lambda: ar(x)), timed(plain_ar)))
                del weight
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    destroy_parallel_state()
    return rows


def _cell(value):
    return f"{value:.1f}" if isinstance(value, float) else value


def _ratio(value, reference):
    return f"{value / reference:.2f}" if isinstance(value, float) and isinstance(reference, float) else "—"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="nccl")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke run")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.tokens, args.iters, args.warmup = TINY_SHAPES, [8, 64], 3, 1
    else:
        args.shapes, args.tokens = SHAPES, [64, 8192]
    from moe_ext.testing.distributed import run_distributed
    results = run_distributed(_bench_rank, args.world_size, args, backend=args.backend, timeout=1800)
    print(f"Parallel linear ops, TP {args.world_size} ({args.backend}, torch {torch.__version__}), sequence parallel; "
          "median us per call on rank 0; ratios to plain nn.Linear + collective (lower is faster)")
    headers = ["tokens", "layer", "step", "fused", "unfused (moe_ext)", "plain", "fused / plain", "unfused / plain"]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join(" --- " for _ in headers) + "|")
    for tokens, name, step, fused, unfused, plain in results[0]:
        print(f"| {tokens} | {name} | {step} | {_cell(fused)} | {_cell(unfused)} | {_cell(plain)} | "
              f"{_ratio(fused, plain)} | {_ratio(unfused, plain)} |")


if __name__ == "__main__":
    main()
