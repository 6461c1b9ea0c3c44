"""`moe-ext demo` end to end on CPU ranks (gloo): the JSON it writes, its failures and its exit codes.

Each run spawns its ranks (~3 s of startup each), so the file runs few, small demos.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import time

import pytest
import torch

from moe_ext.cli import main

# On a machine with GPUs the CUDA refusal is replaced by another impossible argument.
_CUDA_CASE = ((["--ranks", "2", "--device", "cuda"], "--device cuda needs one GPU per rank")
              if torch.cuda.device_count() < 2 else (["--ranks", "0"], "--ranks must be an integer >= 1"))

SMALL = ["--experts", "8", "--redundant-experts", "2", "--top-k", "2", "--hidden-size", "32",
         "--intermediate-size", "32", "--tokens-per-rank", "64"]


def _run_demo(tmp_path, *args: str) -> tuple[int, dict]:
    report = tmp_path / "demo.json"
    code = main(["demo", *args, "--json", str(report)])
    return code, json.loads(report.read_text()) if report.exists() else {}


def _check_report(report: dict, ranks: int, steps: int, interval: int) -> None:
    config = report["config"]
    assert report["correct"] is True
    assert 0 <= report["max_error"] <= config["tolerance"]
    assert len(report["imbalance_per_step"]) == steps
    assert len(report["max_error_per_step"]) == steps
    assert len(report["tokens_per_second_per_rank"]) == ranks
    assert all(value > 0 for value in report["tokens_per_second_per_rank"])
    # Every step routes every token's top-k choices to some rank.
    for loads in report["rank_load_per_step"]:
        assert len(loads) == ranks
        assert sum(loads) == ranks * config["tokens_per_rank"] * config["top_k"]
    rebalances = report["rebalances"]
    assert [event["step"] for event in rebalances] == list(range(interval, steps, interval))
    first = rebalances[0]
    assert first["imbalance_after"] < first["imbalance_before"]
    for event in rebalances:
        assert event["imbalance_after"] <= event["imbalance_before"] + 1e-9
        assert event["imbalance_after"] >= event["lower_bound"] - 1e-9
        assert 0 <= event["slots_moved"] <= event["max_moves"]
        assert event["max_moves"] == (config["max_moves"] if config["max_moves"] is not None
                                      else max(1, (config["experts"] + config["redundant_experts"]) // 4))
        assert 0 <= event["rows_moved"] <= event["slots_moved"]
        assert event["bytes_moved"] == event["rows_moved"] * 3 * config["hidden_size"] * config["intermediate_size"] * 4
    # The final placement holds every expert, with the configured slot count.
    placement = report["final_placement"]
    assert len(placement) == config["experts"] + config["redundant_experts"]
    assert sorted(set(placement)) == list(range(config["experts"]))
    assert all(source.startswith("moe_ext.") for source in report["pieces"].values())


def test_two_ranks_mc2_emulated(tmp_path):
    code, report = _run_demo(tmp_path, "--ranks", "2", *SMALL, "--steps", "9", "--rebalance-interval", "3",
                             "--comm-method", "mc2", "--max-moves", "3", "--skew", "2.0")
    assert code == 0
    _check_report(report, ranks=2, steps=9, interval=3)
    assert report["comm_methods"] == ["mc2"]
    assert report["backend"] == "gloo"


def test_four_ranks_auto_with_plot(tmp_path, capfd):
    plot = tmp_path / "demo.png"
    args = ["--ranks", "4", *SMALL, "--redundant-experts", "4", "--steps", "12", "--rebalance-interval", "4", "--skew", "2.0", "--seed", "1"]
    matplotlib_here = importlib.util.find_spec("matplotlib") is not None
    if matplotlib_here:
        args += ["--plot", str(plot)]
    code, report = _run_demo(tmp_path, *args)
    assert code == 0
    _check_report(report, ranks=4, steps=12, interval=4)
    # The measured imbalance falls: the last interval (after two rebalances) against the first.
    assert report["measured_imbalance_last_interval"] < report["measured_imbalance_first_interval"]
    output = capfd.readouterr().out
    assert "Rebalances" in output and "Correctness: OK" in output and "tokens/s per rank" in output
    assert "step 12/12" in output  # the progress bar reached the end
    if matplotlib_here:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--ranks", "3", "--redundant-experts", "4"], "must be divisible by --ranks (3)"),
    (["--experts", "10", "--redundant-experts", "2", "--expert-groups", "4"], "--expert-groups must divide --experts (10)"),
    (["--top-k", "20"], "--top-k must be <= --experts"),
    (["--ranks", "1", "--comm-method", "mc2"], "--comm-method mc2 needs --ranks >= 2"),
    _CUDA_CASE,
    (["--kill-rank", "9", "--kill-step", "1"], "--kill-rank/--kill-step"),
])
def test_impossible_arguments_exit_2_before_spawning(args, message, capsys):
    started = time.monotonic()
    assert main(["demo", *args]) == 2
    assert message in capsys.readouterr().err
    assert multiprocessing.active_children() == []
    assert time.monotonic() - started < 10  # refused up front, no rank was started


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "matplotlib" else real_find_spec(name, *rest))
    assert main(["demo", "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_killed_rank_stops_the_run_with_its_name(capfd):
    started = time.monotonic()
    code = main(["demo", "--ranks", "2", *SMALL, "--steps", "20", "--rebalance-interval", "5",
                 "--kill-rank", "1", "--kill-step", "3", "--timeout", "60"])
    elapsed = time.monotonic() - started
    assert code == 1
    error = capfd.readouterr().err
    assert "FAILED" in error and "rank 1 died" in error
    assert elapsed < 45  # bounded: the survivors are stopped, not left to time out
    assert multiprocessing.active_children() == []  # every rank process is gone


def test_divergence_from_the_reference_fails_loudly(capfd):
    code = main(["demo", "--ranks", "2", *SMALL, "--steps", "6", "--rebalance-interval", "3",
                 "--corrupt-rank", "1", "--corrupt-step", "2"])
    assert code == 1
    error = capfd.readouterr().err
    # Rank 1's experts serve every rank's tokens: the worst rank is whichever they hurt most.
    assert "FAILED" in error and "step 2: the output for rank" in error and "differs from the dense reference" in error
    assert multiprocessing.active_children() == []
