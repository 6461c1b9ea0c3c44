"""The `moe-ext` command line.

Each subcommand is a module ``moe_ext.cli.<name>`` with a ``register(subparsers)``
function that adds its parser and sets ``func=run``; ``run(args)`` returns the
exit code. Modules are imported when the command line is built, so a command's
heavy imports belong inside its ``run``.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Sequence

COMMANDS = ["info", "eplb"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-ext", description="moe_ext: mixture-of-experts expert-parallel toolkit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"moe_ext.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
