"""The Python view of the transfer plan, its argument errors, and the rows it
moves against the pairing rule of the reference engine (seed 002), implemented
here independently as `seed_rule_stats`."""

from __future__ import annotations

import numpy as np
import pytest

from moe_ext.eplb import plan_expert_transfer


def seed_rule_stats(old: np.ndarray, new: np.ndarray, ep_size: int) -> dict:
    """Rows moved and per-sender load under the reference engine's pairing rule.

    Per layer and expert: senders are the ranks holding it in the old map,
    receivers the ranks needing it in the new map without holding it (both in
    rank order). With k = len(receivers) // len(senders), sender i serves the
    receivers [i*k, (i+1)*k) and, if it exists, receiver len(senders)*k + i.
    Buffered rows per rank: every changed row filled from a local row, plus one
    row per expert received.
    """
    num_layers, slots = old.shape
    per_rank = slots // ep_size
    rows_moved = 0
    max_load = 0
    buffer_rows = 0
    for layer in range(num_layers):
        holders: dict = {}
        needers: dict = {}
        for slot in range(slots):
            rank = slot // per_rank
            for table, value in ((holders, old[layer, slot]), (needers, new[layer, slot])):
                if value >= 0 and rank not in table.setdefault(int(value), []):
                    table[int(value)].append(rank)
        load = np.zeros(ep_size, dtype=np.int64)
        for expert, needing in needers.items():
            senders = holders.get(expert, [])
            receivers = [r for r in needing if r not in senders]
            if not senders or not receivers:
                continue
            k = len(receivers) // len(senders)
            for i, sender in enumerate(senders):
                served = receivers[i * k:(i + 1) * k]
                if len(senders) * k + i < len(receivers):
                    served = served + [receivers[len(senders) * k + i]]
                load[sender] += len(served)
                rows_moved += len(served)
        max_load = max(max_load, int(load.max()))
        for rank in range(ep_size):
            old_rows = old[layer, rank * per_rank:(rank + 1) * per_rank]
            new_rows = new[layer, rank * per_rank:(rank + 1) * per_rank]
            local = sum(1 for o, n in zip(old_rows, new_rows) if o != n and n >= 0 and n in set(old_rows))
            remote = len({int(n) for n in new_rows if n >= 0 and n not in set(old_rows)})
            max_buffer = local + remote
            buffer_rows = max(buffer_rows, max_buffer)
    return {"rows_moved": rows_moved, "max_rows_sent": max_load, "max_buffer_rows": buffer_rows}


def random_maps(rng: np.random.Generator, num_layers: int, ep_size: int, per_rank: int,
                empty_fraction: float = 0.2, keep_fraction: float = 0.0) -> tuple:
    """Old maps with replicas and empty slots holding every expert of [0, n); new
    maps drawn from those experts, keeping each old slot with keep_fraction."""
    slots = ep_size * per_rank
    olds, news = [], []
    for _ in range(num_layers):
        experts = int(rng.integers(1, slots + 1))
        old = np.concatenate([np.arange(experts), np.where(rng.random(slots - experts) < empty_fraction, -1,
                                                           rng.integers(0, experts, slots - experts))])
        rng.shuffle(old)
        new = np.where(rng.random(slots) < empty_fraction, -1, rng.integers(0, experts, slots))
        keep = rng.random(slots) < keep_fraction
        new[keep] = old[keep]
        olds.append(old)
        news.append(new)
    return np.stack(olds).astype(np.int64), np.stack(news).astype(np.int64)


