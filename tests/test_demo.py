"""`moe-ext demo` end to end on CPU ranks (gloo): the JSON it writes, its failures and its exit codes.

Each run spawns its ranks (~3 s of startup each), so the file runs few, small demos.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    assert "Rebalances" in output and "Correctness: OK" in output and "tokens/s over all ranks" in output
    assert "per rank: rank 0:" in output and "includes waiting for the other ranks" in output
    assert "step 12/12" in output  # the progress reached the end
    # Each rebalance is reported after its step's progress line.
    assert output.index("step  4/12") < output.index("rebalance @ step 4:") < output.index("step  8/12")
    if matplotlib_here:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--ranks", "3", "--redundant-experts", "4"], "must be divisible by --ranks (3)"),
    (["--experts", "10", "--redundant-experts", "2", "--expert-groups", "4"], "--expert-groups must divide --experts (10)"),
    (["--top-k", "20"], "--top-k must be <= --experts"),
    (["--ranks", "1", "--comm-method", "mc2"], "--comm-method mc2 needs --ranks >= 2"),
    _CUDA_CASE,
    (["--kill-rank", "9", "--kill-step", "1"], "--kill-rank/--kill-step"),
    (["--timeout", "inf"], "--timeout must be a finite number of seconds"),
    (["--timeout", "nan"], "--timeout must be a finite number of seconds"),
    (["--timeout", "1e300"], "--timeout must be a finite number of seconds"),
    (["--startup-timeout", "-1"], "--startup-timeout must be a finite number of seconds"),
    (["--tolerance", "inf"], "--tolerance must be a finite number > 0"),
    (["--preset", "deepseek-v3", "--device", "cpu"], "GiB"),  # 45 GiB of logical experts per rank: refused
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


def test_stalled_rank_is_named(capfd):
    # Rank 1 sleeps in Python at step 2 (alive, heartbeat running, outside any collective); rank 0 waits for it.
    code = main(["demo", "--ranks", "2", *SMALL, "--steps", "6", "--rebalance-interval", "3",
                 "--stall-rank", "1", "--stall-step", "2", "--timeout", "6"])
    assert code == 1
    error = capfd.readouterr().err
    assert "rank 1 stalled at step 2" in error and "(--timeout)" in error, error
    assert "busy outside any collective" in error, error
    assert multiprocessing.active_children() == []


def test_stopped_rank_is_named(capfd):
    # Rank 1 SIGSTOPs itself at step 2: no heartbeat, the process state says stopped.
    code = main(["demo", "--ranks", "2", *SMALL, "--steps", "6", "--rebalance-interval", "3",
                 "--stop-rank", "1", "--stop-step", "2", "--timeout", "8"])
    assert code == 1
    error = capfd.readouterr().err
    assert "rank 1 stopped responding" in error, error
    if sys.platform.startswith("linux"):
        assert "stopped (SIGSTOP" in error, error
    assert multiprocessing.active_children() == []


def test_startup_is_bounded_apart_from_steps(capfd):
    # No rank can import torch, join the group and build the layer in 0.5 s: a start-up failure, named as such.
    code = main(["demo", "--ranks", "2", *SMALL, "--steps", "3", "--startup-timeout", "0.5"])
    assert code == 1
    error = capfd.readouterr().err
    assert "did not finish start-up" in error and "--startup-timeout" in error, error
    assert multiprocessing.active_children() == []


def test_cli_bare_help_version_and_defaults(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: moe-ext" in out and "demo" in out and "eplb" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip().startswith("moe-ext 0.")
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in help_text
    assert help_text.count("(default:") >= 10
    assert "(default: 4, or the next count that does)" in help_text


def test_batched_dense_reference_matches_the_per_token_one():
    from moe_ext.testing.dense_moe import dense_moe, dense_moe_batched

    generator = torch.Generator().manual_seed(3)
    cases = [dict(experts=16, top_k=2, scoring="sigmoid", num_expert_group=4, topk_group=2, bias=False),
             dict(experts=8, top_k=3, scoring="softmax", num_expert_group=None, topk_group=None, bias=False),
             dict(experts=16, top_k=4, scoring="sigmoid", num_expert_group=8, topk_group=3, bias=True)]
    for case in cases:
        experts, hidden, inter = case["experts"], 32, 24
        x = torch.randn(24, hidden, generator=generator)
        gate = torch.randn(experts, hidden, generator=generator) / hidden ** 0.5
        w13 = torch.randn(experts, hidden, 2 * inter, generator=generator) / hidden ** 0.5
        w2 = torch.randn(experts, inter, hidden, generator=generator) / inter ** 0.5
        bias = torch.randn(experts, generator=generator) * 0.1 if case["bias"] else None
        group_score = None if case["num_expert_group"] is None else ("top2_sum" if case["bias"] else "max")
        routing = dict(scoring=case["scoring"], num_expert_group=case["num_expert_group"],
                       topk_group=case["topk_group"], group_score=group_score, correction_bias=bias,
                       routed_scaling_factor=2.5)
        expected = dense_moe(x, gate, w13, w2, case["top_k"], **routing)
        got = dense_moe_batched(x, gate, w13, w2, case["top_k"], **routing)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    empty = dense_moe_batched(torch.zeros(0, 32), gate, w13, w2, 2, scoring="sigmoid")
    assert empty.shape == (0, 32)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun_env() -> dict:
    env = dict(os.environ)
    # The spawned processes import the same moe_ext as this test (an install, or a source tree on PYTHONPATH).
    import moe_ext

    package_root = str(Path(moe_ext.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    return env


_TORCHRUN_DEMO = ["-m", "moe_ext", "demo", *SMALL, "--steps", "4", "--rebalance-interval", "2", "--skew", "2.0"]


def test_under_torchrun_single_node(tmp_path):
    report = tmp_path / "torchrun.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               *_TORCHRUN_DEMO, "--json", str(report)]
    done = subprocess.run(command, env=_torchrun_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    _check_report(result, ranks=2, steps=4, interval=2)
    assert result["launcher"] == "torchrun"
    assert result["backend"] == "gloo"
    # One report, from rank 0, in the launcher's group (no self-spawned ranks).
    assert done.stdout.count("Correctness: OK") == 1
    assert "torchrun's process group" in done.stdout


def test_under_torchrun_two_nodes_through_rendezvous(tmp_path):
    # Two torchrun agents (one per "node", here both on 127.0.0.1) meet through the c10d rendezvous.
    port = _free_port()
    report = tmp_path / "two_nodes.json"
    agents = []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "moe-ext-demo-test",
                   *_TORCHRUN_DEMO, "--json", str(report)]
        agents.append(subprocess.Popen(command, env=_torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, cwd=tmp_path))
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=240)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert all(agent.returncode == 0 for agent in agents), "\n----\n".join(o[-3000:] for o in outputs)
    result = json.loads(report.read_text())
    _check_report(result, ranks=2, steps=4, interval=2)
    assert result["launcher"] == "torchrun"
    assert sum(output.count("Correctness: OK") for output in outputs) == 1


@pytest.mark.parametrize("rich_here", [True, False])
def test_progress_and_tables_with_and_without_rich(rich_here, monkeypatch):
    import io

    from moe_ext.cli import table
    from moe_ext.demo import report

    if rich_here and not table.have_rich():
        pytest.skip("rich is not installed (the test extra installs it)")
    monkeypatch.setattr(report, "have_rich", lambda: rich_here)
    stream = io.StringIO()
    event = dict(step=2, imbalance_before=1.5, imbalance_after=1.1, slots_moved=2, bytes_moved=2048,
                 transfer_seconds=0.001)
    progress = report.Progress(4, interactive=True, stream=stream)
    assert (progress._rich is not None) == rich_here
    for done in range(1, 5):
        progress.update(done, 1.2, 1e-6, event if done == 2 else None)
    progress.close()
    text = stream.getvalue()
    assert "rebalance @ step 2: planned imbalance 1.50 -> 1.10, 2 slots moved, 2.0 KiB" in text
    assert "4/4" in text
    if not rich_here:  # plain lines, the rebalance after its step's line
        assert text.index("step 2/4") < text.index("rebalance @ step 2")
    rendered = table.format_table(["a", "long header"], [["1", "2"], ["333", "4"]], use_rich=rich_here)
    lines = rendered.splitlines()
    assert "long header" in lines[0] and lines[-1].split() == ["333", "4"]
    assert len({len(line) for line in (lines[0], lines[-1])}) == 1  # right-aligned columns of one width


def test_launcher_environment_is_detected_and_ranks_must_match(monkeypatch, capsys):
    from moe_ext.demo.runner import launcher_environment

    assert launcher_environment() is None or "RANK" in os.environ
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    layout = launcher_environment()
    assert layout["world_size"] == 2 and layout["local_world_size"] == 2 and layout["launcher"] == "external launcher"
    # Refused before joining any group (MASTER_PORT 1 would never answer).
    assert main(["demo", "--ranks", "4"]) == 2
    assert "--ranks must match the launcher's WORLD_SIZE (2)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["demo"]) == 2
    assert "not integers" in capsys.readouterr().err
