"""CPU smoke test of bench/bench_routing.py: the row selection (--only) and the table it prints.

Timings are not checked (a benchmark, not a test of speed); what is checked is which rows are
timed and that every row of the table is well formed.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_routing_under_test", ROOT / "bench" / "bench_routing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def run_main(bench, monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["bench_routing.py", *argv])
    bench.main()
    return capsys.readouterr().out


def table_rows(out: str) -> list[list[str]]:
    """The data rows of the printed markdown table, split into stripped cells."""
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| case ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_only_selects_by_substring(bench):
    names = [name for name, _ in bench.case_list("cpu", True, torch.bfloat16)]
    assert len(names) == len(set(names)), "case names must be unique for --only"
    picked = [name for name in names if bench.selected(name, ["unpermute"])]
    assert picked == ["unpermute T=256 H=512 K=8 EP4", "unpermute bwd T=256 H=512 K=8"]
    # any of several substrings, case-insensitive; nothing given = everything
    assert [n for n in names if bench.selected(n, ["HISTOGRAM", "fp8"])] == [
        "expert_histogram T=256 K=8 E=64", "permute fp8+scales T=256 H=512 K=8 EP4"]
    assert [n for n in names if bench.selected(n, [])] == names
    # the large case list builds nothing until a thunk is called (cheap to list on any machine)
    large = [name for name, _ in bench.case_list("cpu", False, torch.bfloat16)]
    assert "unpermute bwd T=8192 H=7168 K=8 E=256 EP32" in large and len(large) == len(set(large))


def test_only_runs_just_those_rows(bench, monkeypatch, capsys):
    out = run_main(bench, monkeypatch, capsys, "--small", "--only", "histogram,ungroup", "--only", "fp8")
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["ungroup_by_local_expert 4x8 H=512", "expert_histogram T=256 K=8 E=64",
                                        "permute fp8+scales T=256 H=512 K=8 EP4"]
    header = next(line for line in out.splitlines() if line.startswith("| case "))
    assert all(len(row) == len(header.strip("|").split("|")) for row in rows)
    for row in rows:
        float(row[1]), float(row[4].rstrip("*"))  # MB and ours are numbers


def test_only_matches_substrings_inside_names(bench, monkeypatch, capsys):
    """'permute T=256' is inside 'unpermute T=256 ...' too: a substring match, as documented."""
    rows = table_rows(run_main(bench, monkeypatch, capsys, "--small", "--only", "permute T=256"))
    assert [row[0] for row in rows] == ["permute T=256 H=512 K=8 E=64 EP4", "unpermute T=256 H=512 K=8 EP4"]


@pytest.mark.parametrize("argv", [["--only", "no-such-case"], ["--only", ","]])
def test_only_refuses_a_selection_of_nothing(bench, monkeypatch, capsys, argv):
    with pytest.raises(SystemExit) as raised:
        run_main(bench, monkeypatch, capsys, "--small", *argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "--only" in err
