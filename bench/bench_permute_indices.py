"""Benchmark of generate_permute_indices against plain-torch implementations of the same contract.

    python bench/bench_permute_indices.py [--device cpu|cuda|all] [--no-graph]

Baselines, measured in the same run:
- "torch vectorized": moe_ext.testing.reference.generate_permute_indices_vectorized, the
  contract in ordinary torch ops (what a user writes without a kernel; it syncs with the host);
- on CUDA our op is also timed as CUDA-graph replays (launch overhead removed).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, time_us  # noqa: E402

import moe_ext  # noqa: E402
from moe_ext.testing.reference import generate_permute_indices_vectorized  # noqa: E402

CASES = [  # (ranks, experts per rank, tokens, alignment)
    (8, 32, 4096, 8),
    (16, 16, 16384, 16),
    (64, 32, 65536, 8),
    (64, 32, 65536, 128),
]


def make_counts(ranks: int, experts: int, tokens: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(ranks * experts + tokens)
    weights = torch.distributions.LogNormal(0.0, 1.0).sample((ranks * experts,))
    choice = torch.multinomial(weights, tokens, replacement=True, generator=generator)
    return torch.bincount(choice, minlength=ranks * experts).to(torch.int32).to(device)


def run(device: str, use_graph: bool) -> list[list[object]]:
    rows = []
    for ranks, experts, tokens, alignment in CASES:
        counts = make_counts(ranks, experts, tokens, device)
        max_len = tokens + ranks * experts * alignment
        ours = lambda: moe_ext.ops.generate_permute_indices(counts, experts, ranks, max_len, alignment)  # noqa: E731
        baseline = lambda: generate_permute_indices_vectorized(counts, experts, ranks, max_len, alignment)  # noqa: E731
        for got, want in zip(ours(), baseline()):
            assert torch.equal(got, want), "op and baseline disagree"
        ours_us = time_us(ours, device, repeats=100 if device == "cuda" else 20)
        base_us = time_us(baseline, device, repeats=50 if device == "cuda" else 10)
        graph_us = "-"
        if use_graph and device == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    ours()
            graph_us = f"{time_us(graph.replay, device, repeats=50) / 20:.1f}"
        rows.append([device, f"{ranks}x{experts}", tokens, alignment, f"{ours_us:.1f}", graph_us,
                     f"{base_us:.1f}", f"{base_us / ours_us:.1f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--no-graph", dest="graph", action="store_false",
                        help="skip the CUDA-graph replay timing")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for device in devices:
        rows += run(device, args.graph)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only"
    print(f"\ngenerate_permute_indices, median µs per call ({name}, torch {torch.__version__})")
    print_table(["device", "ranks x experts", "tokens", "align", "moe_ext µs", "moe_ext in graph µs",
                 "torch vectorized µs", "speed-up"], rows)


if __name__ == "__main__":
    main()
