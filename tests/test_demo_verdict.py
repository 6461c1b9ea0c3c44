"""`moe-ext demo` says loudly, and exits 3, when a correct run showed no rebalance; `--ranks 3` works.

The demo exists to show EPLB rebalancing; a run in which no rebalance ran, no
slot moved, or the measured imbalance did not fall is not a success to report
with exit 0 (docs/demo.md, "Failures and exit codes").
"""

from __future__ import annotations

import json

import pytest

from moe_ext.cli import main
from moe_ext.demo.config import DemoConfig
from moe_ext.demo.report import EXIT_NO_REBALANCE, rebalance_shortfall

SMALL = ["--experts", "8", "--top-k", "2", "--hidden-size", "32", "--intermediate-size", "32",
         "--tokens-per-rank", "32"]


def _result(rebalances, first=1.3, last=1.1, **config):
    settings = dict(rebalance_interval=10, steps=40, skew=1.5)
    settings.update(config)
    return {"config": settings, "rebalances": rebalances, "measured_imbalance_first_interval": first,
            "measured_imbalance_last_interval": last}


def _event(moved, max_moves=5, before=1.3):
    return {"slots_moved": moved, "max_moves": max_moves, "imbalance_before": before, "lower_bound": 1.0}


@pytest.mark.parametrize("result, expected", [
    (_result([_event(5), _event(2)]), None),
    (_result([], steps=8), "no rebalance ran: rebalances happen at steps 10, 20, ... before the last step, and "
                           "--steps 8 leaves none"),
    (_result([_event(0, max_moves=0)] * 3), "no slot moved: --max-moves 0 forbids every move"),
    (_result([_event(0, before=1.02)] * 3), "no slot moved in 3 rebalance(s): the planner found no better placement "
                                            "(imbalance at most 1.020 before"),
    (_result([_event(4)], first=1.10, last=1.12), "the measured imbalance did not fall: 1.100 over the first 10 "
                                                  "steps -> 1.120 over the last 10, though 4 slot(s) moved"),
    (_result([_event(4)], first=1.10, last=1.10), "the measured imbalance did not fall"),
])
def test_rebalance_shortfall_names_the_reason(result, expected):
    got = rebalance_shortfall(result)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(expected), got


def test_three_ranks_are_possible_with_the_default_redundant_slots():
    config = DemoConfig(ranks=3)
    config.validate()  # 16 experts + 5 redundant = 21 slots, 7 per rank
    assert (config.num_physical_experts, config.slots_per_rank) == (21, 7)
    with pytest.raises(ValueError, match=r"must be divisible by --ranks \(3\)"):
        DemoConfig(ranks=3, redundant_experts=4).validate()


def test_a_correct_run_without_a_rebalance_exits_3_and_says_why(tmp_path, capfd):
    report = tmp_path / "demo.json"
    # Three ranks (the docs once called that impossible); two steps: no rebalance can run.
    code = main(["demo", "--ranks", "3", *SMALL, "--steps", "2", "--rebalance-interval", "5", "--json", str(report)])
    captured = capfd.readouterr()
    assert code == EXIT_NO_REBALANCE, captured.out[-2000:] + captured.err[-2000:]
    assert "warning: this run cannot show a rebalance (--steps 2 <= --rebalance-interval 5)" in captured.err
    assert "NO REBALANCE SHOWN (exit 3): every output was correct, but no rebalance ran" in captured.err
    assert "Correctness: OK" in captured.out
    result = json.loads(report.read_text())
    assert result["correct"] is True and result["rebalances"] == [] and len(result["devices"]) == 3
    assert result["rebalance_shown"] is False and result["rebalance_shortfall"].startswith("no rebalance ran")
