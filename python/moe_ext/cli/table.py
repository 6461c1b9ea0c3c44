"""Text tables for the command line: rich's when it is installed, a plain fallback otherwise.

rich (``pip install rich``, or the ``demo`` extra) is optional. Tables are
rendered to plain text either way, without colour codes, so the output reads
the same in a terminal, a log file or a test's captured stdout.
"""

from __future__ import annotations

import importlib.util
import io
from typing import Sequence

__all__ = ["format_table", "have_rich"]


def have_rich() -> bool:
    """Whether the optional terminal library (rich) is importable."""
    return importlib.util.find_spec("rich") is not None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, use_rich: bool | None = None) -> str:
    """``rows`` of strings under ``headers``, columns right-aligned; a string without a trailing newline."""
    if use_rich is None:
        use_rich = have_rich()
    if use_rich:
        from rich import box
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="")
        for column in table.columns:
            column.justify = "right"
            column.no_wrap = True
        for row in rows:
            table.add_row(*row)
        buffer = io.StringIO()
        Console(file=buffer, width=1000, color_system=None, force_terminal=False, highlight=False).print(table)
        return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines() if line.strip())
    widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
