"""`moe-ext demo`: run an expert-parallel MoE end to end on local ranks and report what happened.

    moe-ext demo                       # 4 ranks on CPU (gloo), or one GPU per rank (NCCL) when there are enough
    moe-ext demo --ranks 2 --device cuda --json run.json --plot run.png
    torchrun --nproc-per-node 8 -m moe_ext demo --preset deepseek-v3     # the launcher's ranks and group

Exit codes: 0 done, correct, and the rebalance showed (slots moved and the
measured imbalance fell); 1 the run failed (a rank died or hung, or the output
diverged from the dense reference); 2 impossible arguments (nothing spawned);
3 correct but no rebalance to show (none ran, nothing moved, or the imbalance
did not fall: the message says which and what to change).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from moe_ext.demo.config import COMM_METHOD_CHOICES, DEVICE_CHOICES, PRESETS, DemoConfig

_DEFAULTS = DemoConfig()
_HIDDEN_HOOKS = ("kill", "corrupt", "stall", "stop")


def _default(name: str) -> str:
    return f" (default: {getattr(_DEFAULTS, name)})"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run an expert-parallel MoE end to end on local ranks or under torchrun (routing, dispatch, "
                     "experts, combine, load recording, rebalancing, weight movement) and report it",
        description="Run a DeepSeek-like MoE layer expert-parallel over a stream of batches with skewed routing; "
                    "check every step against a dense single-process reference; record expert loads; every "
                    "--rebalance-interval steps plan a new placement with the EPLB planner (bounded moves) and move "
                    "the expert weights; print the imbalance before/after, what moved, the error against the "
                    "reference and the throughput. By default it spawns --ranks local processes; started by "
                    "torchrun (or any launcher that sets RANK, WORLD_SIZE and MASTER_ADDR) every process runs one "
                    "rank in the launcher's process group, single or multi node. Exit 0: correct and a rebalance shown; 1: a rank failed "
                    "or the output diverged; 2: impossible arguments; 3: correct, but the run showed no rebalance "
                    "(none ran, no slot moved, or the measured imbalance did not fall).")
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default=None,
        help="a named set of sizes; options given explicitly still win. deepseek-v3: 256 experts of hidden 7168 "
             "and intermediate 2048 (DeepSeek-V3's routed experts), 32 redundant, top-8 of 8 groups keeping 4 -- "
             "about 50-70 GiB per rank, for one GPU / NPU per rank")
    add("--ranks", type=int, default=None,
        help="expert-parallel ranks (default: 4 local processes; under torchrun its WORLD_SIZE)")
    add("--experts", type=int, default=None, help="logical (routed) experts" + _default("experts"))
    add("--redundant-experts", type=int, default=None,
        help="extra physical slots for replicas of hot experts; experts + redundant must divide by ranks "
             "(default: 4, or the next count that does)")
    add("--top-k", type=int, default=None, help="experts per token" + _default("top_k"))
    add("--hidden-size", type=int, default=None, help="model hidden size" + _default("hidden_size"))
    add("--intermediate-size", type=int, default=None,
        help="expert MLP intermediate size" + _default("intermediate_size"))
    add("--expert-groups", type=int, default=None,
        help="DeepSeek grouped top-k: groups of experts, 1 = plain top-k" + _default("expert_groups"))
    add("--topk-group", type=int, default=None,
        help="groups a token may pick experts from" + _default("topk_group"))
    add("--tokens-per-rank", type=int, default=None,
        help="tokens per rank per step" + _default("tokens_per_rank"))
    add("--steps", type=int, default=None, help="batches (forward steps)" + _default("steps"))
    add("--rebalance-interval", type=int, default=None,
        help="plan and move experts every this many steps, from the loads recorded since the last time"
             + _default("rebalance_interval"))
    add("--max-moves", type=int, default=None,
        help="most slots whose expert may change per rebalance (default: a quarter of the slots)")
    add("--skew", type=float, default=None,
        help="Zipf exponent of the token topics: 0 = uniform routing, larger = a few hot experts" + _default("skew"))
    add("--comm-method", choices=COMM_METHOD_CHOICES, default=None,
        help="token dispatch/combine method; auto picks per step (mc2 runs its CPU emulation off Ascend)"
             + _default("comm_method"))
    add("--device", choices=DEVICE_CHOICES, default=None,
        help="auto: one NPU (HCCL) or GPU (NCCL) per rank when there are enough, else CPU (gloo)"
             + _default("device"))
    add("--seed", type=int, default=None, help="seed of the weights and the token stream" + _default("seed"))
    add("--tolerance", type=float, default=None,
        help="largest |EP output - dense reference| accepted (default: 1e-4; 1e-1 with --comm-method mc2, "
             "whose operators move bf16)")
    add("--timeout", type=float, default=None,
        help="seconds without a finished step (after start-up) before the run is stopped and the rank holding it "
             "up is named" + _default("timeout"))
    add("--startup-timeout", type=float, default=None,
        help="seconds for the ranks to start (spawn, import, process group, layer) before step 0"
             + _default("startup_timeout"))
    add("--json", type=Path, metavar="FILE", help="write the numbers as JSON to FILE")
    add("--plot", type=Path, metavar="FILE.png",
        help="draw imbalance over steps and per-rank load before/after (needs matplotlib)")
    # Test hooks (hidden): make a rank die, corrupt its weights, stall or SIGSTOP itself at a step.
    for hook in _HIDDEN_HOOKS:
        add(f"--{hook}-rank", type=int, default=None, help=argparse.SUPPRESS)
        add(f"--{hook}-step", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Defaults, then the preset's sizes, then every option given explicitly (the launcher sets --ranks' default)."""
    from moe_ext.demo.runner import launcher_environment

    values: dict = {}
    if getattr(args, "preset", None) is not None:
        values.update(PRESETS[args.preset])
    for name in DemoConfig.__dataclass_fields__:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if "ranks" not in values:
        layout = launcher_environment()
        if layout is not None:
            values["ranks"] = layout["world_size"]
    return DemoConfig(**values)