def test_plan_view_matches_columns_and_is_minimal():
    rng = np.random.default_rng(0)
    for _ in range(40):
        ep, per_rank = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        old, new = random_maps(rng, 3, ep, per_rank)
        plan = plan_expert_transfer(old, new, ep)
        assert plan.rows_received.shape == (3, ep)
        assert plan.rows_sent.sum() == plan.rows_received.sum() == plan.total_rows_moved
        for layer in range(3):
            for rank in range(ep):
                part = plan.for_rank(layer, rank)
                old_rows = old[layer, rank * per_rank:(rank + 1) * per_rank]
                new_rows = new[layer, rank * per_rank:(rank + 1) * per_rank]
                needed = {int(e) for e in new_rows if e >= 0 and e not in set(old_rows)}
                assert sorted(part.recv_experts.tolist()) == sorted(needed)
                assert part.buffer_rows <= per_rank
                destinations = np.concatenate([part.unchanged_rows, part.local_copy_dst_rows,
                                               part.recv_dst_rows, part.duplicate_fill_dst_rows])
                assert sorted(destinations.tolist()) == [i for i in range(per_rank) if new_rows[i] >= 0]
        summary = plan.summary()
        assert summary["rows_moved"] == plan.total_rows_moved
        sent = plan.bytes_per_rank(10)["sent"]
        assert sent.sum() == 10 * plan.total_rows_moved


def test_never_moves_more_than_the_seed_rule():
    rng = np.random.default_rng(1)
    ours_total = seed_total = 0
    ours_worst_sender = seed_worst_sender = 0
    for _ in range(60):
        ep, per_rank = int(rng.integers(2, 9)), int(rng.integers(1, 9))
        old, new = random_maps(rng, 2, ep, per_rank, keep_fraction=float(rng.random()))
        plan = plan_expert_transfer(old, new, ep)
        seed = seed_rule_stats(old, new, ep)
        assert plan.total_rows_moved <= seed["rows_moved"]
        assert int(plan.buffer_rows.max()) <= seed["max_buffer_rows"]
        ours_total += plan.total_rows_moved
        seed_total += seed["rows_moved"]
        ours_worst_sender += int(plan.rows_sent.max())
        seed_worst_sender += seed["max_rows_sent"]
    assert ours_total == seed_total  # both move exactly one row per missing (rank, expert)
    assert ours_worst_sender <= seed_worst_sender


def test_seed_rule_reference_on_a_hand_worked_case():
    # Expert 0 on ranks 0 and 1; ranks 2, 3, 4 need it: k = 1, sender 0 serves
    # rank 2 and rank 4 (the remainder), sender 1 serves rank 3.
    old = np.array([[0, 0, 1, 2, 3]])
    new = np.array([[0, 0, 0, 0, 0]])
    stats = seed_rule_stats(old, new, 5)
    assert stats == {"rows_moved": 3, "max_rows_sent": 2, "max_buffer_rows": 1}
    plan = plan_expert_transfer(old, new, 5)
    assert plan.total_rows_moved == 3
    assert sorted(plan.rows_sent[0].tolist()) == [0, 0, 0, 1, 2]


@pytest.mark.parametrize("old, new, ep, message", [
    ([[0, 1, 2, 3]], [[0, 1, 2]], 2, "same shape"),
    ([[0, 1, 2, 3]], [[0, 1, 2, 3]], 3, "multiple of ep_size"),
    ([[0, 1, 2, 3]], [[0, 1, 2, 3]], 0, "ep_size"),
    ([0, 1, 2, 3], [0, 1, 2, 3], 2, "2-D"),
    ([[0, 1, 2, -2]], [[0, 1, 2, 3]], 2, "old_phy2log"),
    ([[0, 1, 2, 3]], [[0, 1, 2, 9]], 2, "no rank holds it"),
    ([[0.0, 1, 2, 3]], [[0, 1, 2, 3]], 2, "integer"),
])
def test_plan_refuses_bad_maps(old, new, ep, message):
    with pytest.raises(ValueError, match=message):
        plan_expert_transfer(np.array(old), np.array(new), ep)


def test_plan_accepts_tensors_and_checks_num_logical_experts():
    torch = pytest.importorskip("torch")
    old = torch.tensor([[0, 1, 2, 3]])
    plan = plan_expert_transfer(old, old.flip(1), 2, num_logical_experts=4)
    assert plan.total_rows_moved == 4
    with pytest.raises(ValueError, match="num_logical_experts"):
        plan_expert_transfer(old, old, 2, num_logical_experts=3)
