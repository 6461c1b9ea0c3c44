"""`moe-ext eplb`: plan expert placement from a recorded load file, report it, plot it, save it.

    moe-ext eplb loads.pt --replicas 288 --gpus 32 --nodes 4 --groups 8 \\
        [--current placement.pt] [--max-moves 16] [--window 8] --output placement.pt --plot placement.png

Load files (detected by suffix and content; docs/eplb.md has the details and an example):
  .npy                  [layers, experts] or [steps, layers, experts]
  .pt / .pth            a tensor as above, or a dict with "load" (moe_ext) or "logical_count"
                        (SGLang's expert-distribution recorder dump: [steps, layers, experts],
                        or [layers, experts] from its running-sum mode)
  .json                 {"logical_count": [[...], ...]} (SGLang's statistics / init_expert_location
                        file), or a bare nested list
Steps are summed, unless --window N groups them into windows of N steps and plans for that
history (the weighted mean of per-window imbalance; the worst window is reported).
The placement file is a torch.save dict with phy2log / log2phy / logcnt (the public contract)
and the plan's statistics; it can be passed back as --current next time (so can a .pt/.json
with SGLang's "physical_to_logical_map").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

LEGEND = """\
legend:
  before   imbalance (max GPU load / mean GPU load) of the placement in force: --current, else the
           default layout (slot p holds expert p mod experts)
  after    imbalance of the new plan (with --window: mean over windows; worst is the worst window)
  bound    no placement of the kind planned does better: with the hierarchy kept, the node-level
           bound (each node's load over its GPUs, the largest per-GPU share of one of its experts)
  relaxed  best imbalance found if replicas could leave their group's node (--allow-cross-node);
           '-' when relaxing would not help by more than 2%
  moves    slots whose expert changes (a weight transfer each); with --current only
  notes    'N twins': replicas sharing a GPU with another replica of their expert (only when the
           slot arithmetic forces it, or kept from --current); 'N outside node': replicas placed
           outside their group's node (only with --allow-cross-node)"""

# Python parameter names in library messages -> the flags a CLI user typed.
_FLAG_OF = [("num_replicas", "--replicas"), ("num_gpus", "--gpus"), ("num_nodes", "--nodes"),
            ("num_groups", "--groups"), ("max_moves", "--max-moves"), ("num_threads", "--threads"),
            ("tolerance", "--tolerance"), ("current", "--current"), ("weight", "LOADS")]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eplb", allow_abbrev=False, help="plan expert placement (EPLB) from a load file",
                                   description=__doc__, epilog=LEGEND,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loads", type=Path, metavar="LOADS",
                        help=".npy, .pt or .json: [layers, experts] or [steps, layers, experts] (see above)")
    parser.add_argument("--replicas", type=int, required=True, help="physical expert slots per layer")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) holding the slots")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--groups", type=int, default=1,
                        help="expert groups; hierarchical mode when groups %% nodes == 0 (default 1)")
    parser.add_argument("--current", type=Path,
                        help="placement in force (.pt from --output, a phy2log tensor, or SGLang's "
                             "physical_to_logical_map in .pt/.json)")
    parser.add_argument("--max-moves", type=int, help="most slots per layer that may change expert (needs --current)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="with --current: stop moving within this fraction of the from-scratch imbalance")
    parser.add_argument("--window", type=int,
                        help="plan for a history: group the file's steps into windows of this many steps")
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


class CliError(Exception):
    """A problem with the command line or its files: printed as `moe-ext eplb: error: ...`, exit 2."""


def _in_flags(message: str) -> str:
    for name, flag in _FLAG_OF:
        message = message.replace(name, flag)
    return message


def _check_readable_file(path: Path, flag: str) -> None:
    if not path.exists():
        raise CliError(f"{flag}: no such file: {path}")
    if path.is_dir():
        raise CliError(f"{flag}: {path} is a directory; give the file inside it")
    if not os.access(path, os.R_OK):
        raise CliError(f"{flag}: cannot read {path} (permission denied)")
    if path.stat().st_size == 0:
        raise CliError(f"{flag}: {path} is empty")


def _check_writable_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise CliError(f"{flag}: {path} is a directory; give a file name, e.g. {path / 'placement.pt'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"{flag}: folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CliError(f"{flag}: cannot write {path} (permission denied)")


def _load_any(path: Path, flag: str):
    """The object stored in a .npy / .pt / .pth / .json file; CliError on anything unreadable."""
    import numpy as np
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".pt", ".pth"):
            # weights_only: a load file is data; a pickle that runs code is refused.
            return torch.load(path, map_location="cpu", weights_only=True)
        if suffix == ".json":
            return json.loads(path.read_text())
    except Exception as error:  # noqa: BLE001 - any decoding failure is a bad file for the user
        kind = type(error).__name__
        raise CliError(f"{flag}: cannot read {path} as a {suffix} file ({kind}: {str(error)[:200]}); "
                       f"is it complete and written by numpy.save / torch.save / a JSON writer?") from None
    raise CliError(f"{flag}: expected a .npy, .pt, .pth or .json file, got {path}")


def _as_tensor(value, path: Path, flag: str, what: str):
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biufc":
            raise CliError(f"{flag}: {path} holds an array of dtype {value.dtype}, expected numbers")
        tensor = torch.from_numpy(value)
    elif isinstance(value, (list, tuple)):
        try:
            tensor = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise CliError(f"{flag}: {path}: {what} must be a rectangular nested list of numbers ({error})") from None
    else:
        raise CliError(f"{flag}: {path} must hold {what}, got {type(value).__name__}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise CliError(f"{flag}: {path} holds {tensor.dtype} values; {what} must be real numbers "
                       f"(integer counts or floats)")
    if tensor.numel() == 0:
        raise CliError(f"{flag}: {path} holds an empty {what} (shape {list(tensor.shape)})")
    return tensor


def read_loads(path: Path, flag: str = "LOADS"):
    """[steps, layers, experts] float64 (steps = 1 for a [layers, experts] file)."""
    import torch

    _check_readable_file(path, flag)
    value = _load_any(path, flag)
    if isinstance(value, dict):
        key = next((k for k in ("load", "logical_count") if k in value), None)
        if key is None:
            raise CliError(f"{flag}: {path} holds a dict without a 'load' or 'logical_count' entry "
                           f"(keys: {sorted(map(str, value))[:10]})")
        value = value[key]
    loads = _as_tensor(value, path, flag, "loads")
    if loads.dim() == 2:
        loads = loads.unsqueeze(0)
    if loads.dim() != 3:
        raise CliError(f"{flag}: expected [layers, experts] or [steps, layers, experts], got shape "
                       f"{list(loads.shape)}")
    loads = loads.to(torch.float64)
    if not torch.isfinite(loads).all() or (loads < 0).any():
        raise CliError(f"{flag}: {path} holds negative, NaN or infinite loads; loads are counts >= 0")
    return loads


def read_current(path: Path):
    import torch

    _check_readable_file(path, "--current")
    value = _load_any(path, "--current")
    if isinstance(value, dict):
        key = next((k for k in ("phy2log", "physical_to_logical_map") if k in value), None)
        if key is None:
            raise CliError(f"--current: {path} holds a dict without 'phy2log' (moe-ext eplb --output) or "
                           f"'physical_to_logical_map' (SGLang)")
        value = value[key]
    current = _as_tensor(value, path, "--current", "a phy2log [layers, slots] map")
    if current.dtype.is_floating_point:
        raise CliError(f"--current: {path} holds {current.dtype} values; expert ids must be integers")
    return current.to(torch.int64)


def gpu_loads(loads, phy2log, num_gpus: int):
    """[layers, gpus] load per GPU of a placement (load / replicas summed per GPU)."""
    import torch

    counts = torch.zeros_like(loads).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=loads.dtype))
    per_slot = (loads / counts.clamp_min(1)).gather(1, phy2log)
    return per_slot.view(loads.shape[0], num_gpus, -1).sum(-1)


