"""Run CUDA code that must stop with a device-side assert, in its own process.

A device-side assert poisons the CUDA context of the process it fires in, so
each case runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def assert_stops_with_device_assert(expression: str, message: str) -> subprocess.CompletedProcess:
    """Evaluate ``expression`` (moe_ext and torch imported), synchronise, and
    check the process failed with ``message`` in its output."""
    script = textwrap.dedent(f"""
        import torch, moe_ext
        out = {expression}
        torch.cuda.synchronize()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ))
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    return result