def _check_output(path: Path | None, option: str) -> None:
    if path is not None and not path.parent.exists():
        raise ValueError(f"{option}: the folder {str(path.parent)!r} does not exist")


def run(args: argparse.Namespace) -> int:
    from moe_ext.demo.plot import MISSING_MATPLOTLIB, write_plot
    from moe_ext.demo.report import EXIT_NO_REBALANCE, format_report, rebalance_shortfall
    from moe_ext.demo.runner import DemoFailure, run_demo

    try:
        config = config_from_args(args)
        config.validate()
        _check_output(args.json, "--json")
        _check_output(args.plot, "--plot")
        if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
            raise ValueError(MISSING_MATPLOTLIB)
        if config.steps <= config.rebalance_interval or config.max_moves == 0:
            # Known before spawning: say it now rather than only after the whole run.
            why = ("--max-moves 0" if config.max_moves == 0 else
                   f"--steps {config.steps} <= --rebalance-interval {config.rebalance_interval}")
            print(f"moe-ext demo: warning: this run cannot show a rebalance ({why}); it checks correctness only "
                  f"and will exit {EXIT_NO_REBALANCE}", file=sys.stderr)
        interactive = sys.stdout.isatty()
        result = run_demo(config, interactive=interactive)
    except (ValueError, TypeError) as error:
        print(f"moe-ext demo: error: {error}", file=sys.stderr)
        return 2
    except DemoFailure as error:
        sys.stdout.flush()
        print(f"\nmoe-ext demo: FAILED: {error}", file=sys.stderr)
        return 1
    if result.get("this_rank", 0) != 0:  # under a launcher, rank 0 reports
        return 0 if result["correct"] else 1
    shortfall = rebalance_shortfall(result)
    result["rebalance_shown"], result["rebalance_shortfall"] = shortfall is None, shortfall
    print()
    print(format_report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"JSON written to {args.json}")
    if args.plot is not None:
        write_plot(result, str(args.plot))
        print(f"plot written to {args.plot}")
    if not result["correct"]:
        return 1
    if shortfall is not None:
        sys.stdout.flush()
        print(f"\nmoe-ext demo: NO REBALANCE SHOWN (exit {EXIT_NO_REBALANCE}): every output was correct, but "
              f"{shortfall}", file=sys.stderr)
        return EXIT_NO_REBALANCE
    return 0
