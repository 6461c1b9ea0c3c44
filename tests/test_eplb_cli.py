"""`moe-ext eplb`: reads .pt/.npy loads, plans, writes a placement that round-trips as --current, plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_ext.cli import main


def test_plan_write_replan_and_plot(tmp_path, capsys):
    loads = np.random.default_rng(0).integers(0, 100, size=(5, 4, 16))  # [steps, layers, experts]
    np.save(tmp_path / "loads.npy", loads)
    placement = tmp_path / "placement.pt"
    assert main(["eplb", str(tmp_path / "loads.npy"), "--replicas", "24", "--gpus", "8", "--nodes", "2",
                 "--groups", "4", "--output", str(placement), "--compare-public"]) == 0
    out = capsys.readouterr().out
    assert "imbalance after" in out and "public algorithm" in out and "plan time" in out
    saved = torch.load(placement, weights_only=True)
    assert saved["phy2log"].shape == (4, 24) and saved["log2phy"].shape == (4, 16, 9)
    torch.save({"load": torch.tensor(loads.sum(0) * 1.1)}, tmp_path / "drifted.pt")
    pytest.importorskip("matplotlib")
    assert main(["eplb", str(tmp_path / "drifted.pt"), "--replicas", "24", "--gpus", "8", "--nodes", "2",
                 "--groups", "4", "--current", str(placement), "--max-moves", "2",
                 "--plot", str(tmp_path / "plot.png")]) == 0
    out = capsys.readouterr().out
    assert "moves:" in out
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_reported_not_raised(tmp_path, capsys):
    np.save(tmp_path / "loads.npy", np.ones((2, 16)))
    assert main(["eplb", str(tmp_path / "loads.npy"), "--replicas", "18", "--gpus", "4"]) == 2
    assert "num_replicas" in capsys.readouterr().err
    assert main(["eplb", str(tmp_path / "missing.npy"), "--replicas", "16", "--gpus", "4"]) == 2
    assert "no such file" in capsys.readouterr().err
