"""docs/moe_layer.md's offline quick start runs as written and matches the Hugging Face block."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

DOC = Path(__file__).resolve().parents[1] / "docs" / "moe_layer.md"


def offline_quick_start() -> str:
    text = DOC.read_text()
    section = text[text.index("Runs offline as written"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/moe_layer.md: the offline quick start's code block is missing"
    return match.group(1)


def test_the_offline_quick_start_runs_and_matches_the_hf_block(tmp_path):
    script = tmp_path / "quick_start.py"
    script.write_text(offline_quick_start())
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    error = float(re.search(r"tensor\(([-0-9.e+]+)", done.stdout).group(1))
    assert error < 1e-5, done.stdout