def _suggest_multiples(value: int, step: int, minimum: int) -> str:
    """The multiples of step nearest value (below and above) that are >= minimum: '288 or 320'."""
    low = step * (value // step)
    if low < minimum:
        low = step * math.ceil(minimum / step)
    high = low + step if low <= value else low
    options = sorted({low, high})
    return " or ".join(str(x) for x in options)


def check_arguments(args, layers: int, experts: int) -> None:
    """Everything the planner would refuse, in the user's terms, before any work."""
    for flag, value, minimum in (("--replicas", args.replicas, 1), ("--gpus", args.gpus, 1),
                                 ("--nodes", args.nodes, 1), ("--groups", args.groups, 1),
                                 ("--threads", args.threads, 0)):
        if value < minimum:
            raise CliError(f"{flag} must be >= {minimum}, got {value}")
    if args.replicas < experts:
        raise CliError(f"--replicas must be >= the {experts} experts of LOADS (one slot each), got "
                       f"{args.replicas}; try {_suggest_multiples(experts, args.gpus, experts)}")
    if args.replicas % args.gpus:
        raise CliError(f"--replicas must be a multiple of --gpus ({args.gpus}), got {args.replicas}: "
                       f"try {_suggest_multiples(args.replicas, args.gpus, experts)}")
    if args.groups % args.nodes == 0:  # hierarchical
        if args.gpus % args.nodes:
            raise CliError(f"--gpus ({args.gpus}) must be a multiple of --nodes ({args.nodes}) in hierarchical "
                           f"mode (--groups % --nodes == 0); or pick --groups not divisible by --nodes for "
                           f"global mode")
        if experts % args.groups:
            raise CliError(f"--groups ({args.groups}) must divide the {experts} experts of LOADS in hierarchical "
                           f"mode")
    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        raise CliError(f"--tolerance must be finite and >= 0, got {args.tolerance}")
    if args.max_moves is not None:
        if args.max_moves < 0:
            raise CliError(f"--max-moves must be >= 0, got {args.max_moves}")
        if args.current is None:
            raise CliError("--max-moves needs --current (the placement the moves are counted from)")
    if args.window is not None and args.window < 1:
        raise CliError(f"--window must be >= 1 step, got {args.window}")
    if args.plot_layer is not None and not 0 <= args.plot_layer < layers:
        raise CliError(f"--plot-layer must be in [0, {layers}), got {args.plot_layer}")


def history_windows(steps, window: int):
    """[steps, L, E] -> [windows, L, E]: windows of `window` steps, from the last step back.

    All-zero steps (an engine's unfilled ring-buffer slots) are dropped first; a first window
    shorter than `window` is kept only when it is the only one.
    """
    import torch

    nonzero = steps.flatten(1).sum(1) > 0
    steps = steps[nonzero] if bool(nonzero.any()) else steps[-1:]
    count = steps.shape[0]
    full = count // window
    if full == 0:
        return steps.sum(0, keepdim=True)
    usable = steps[count - full * window:]
    return usable.view(full, window, *steps.shape[1:]).sum(1)


def draw(path: Path, loads, before, after, args, layer: int, before_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    if args.nodes > 1 and args.groups % args.nodes == 0:
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


def _prepare(args):
    """Read and check everything (files, flags, output paths) before planning."""
    import torch

    steps = read_loads(args.loads)
    layers, experts = steps.shape[1], steps.shape[2]
    check_arguments(args, layers, experts)
    current = None
    if args.current is not None:
        current = read_current(args.current)
        if tuple(current.shape) != (layers, args.replicas):
            raise CliError(f"--current: {args.current} holds a map of shape {list(current.shape)}, expected "
                           f"[{layers}, {args.replicas}] (LOADS' layers, --replicas)")
        if int(current.min()) < 0 or int(current.max()) >= experts:
            raise CliError(f"--current: {args.current} holds expert ids outside [0, {experts}) "
                           f"(LOADS has {experts} experts)")
    if args.output is not None:
        _check_writable_file(args.output, "--output")
    if args.plot is not None:
        _check_writable_file(args.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install matplotlib (or moe_ext[plot])") from None
    if args.window is not None:
        history = history_windows(steps, args.window)
    else:
        history = None
    return steps.sum(0), history, current, layers, experts, torch


def run(args: argparse.Namespace) -> int:
    import time

    from moe_ext.eplb import placement_imbalance, plan_placement

    try:
        loads, history, current, layers, experts, torch = _prepare(args)
        started = time.perf_counter()
        plan = plan_placement(history if history is not None else loads, args.replicas, args.groups, args.nodes,
                              args.gpus, current=current, max_moves=args.max_moves, tolerance=args.tolerance,
                              allow_cross_node=args.allow_cross_node, num_threads=args.threads)
        seconds = time.perf_counter() - started
        if current is not None:
            before, before_label = current, "current placement"
        else:  # the layout an engine starts from: slot p holds expert p mod experts
            before = (torch.arange(args.replicas) % experts).repeat(layers, 1)
            before_label = "default layout (slot p -> expert p mod experts)"
        if history is not None:
            windows_before = torch.stack([placement_imbalance(w, before, args.gpus) for w in history])
            before_imbalance = windows_before.mean(0)
        else:
            before_imbalance = placement_imbalance(loads, before, args.gpus)
        public_imbalance = None
        if args.compare_public:
            from moe_ext.eplb.public_reference import public_rebalance_experts

            started_public = time.perf_counter()
            public_phy2log, _, _ = public_rebalance_experts(loads, args.replicas, args.groups, args.nodes, args.gpus)
            public_seconds = time.perf_counter() - started_public
            if history is not None:
                public_imbalance = torch.stack([placement_imbalance(w, public_phy2log, args.gpus)
                                                for w in history]).mean(0)
            else:
                public_imbalance = placement_imbalance(loads, public_phy2log, args.gpus)
    except CliError as error:
        print(f"moe-ext eplb: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as error:  # the library's checks, in the user's terms
        print(f"moe-ext eplb: error: {_in_flags(str(error))}", file=sys.stderr)
        return 2

    _report(args, plan, layers, experts, before_imbalance, public_imbalance,
            public_seconds if public_imbalance is not None else None, seconds, current, history)

    if args.output is not None:
        try:
            torch.save({"phy2log": plan.phy2log, "log2phy": plan.log2phy, "logcnt": plan.logcnt,
                        "imbalance": plan.imbalance, "lower_bound": plan.lower_bound,
                        "global_lower_bound": plan.global_lower_bound, "relaxed_imbalance": plan.relaxed_imbalance,
                        "moves": plan.moves, "hierarchy_relaxed": plan.hierarchy_relaxed,
                        "cross_node_replicas": plan.cross_node_replicas,
                        "same_gpu_duplicates": plan.same_gpu_duplicates,
                        "num_replicas": args.replicas, "num_gpus": args.gpus, "num_nodes": args.nodes,
                        "num_groups": args.groups}, args.output)
        except OSError as error:
            print(f"moe-ext eplb: error: --output: cannot write {args.output}: {error}", file=sys.stderr)
            return 2
        print(f"placement written to {args.output}")
    if args.plot is not None:
        layer = args.plot_layer if args.plot_layer is not None else int(before_imbalance.argmax())
        try:
            draw(args.plot, loads, before, plan.phy2log, args, layer,
                 before_label if current is not None else "default layout")
        except OSError as error:
            print(f"moe-ext eplb: error: --plot: cannot write {args.plot}: {error}", file=sys.stderr)
            return 2
        print(f"plot written to {args.plot}")
    return 0


def _report(args, plan, layers, experts, before_imbalance, public_imbalance, public_seconds, seconds,
            current, history) -> None:
    mode = "hierarchical" if plan.hierarchical else "global"
    kept = ", hierarchy kept" if plan.hierarchical and not args.allow_cross_node else ""
    print(f"{layers} layers x {experts} experts -> {args.replicas} slots on {args.gpus} GPUs, "
          f"{args.nodes} nodes, {args.groups} groups ({mode} mode{kept})")
    if not plan.hierarchical and args.nodes > 1:
        # The public contract: node-limited (hierarchical) placement needs groups % nodes == 0; otherwise
        # the node count plays no part. Say so, instead of leaving a user to wonder where --nodes went.
        print(f"note: --groups ({args.groups}) is not a multiple of --nodes ({args.nodes}), so replicas are "
              f"placed over all {args.gpus} GPUs and --nodes is not used (as in DeepSeek's rebalance_experts); "
              f"for node-limited placement pick --groups divisible by --nodes")
    if history is not None:
        print(f"planned for a history of {history.shape[0]} windows of {args.window} steps (--window)")
    from moe_ext.cli.table import format_table

    headers = ["layer", "before", "after", "bound", "relaxed", "moves"]
    if history is not None:
        headers.append("worst")
    if public_imbalance is not None:
        headers.append("public")
    headers.append("notes")
    gain = plan.relax_gain
    rows = []
    for layer in range(layers):
        row = [str(layer), f"{float(before_imbalance[layer]):.3f}", f"{float(plan.imbalance[layer]):.3f}",
               f"{float(plan.lower_bound[layer]):.3f}",
               f"{float(plan.relaxed_imbalance[layer]):.3f}" if float(gain[layer]) > 0.02 else "-",
               str(int(plan.moves[layer])) if current is not None else "-"]
        if history is not None:
            row.append(f"{float(plan.worst_window_imbalance[layer]):.3f}")
        if public_imbalance is not None:
            row.append(f"{float(public_imbalance[layer]):.3f}")
        notes = []
        if float(gain[layer]) > 0.02:
            notes.append(f"relaxing would lower it {100 * float(gain[layer]):.1f}%")
        if bool(plan.hierarchy_relaxed[layer]):
            notes.append(f"{int(plan.cross_node_replicas[layer])} outside node")
        if int(plan.same_gpu_duplicates[layer]):
            notes.append(f"{int(plan.same_gpu_duplicates[layer])} twins")
        row.append("; ".join(notes))
        rows.append(row)
    print(format_table(headers, rows))
    summary = plan.summary()
    print(f"imbalance before: mean {float(before_imbalance.mean()):.3f} worst {float(before_imbalance.max()):.3f}")
    print(f"imbalance after:  mean {summary['imbalance_mean']:.3f} worst {summary['imbalance_worst']:.3f} "
          f"(bound worst {summary['lower_bound_worst']:.3f})")
    if history is not None:
        print(f"worst single window after: {summary['worst_window_imbalance']:.3f}")
    if public_imbalance is not None:
        print(f"public algorithm: mean {float(public_imbalance.mean()):.3f} worst {float(public_imbalance.max()):.3f}"
              f" in {public_seconds * 1e3:.1f} ms")
    if current is not None:
        print(f"moves: {summary['moves']} of {layers * args.replicas} slots "
              f"({100.0 * summary['moves'] / (layers * args.replicas):.1f}%)")
    helped = int((plan.relax_gain > 0.02).sum())
    if helped and not args.allow_cross_node:
        print(f"relaxing the hierarchy would lower the imbalance by more than 2% in {helped} layers "
              f"(by up to {100 * summary['relax_gain_worst']:.1f}%): --allow-cross-node does it, at the cost "
              f"of replicas outside their group's node")
    if summary["relaxed_layers"]:
        print(f"hierarchy relaxed in {summary['relaxed_layers']} layers "
              f"({summary['cross_node_replicas']} replicas outside their node)")
    if summary["twins"]:
        print(f"{summary['twins']} replicas share a GPU with a twin (forced by the slot arithmetic or kept "
              f"from --current)")
    print(f"plan time: {seconds * 1e3:.1f} ms")
    print(LEGEND)
