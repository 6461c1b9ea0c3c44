"""moe_ext.eplb.LoadRecorder: window, top-k counting, errors, all-reduce over gloo."""

from __future__ import annotations

import pytest
import torch

from moe_ext.eplb import LoadRecorder
from moe_ext.testing.distributed import run_distributed


def test_window_keeps_the_last_steps():
    recorder = LoadRecorder(2, 4, window=3)
    steps = [torch.randint(0, 10, (2, 4), dtype=torch.int32) for _ in range(5)]
    for index, counts in enumerate(steps):
        recorder.record(counts)
        recorder.step()
        expected = torch.stack(steps[max(0, index - 2): index + 1]).sum(0).to(torch.int64)
        assert torch.equal(recorder.load(), expected)
    assert recorder.steps_recorded == 3
    recorder.record(steps[0])  # not yet a completed step: not in load()
    assert torch.equal(recorder.load(), torch.stack(steps[2:]).sum(0).to(torch.int64))
    recorder.reset()
    assert int(recorder.load().sum()) == 0 and recorder.steps_recorded == 0


def test_record_topk_and_record_layer_count_experts():
    recorder = LoadRecorder(3, 5, window=2)
    topk = torch.tensor([[0, 4], [4, 4], [-1, 2], [5, 1]])  # -1 and 5 are outside [0, 5): ignored
    recorder.record_topk(1, topk)
    recorder.record_layer(2, torch.tensor([1, 0, 0, 0, 2]))
    recorder.step()
    expected = torch.zeros(3, 5, dtype=torch.int64)
    expected[1] = torch.tensor([1, 1, 1, 0, 3])
    expected[2] = torch.tensor([1, 0, 0, 0, 2])
    assert torch.equal(recorder.load(), expected)


@pytest.mark.parametrize("call,match", [
    (lambda r: r.record(torch.zeros(2, 3, dtype=torch.int64)), "counts"),
    (lambda r: r.record(torch.zeros(2, 4)), "counts"),
    (lambda r: r.record_layer(2, torch.zeros(4, dtype=torch.int64)), "layer"),
    (lambda r: r.record_topk(0, torch.zeros(3, 2)), "topk_ids"),
    (lambda r: LoadRecorder(2, 4, window=0), "window"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(LoadRecorder(2, 4))


def _all_reduce_case(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    recorder = LoadRecorder(2, 3, window=4, group=dist.group.WORLD)
    for step in range(3):
        recorder.record(torch.full((2, 3), rank + 1 + step, dtype=torch.int64))
        recorder.step()
    expected_per_rank = sum(r + 1 + s for r in range(world_size) for s in range(3))
    assert torch.equal(recorder.load(), torch.full((2, 3), expected_per_rank, dtype=torch.int64))
    # Every rank plans from the same loads, so every rank gets the same placement.
    from moe_ext.eplb import plan_placement

    load = recorder.load() * torch.tensor([[1, 5, 2], [7, 1, 1]])
    plan = plan_placement(load, 6, 1, 1, 3).phy2log
    gathered = [torch.empty_like(plan) for _ in range(world_size)]
    dist.all_gather(gathered, plan)
    assert all(torch.equal(g, plan) for g in gathered)


def test_load_all_reduces_over_a_group():
    run_distributed(_all_reduce_case, 2, backend="gloo", timeout=120)


def test_history_is_the_window_oldest_first_and_plans():
    from moe_ext.eplb import LoadRecorder, plan_placement

    recorder = LoadRecorder(2, 4, window=3)
    assert recorder.history().shape == (0, 2, 4)
    for step in range(5):
        recorder.record(torch.full((2, 4), step, dtype=torch.int64) + torch.arange(4))
        recorder.step()
        expected = [s for s in range(step + 1)][-3:]
        history = recorder.history()
        assert history.shape == (len(expected), 2, 4)
        assert history[:, 0, 0].tolist() == expected
        assert torch.equal(history.sum(0), recorder.load())
    plan = plan_placement(recorder.history(), 8, 1, 1, 4)
    assert plan.window_imbalance.shape == (3, 2) and plan.worst_window_imbalance.shape == (2,)
