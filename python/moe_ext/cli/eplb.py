"""`moe-ext eplb`: plan expert placement from a recorded load file, report it, plot it, save it.

    moe-ext eplb loads.pt --replicas 288 --gpus 32 --nodes 4 --groups 8 \\
        [--current placement.pt] [--max-moves 16] --output placement.pt --plot placement.png

The load file is .pt (a tensor, or a dict with "load") or .npy, shaped [layers, experts] or
[steps, layers, experts] (steps are summed). The placement file is a torch.save dict with
phy2log / log2phy / logcnt (the public contract) and the plan's statistics; it can be passed
back as --current next time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eplb", help="plan expert placement (EPLB) from a load file",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loads", type=Path, help=".pt or .npy, [layers, experts] or [steps, layers, experts]")
    parser.add_argument("--replicas", type=int, required=True, help="physical expert slots per layer")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) holding the slots")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--groups", type=int, default=1,
                        help="expert groups; hierarchical mode when groups %% nodes == 0 (default 1)")
    parser.add_argument("--current", type=Path, help="placement in force (.pt from --output, or a phy2log tensor)")
    parser.add_argument("--max-moves", type=int, help="most slots per layer that may change expert (needs --current)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="with --current: stop moving within this fraction of the from-scratch imbalance")
    cross = parser.add_mutually_exclusive_group()
    cross.add_argument("--no-cross-node", dest="allow_cross_node", action="store_false",
                       help="hierarchical mode: never place a replica outside its group's node (default)")
    cross.add_argument("--allow-cross-node", dest="allow_cross_node", action="store_true",
                       help="hierarchical mode: let redundant replicas leave their node where that lowers a "
                            "layer's imbalance by more than 2%% (breaks node-limited routing's assumption)")
    parser.set_defaults(allow_cross_node=False)
    parser.add_argument("--threads", type=int, default=0, help="planner threads over layers (0: all cores)")
    parser.add_argument("--output", type=Path, help="write the placement here (torch.save dict)")
    parser.add_argument("--plot", type=Path, help="draw per-GPU load before/after to this PNG (needs matplotlib)")
    parser.add_argument("--plot-layer", type=int, help="layer shown per GPU (default: the worst before)")
    parser.add_argument("--compare-public", action="store_true",
                        help="also run moe_ext's reimplementation of the public greedy algorithm")
    parser.set_defaults(func=run)


def read_loads(path: Path):
    import numpy as np
    import torch

    if not path.exists():
        raise ValueError(f"loads: no such file {path}")
    if path.suffix == ".npy":
        loads = torch.from_numpy(np.load(path))
    elif path.suffix in (".pt", ".pth"):
        loads = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loads, dict):
            if "load" not in loads:
                raise ValueError(f"loads: {path} holds a dict without a 'load' entry (keys: {sorted(loads)})")
            loads = loads["load"]
        if not isinstance(loads, torch.Tensor):
            raise ValueError(f"loads: {path} must hold a tensor, got {type(loads).__name__}")
    else:
        raise ValueError(f"loads: expected a .pt or .npy file, got {path}")
    if loads.dim() == 3:
        loads = loads.to(torch.float64).sum(0)
    if loads.dim() != 2:
        raise ValueError(f"loads: expected [layers, experts] or [steps, layers, experts], got {list(loads.shape)}")
    return loads.to(torch.float64)


def read_current(path: Path):
    import torch

    current = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(current, dict):
        current = current.get("phy2log")
    if not isinstance(current, torch.Tensor):
        raise ValueError(f"current: {path} must hold a phy2log tensor or a dict with 'phy2log'")
    return current


def gpu_loads(loads, phy2log, num_gpus: int):
    """[layers, gpus] load per GPU of a placement (load / replicas summed per GPU)."""
    import torch

    counts = torch.zeros_like(loads).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=loads.dtype))
    per_slot = (loads / counts.clamp_min(1)).gather(1, phy2log)
    return per_slot.view(loads.shape[0], num_gpus, -1).sum(-1)


def draw(path: Path, loads, before, after, args, layer: int, before_label: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or moe_ext[plot])") from None
    import torch

    before_gpu = gpu_loads(loads, before, args.gpus)
    after_gpu = gpu_loads(loads, after, args.gpus)
    mean = before_gpu.mean(1, keepdim=True).clamp_min(1e-300)
    before_imb = (before_gpu.max(1).values / mean[:, 0]).numpy()
    after_imb = (after_gpu.max(1).values / mean[:, 0]).numpy()

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, min(20.0, args.gpus * 0.25)), 8.5),
                                         gridspec_kw={"height_ratios": [3, 2]})
    gpus = torch.arange(args.gpus).numpy()
    width = 0.42
    top.bar(gpus - width / 2, (before_gpu[layer] / mean[layer]).numpy(), width, label=before_label,
            color="#d9822b", alpha=0.85)
    top.bar(gpus + width / 2, (after_gpu[layer] / mean[layer]).numpy(), width, label="moe_ext plan",
            color="#2b6cb0", alpha=0.9)
    top.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="mean")
    if args.nodes > 1:
        for boundary in range(args.gpus // args.nodes, args.gpus, args.gpus // args.nodes):
            top.axvline(boundary - 0.5, color="grey", linewidth=0.6, alpha=0.6)
    top.set_xlabel("GPU" + (" (grey lines: node boundaries)" if args.nodes > 1 else ""))
    top.set_ylabel("load / mean GPU load")
    top.set_title(f"Layer {layer}: per-GPU load, max/mean {before_imb[layer]:.3f} -> {after_imb[layer]:.3f}")
    top.legend(loc="upper right")
    top.set_xlim(-1, args.gpus)

    layers = range(loads.shape[0])
    bottom.plot(layers, before_imb, marker="o", markersize=3, color="#d9822b", label=before_label)
    bottom.plot(layers, after_imb, marker="o", markersize=3, color="#2b6cb0", label="moe_ext plan")
    bottom.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    bottom.set_xlabel("layer")
    bottom.set_ylabel("max / mean GPU load")
    bottom.set_title(f"Imbalance per layer: mean {before_imb.mean():.3f} -> {after_imb.mean():.3f}, "
                     f"worst {before_imb.max():.3f} -> {after_imb.max():.3f}")
    bottom.legend(loc="upper right")
    figure.suptitle(f"EPLB placement: {args.replicas} slots on {args.gpus} GPUs, {args.nodes} nodes, "
                    f"{args.groups} groups")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from moe_ext.eplb import placement_imbalance, plan_placement

    try:
        loads = read_loads(args.loads)
        current = read_current(args.current) if args.current is not None else None
        layers, experts = loads.shape
        started = time.perf_counter()
        plan = plan_placement(loads, args.replicas, args.groups, args.nodes, args.gpus, current=current,
                              max_moves=args.max_moves, tolerance=args.tolerance,
                              allow_cross_node=args.allow_cross_node, num_threads=args.threads)
        seconds = time.perf_counter() - started
        if current is not None:
            before, before_label = current.to(torch.int64), "current placement"
        else:  # the layout an engine starts from: slot p holds expert p mod experts
            before = (torch.arange(args.replicas) % experts).repeat(layers, 1)
            before_label = "default layout (slot p -> expert p mod experts)"
        before_imbalance = placement_imbalance(loads, before, args.gpus)
        public_imbalance = None
        if args.compare_public:
            from moe_ext.eplb.public_reference import public_rebalance_experts

            started_public = time.perf_counter()
            public_phy2log, _, _ = public_rebalance_experts(loads, args.replicas, args.groups, args.nodes, args.gpus)
            public_seconds = time.perf_counter() - started_public
            public_imbalance = placement_imbalance(loads, public_phy2log, args.gpus)
    except ValueError as error:
        print(f"moe-ext eplb: error: {error}", file=sys.stderr)
        return 2

    mode = "hierarchical" if plan.hierarchical else "global"
    print(f"{layers} layers x {experts} experts -> {args.replicas} slots on {args.gpus} GPUs, "
          f"{args.nodes} nodes, {args.groups} groups ({mode} mode)")
    header = f"{'layer':>5} {'before':>8} {'after':>8} {'bound':>8} {'moves':>6}"
    if public_imbalance is not None:
        header += f" {'public':>8}"
    header += "  notes"
    print(header)
    for layer in range(layers):
        line = (f"{layer:>5} {float(before_imbalance[layer]):8.3f} {float(plan.imbalance[layer]):8.3f} "
                f"{float(plan.lower_bound[layer]):8.3f} {int(plan.moves[layer]):6d}")
        if public_imbalance is not None:
            line += f" {float(public_imbalance[layer]):8.3f}"
        notes = []
        if bool(plan.hierarchy_relaxed[layer]):
            notes.append(f"{int(plan.cross_node_replicas[layer])} replicas outside their node")
        if int(plan.same_gpu_duplicates[layer]):
            notes.append(f"{int(plan.same_gpu_duplicates[layer])} twins on a GPU")
        print(line + ("  " + "; ".join(notes) if notes else ""))
    summary = plan.summary()
    print(f"imbalance before: mean {float(before_imbalance.mean()):.3f} worst {float(before_imbalance.max()):.3f}")
    print(f"imbalance after:  mean {summary['imbalance_mean']:.3f} worst {summary['imbalance_worst']:.3f} "
          f"(lower bound worst {summary['lower_bound_worst']:.3f})")
    if public_imbalance is not None:
        print(f"public algorithm: mean {float(public_imbalance.mean()):.3f} worst {float(public_imbalance.max()):.3f}"
              f" in {public_seconds * 1e3:.1f} ms")
    if current is not None:
        print(f"moves: {summary['moves']} of {layers * args.replicas} slots "
              f"({100.0 * summary['moves'] / (layers * args.replicas):.1f}%)")
    if summary["relaxed_layers"]:
        print(f"hierarchy relaxed in {summary['relaxed_layers']} layers "
              f"({summary['cross_node_replicas']} replicas outside their node)")
    print(f"plan time: {seconds * 1e3:.1f} ms")

    if args.output is not None:
        torch.save({"phy2log": plan.phy2log, "log2phy": plan.log2phy, "logcnt": plan.logcnt,
                    "imbalance": plan.imbalance, "lower_bound": plan.lower_bound, "moves": plan.moves,
                    "hierarchy_relaxed": plan.hierarchy_relaxed, "cross_node_replicas": plan.cross_node_replicas,
                    "num_replicas": args.replicas, "num_gpus": args.gpus, "num_nodes": args.nodes,
                    "num_groups": args.groups}, args.output)
        print(f"placement written to {args.output}")
    if args.plot is not None:
        if args.plot_layer is not None and not 0 <= args.plot_layer < layers:
            print(f"moe-ext eplb: error: --plot-layer must be in [0, {layers}), got {args.plot_layer}", file=sys.stderr)
            return 2
        layer = args.plot_layer if args.plot_layer is not None else int(before_imbalance.argmax())
        try:
            draw(args.plot, loads, before, plan.phy2log, args, layer, before_label)
        except ValueError as error:
            print(f"moe-ext eplb: error: {error}", file=sys.stderr)
            return 2
        print(f"plot written to {args.plot}")
    return 0
