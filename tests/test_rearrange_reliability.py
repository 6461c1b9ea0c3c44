"""Reliability of the expert-weight rearrangement (issue 15, items 7-10), on gloo.

- a new map that drops a logical expert is refused on every rank before any
  write, unless allow_dropping_experts=True;
- a rank that dies mid-rearrangement: every survivor raises RearrangementError
  with each layer's status on that rank, and the statuses are checked against
  the weights; a rank dying just before the final outcome all-reduce leaves no
  survivor returning success;
- a dropped async handle warns and makes the next moe_ext collective on the
  group fail at once (no hang); close() and the context manager end early;
- bool flags and ints are type-checked: the vLLM call shape fails loudly.

Every group runs with a short process-group timeout, so a hang fails fast.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from moe_ext.testing.distributed import DistributedRunError, run_distributed

NUM_LAYERS, PER_RANK, WORLD = 3, 2, 2
# Every expert changes rank in every layer, so every layer moves rows over P2P.
OLD = [[0, 1, 2, 3]] * NUM_LAYERS
NEW = [[3, 2, 1, 0]] * NUM_LAYERS


def _row(layer: int, expert: int) -> torch.Tensor:
    return torch.full((4,), float(100 * layer + expert))


def _weights(rank: int, placement) -> list:
    return [[torch.stack([_row(layer, placement[layer][rank * PER_RANK + r]) for r in range(PER_RANK)])]
            for layer in range(NUM_LAYERS)]


def _layer_is(weights: list, rank: int, placement, layer: int) -> bool:
    return torch.equal(weights[layer][0], _weights(rank, placement)[layer][0])


def _observed_status(weights: list, rank: int) -> list:
    return ["applied" if _layer_is(weights, rank, NEW, layer) else
            "untouched" if _layer_is(weights, rank, OLD, layer) else "mixed" for layer in range(NUM_LAYERS)]


# --------------------------------------------------------------------- flags, drops, close


def _flags_drops_and_close(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from moe_ext.eplb import rearrange_expert_weights_async, rearrange_expert_weights_inplace
    from moe_ext.errors import ArgumentError

    out: dict = {}
    weights = _weights(rank, OLD)

    def unchanged() -> bool:
        return all(_layer_is(weights, rank, OLD, layer) for layer in range(NUM_LAYERS))

    # Item 10: vLLM's call shape puts the communicator into is_profile.
    communicator = object()
    with pytest.raises(TypeError, match=r"is_profile must be a bool, got object"):
        rearrange_expert_weights_inplace(OLD, NEW, weights, None, communicator)
    assert unchanged()
    for kwargs, message in [(dict(is_profile=1), "is_profile must be a bool, got int"),
                            (dict(allow_dropping_experts="yes"), "allow_dropping_experts must be a bool"),
                            (dict(ranks_per_node=True), "ranks_per_node must be an int, got bool"),
                            (dict(ranks_per_node=2.0), "ranks_per_node must be an int, got float")]:
        with pytest.raises(TypeError, match=message):
            rearrange_expert_weights_inplace(OLD, NEW, weights, None, **kwargs)
        assert unchanged()
    with pytest.raises(TypeError, match="allow_dropping_experts must be a bool, got NoneType"):
        rearrange_expert_weights_async(OLD, NEW, weights, allow_dropping_experts=None)
    with pytest.raises(TypeError, match="ep_group must be a torch.distributed.ProcessGroup or None, got str"):
        rearrange_expert_weights_inplace(OLD, NEW, weights, "ep")
    # Only one rank's flag is wrong: every rank refuses (the others learn it in the agreement).
    with pytest.raises((TypeError, ArgumentError)) as one_rank:
        rearrange_expert_weights_inplace(OLD, NEW, weights, None, is_profile=(False if rank else "no"))
    out["one_rank_flag"] = f"{type(one_rank.value).__name__}: {one_rank.value}"
    assert unchanged()

    # Item 7: expert 3 is in the old map and not in the new one (layer 1 only).
    dropping = [list(NEW[0]), [0, 2, 1, 0], list(NEW[2])]
    with pytest.raises(ArgumentError, match=r"drops logical expert\(s\) \[3\] .* of layer 1 .* "
                                            r"allow_dropping_experts=True"):
        rearrange_expert_weights_inplace(OLD, dropping, weights)
    assert unchanged()
    with pytest.raises(ArgumentError, match=r"drops logical expert"):
        rearrange_expert_weights_async(OLD, dropping, weights)
    assert unchanged()
    # One rank allows it, the other does not: refused everywhere (the flag is part of the agreement).
    with pytest.raises(ArgumentError):
        rearrange_expert_weights_inplace(OLD, dropping, weights, allow_dropping_experts=rank == 0)
    assert unchanged()
    dropped = _weights(rank, OLD)
    rearrange_expert_weights_inplace(OLD, dropping, dropped, allow_dropping_experts=True)
    want = [[torch.stack([_row(layer, dropping[layer][rank * PER_RANK + r]) for r in range(PER_RANK)])]
            for layer in range(NUM_LAYERS)]
    assert all(torch.equal(dropped[layer][0], want[layer][0]) for layer in range(NUM_LAYERS))

    # Item 9: close() and the context manager end early; the group stays usable.
    with rearrange_expert_weights_async(OLD, NEW, weights) as handle:
        assert handle.commit_next_layer() == 0
    assert handle.closed and handle.layer_status == ["applied", "untouched", "untouched"]
    assert _observed_status(weights, rank) == ["applied", "untouched", "untouched"]
    with pytest.raises(ArgumentError, match="handle is closed"):
        handle.commit_next_layer()
    handle.close()  # idempotent
    weights = _weights(rank, OLD)
    handle = rearrange_expert_weights_async(OLD, NEW, weights)
    handle.close()  # before any commit
    assert _observed_status(weights, rank) == ["untouched"] * NUM_LAYERS
    handle = rearrange_expert_weights_async(OLD, NEW, weights)
    handle.finish()
    assert handle.closed and handle.layer_status == ["applied"] * NUM_LAYERS
    assert _observed_status(weights, rank) == ["applied"] * NUM_LAYERS
    dist.barrier()
    return out


@pytest.mark.distributed
def test_flags_drops_and_close():
    results = run_distributed(_flags_drops_and_close, WORLD, timeout=60)
    assert "is_profile must be a bool" in results[0]["one_rank_flag"]
    assert "another rank" in results[1]["one_rank_flag"]


# --------------------------------------------------------------------- dropped handle


def _dropped_handle(rank: int, world_size: int) -> dict:
    import gc
    import warnings

    from moe_ext.distributed.health import GroupUnusableError, clear_unusable
    from moe_ext.eplb import rearrange_expert_weights_async, rearrange_expert_weights_inplace

    weights = _weights(rank, OLD)
    handle = rearrange_expert_weights_async(OLD, NEW, weights)
    out: dict = {}
    if rank == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del handle
            gc.collect()
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("dropped without close()" in m and "layer 0 of 3" in m for m in messages), messages
        started = time.monotonic()
        with pytest.raises(GroupUnusableError, match=r"rearrange_expert_weights_inplace: this process group is "
                                                     r"unusable on this rank: .*dropped without close\(\)"):
            rearrange_expert_weights_inplace(OLD, NEW, weights)
        out["seconds_to_error"] = time.monotonic() - started
        # The ParallelGroup collectives check the same mark.
        from moe_ext.distributed.group import ParallelGroup
        import torch.distributed as dist

        group = ParallelGroup("ep", list(range(world_size)), dist.group.WORLD)
        with pytest.raises(GroupUnusableError, match="all_reduce"):
            group.all_reduce(torch.ones(1))
        clear_unusable(None)
        assert _observed_status(weights, rank) == ["untouched"] * NUM_LAYERS
    else:
        # The peer closes properly. Whether the exchange completes depends on
        # whether rank 0's dropped sends still run; either way close() returns
        # or raises RearrangementError (here: once rank 0 exits), never hangs.
        from moe_ext.eplb import RearrangementError

        try:
            handle.close()
            out["peer_close"] = "completed"
        except RearrangementError as error:
            assert error.layer_status == ["untouched"] * NUM_LAYERS
            out["peer_close"] = "raised"
        assert _observed_status(weights, rank) == ["untouched"] * NUM_LAYERS
    return out


@pytest.mark.distributed
def test_dropped_handle_warns_and_the_next_collective_fails_fast():
    results = run_distributed(_dropped_handle, WORLD, timeout=60)
    assert results[0]["seconds_to_error"] < 1.0
    assert results[1]["peer_close"] in ("completed", "raised")


# --------------------------------------------------------------------- a rank dies


def _dies(rank: int, world_size: int, mode: str, report_dir: str) -> None:
    """Rank 1 exits abruptly at the point ``mode`` names; rank 0 reports what it saw."""
    from moe_ext.eplb import rearrange as rearrange_module
    from moe_ext.eplb import rearrange_expert_weights_async, rearrange_expert_weights_inplace

    weights = _weights(rank, OLD)
    if rank == 1:
        if mode == "inplace-mid":
            original = rearrange_module._LayerTransfer.commit

            def commit(self):
                if self.plan.layer == 1:
                    os._exit(3)
                original(self)

            rearrange_module._LayerTransfer.commit = commit
        elif mode == "before-outcome":
            rearrange_module._agree_on_outcome = lambda prepared, succeeded: os._exit(3)
    report: dict = {"returned": False}
    try:
        if mode == "async-mid":
            handle = rearrange_expert_weights_async(OLD, NEW, weights)
            handle.commit_next_layer()
            if rank == 1:
                os._exit(3)
            handle.finish()
        else:
            rearrange_expert_weights_inplace(OLD, NEW, weights)
        report["returned"] = True
    except rearrange_module.RearrangementError as error:
        report.update(error=str(error), status=error.layer_status, type=type(error).__name__)
    except Exception as error:  # noqa: BLE001  reported, and failed on in the test
        report.update(error=f"{type(error).__name__}: {error}", status=None, type=type(error).__name__)
    report["observed"] = _observed_status(weights, rank)
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["inplace-mid", "before-outcome", "async-mid"])
def test_a_rank_dying_mid_rearrangement(mode, tmp_path):
    with pytest.raises(DistributedRunError, match="rank 1 died"):
        run_distributed(_dies, WORLD, mode, str(tmp_path), timeout=60)
    with open(tmp_path / "rank0.json") as f:
        report = json.load(f)
    assert not report["returned"], "a survivor returned success although a rank died"
    assert report["type"] == "RearrangementError", report
    status, observed = report["status"], report["observed"]
    assert len(status) == NUM_LAYERS and "per layer" in report["error"]
    for said, seen in zip(status, observed):
        assert said in ("applied", "untouched", "partial")
        if said != "partial":
            assert said == seen, (status, observed)  # what the error says is what the weights hold
    assert status[0] == "applied"  # layer 0 completed on both ranks before the death
    if mode == "before-outcome":
        assert status == ["applied"] * NUM_LAYERS and "could not agree" in report["error"]
    if mode == "async-mid":
        # The async form commits whole layers: never partial. (Layer 1 may still
        # complete on rank 0 when rank 1's sends left before it died.)
        assert "partial" not in status and status[-1] == "untouched"
