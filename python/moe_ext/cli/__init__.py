"""The `moe-ext` command line.

Each subcommand is a module ``moe_ext.cli.<name>`` with a ``register(subparsers)``
function that adds its parser and sets ``func=run``; ``run(args)`` returns the
exit code. Modules are imported when the command line is built, so a command's
heavy imports belong inside its ``run``. ``moe-ext`` alone prints the help;
``moe-ext --version`` prints the version.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

COMMANDS = ["info", "eplb", "demo"]


def version() -> str:
    """moe_ext's version: the installed distribution's, else the source tree's (a developer build)."""
    from importlib import metadata

    try:
        return metadata.version("moe_ext")
    except metadata.PackageNotFoundError:
        import moe_ext

        return moe_ext.__version__


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (metadata look-up)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print moe_ext's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"moe-ext {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-ext", allow_abbrev=False, description="moe_ext: mixture-of-experts expert-parallel toolkit",
        epilog="`moe-ext COMMAND --help` explains a command.")
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moe_ext.cli.{name}").register(subparsers)
    parser._moe_ext_commands = dict(subparsers.choices)  # name -> that command's parser, for its usage
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # report it with the command's own usage, not the top-level one
        command_parser = parser._moe_ext_commands.get(args.command, parser)
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:  # bare `moe-ext`: the help, not an error
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`moe-ext eplb ... | head`): stop quietly, like other
        # command-line tools, instead of a traceback. stdout is pointed at devnull so
        # the interpreter's final flush cannot raise again (the Python docs' recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
