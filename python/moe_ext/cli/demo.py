"""`moe-ext demo`: run an expert-parallel MoE end to end on local ranks and report what happened.

    moe-ext demo                       # 4 ranks on CPU (gloo), or one GPU per rank (NCCL) when there are enough
    moe-ext demo --ranks 2 --device cuda --json run.json --plot run.png

Exit codes: 0 done and correct; 1 the run failed (a rank died or hung, or the
output diverged from the dense reference); 2 impossible arguments (nothing spawned).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from moe_ext.demo.config import COMM_METHOD_CHOICES, DEVICE_CHOICES, DemoConfig

_DEFAULTS = DemoConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run an expert-parallel MoE end to end on local ranks (routing, dispatch, experts, combine, "
                     "load recording, rebalancing, weight movement) and report it",
        description="Spawn local ranks that run a small DeepSeek-like MoE layer over a stream of batches with "
                    "skewed routing; check every step against a dense single-process reference; record expert "
                    "loads; every --rebalance-interval steps plan a new placement with the EPLB planner (bounded "
                    "moves) and move the expert weights; print the imbalance before/after, what moved, the "
                    "error against the reference and tokens/s per rank. Exit 0: correct; 1: a rank failed or "
                    "the output diverged; 2: impossible arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--ranks", type=int, default=_DEFAULTS.ranks, help="local processes (expert-parallel ranks)")
    add("--experts", type=int, default=_DEFAULTS.experts, help="logical (routed) experts")
    add("--redundant-experts", type=int, default=None,
        help="extra physical slots for replicas of hot experts; experts + redundant must divide by ranks "
             "(default: 4, or the next count that does)")
    add("--top-k", type=int, default=_DEFAULTS.top_k, help="experts per token")
    add("--hidden-size", type=int, default=_DEFAULTS.hidden_size, help="model hidden size")
    add("--intermediate-size", type=int, default=_DEFAULTS.intermediate_size, help="expert MLP intermediate size")
    add("--expert-groups", type=int, default=_DEFAULTS.expert_groups,
        help="DeepSeek grouped top-k: groups of experts (1 = plain top-k)")
    add("--topk-group", type=int, default=_DEFAULTS.topk_group, help="groups a token may pick experts from")
    add("--tokens-per-rank", type=int, default=_DEFAULTS.tokens_per_rank, help="tokens per rank per step")
    add("--steps", type=int, default=_DEFAULTS.steps, help="batches (forward steps)")
    add("--rebalance-interval", type=int, default=_DEFAULTS.rebalance_interval,
        help="plan and move experts every this many steps, from the loads recorded since the last time")
    add("--max-moves", type=int, default=None,
        help="most slots whose expert may change per rebalance (default: a quarter of the slots)")
    add("--skew", type=float, default=_DEFAULTS.skew,
        help="Zipf exponent of the token topics: 0 = uniform routing, larger = a few hot experts")
    add("--comm-method", choices=COMM_METHOD_CHOICES, default=_DEFAULTS.comm_method,
        help="token dispatch/combine method; auto picks per step (mc2 runs its CPU emulation off Ascend)")
    add("--device", choices=DEVICE_CHOICES, default=_DEFAULTS.device,
        help="auto: one NPU (HCCL) or GPU (NCCL) per rank when there are enough, else CPU (gloo)")
    add("--seed", type=int, default=_DEFAULTS.seed, help="seed of the weights and the token stream")
    add("--tolerance", type=float, default=None,
        help="largest |EP output - dense reference| accepted (default 1e-4; 1e-1 with --comm-method mc2, "
             "whose operators move bf16)")
    add("--timeout", type=float, default=_DEFAULTS.timeout,
        help="seconds before a hung run is stopped (every rank's collectives time out too)")
    add("--json", type=Path, metavar="FILE", help="write the numbers as JSON to FILE")
    add("--plot", type=Path, metavar="FILE.png",
        help="draw imbalance over steps and per-rank load before/after (needs matplotlib)")
    # Test hooks (hidden): make a rank die, or corrupt its weights, at a step.
    for hook in ("kill", "corrupt"):
        add(f"--{hook}-rank", type=int, default=None, help=argparse.SUPPRESS)
        add(f"--{hook}-step", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    names = [field for field in DemoConfig.__dataclass_fields__]
    return DemoConfig(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def _check_output(path: Path | None, option: str) -> None:
    if path is not None and not path.parent.exists():
        raise ValueError(f"{option}: the folder {str(path.parent)!r} does not exist")


def run(args: argparse.Namespace) -> int:
    from moe_ext.demo.plot import MISSING_MATPLOTLIB, write_plot
    from moe_ext.demo.report import format_report
    from moe_ext.demo.runner import DemoFailure, run_demo

    config = config_from_args(args)
    try:
        config.validate()
        _check_output(args.json, "--json")
        _check_output(args.plot, "--plot")
        if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
            raise ValueError(MISSING_MATPLOTLIB)
        interactive = sys.stdout.isatty()
        result = run_demo(config, interactive=interactive)
    except ValueError as error:
        print(f"moe-ext demo: error: {error}", file=sys.stderr)
        return 2
    except DemoFailure as error:
        sys.stdout.flush()
        print(f"\nmoe-ext demo: FAILED: {error}", file=sys.stderr)
        return 1
    print()
    print(format_report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"JSON written to {args.json}")
    if args.plot is not None:
        write_plot(result, str(args.plot))
        print(f"plot written to {args.plot}")
    return 0 if result["correct"] else 1
