"""Multi-process tests of the expert weight rearrangement executor.

Runs on gloo (CPU) by default; MOE_EXT_TEST_BACKEND=nccl runs the same suite
on GPUs (one per rank; world sizes above the GPU count are skipped). Each
spawned group runs many random cases, since spawning costs seconds.

A weight row of logical expert e in layer l, tensor i is a deterministic
pattern of (l, i, e), so after a rearrangement every row can be checked
against the pattern of the expert the new map names, exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_ext.testing.distributed import run_distributed
from moe_ext.testing.distributed import test_backend as _selected_backend

BACKEND = _selected_backend()

# Row shapes and dtypes of the weight tensors of a layer (several per layer).
WEIGHT_SPECS = [((3, 4), torch.float32), ((5,), torch.bfloat16), ((2, 3), torch.int64), ((7,), torch.float16)]


def _world_sizes_available(world_size: int) -> bool:
    return BACKEND != "nccl" or torch.cuda.device_count() >= world_size


def _device(rank: int) -> torch.device:
    return torch.device("cuda", rank) if BACKEND == "nccl" else torch.device("cpu")


def _pattern(layer: int, index: int, expert: int, row_shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    numel = int(np.prod(row_shape))
    base = torch.arange(numel, dtype=torch.float32, device=device).reshape(row_shape)
    return ((base * 3 + expert * 17 + layer * 5 + index) % 251).to(dtype)


def _make_weights(old: np.ndarray, rank: int, per_rank: int, specs: list, device, seed: int) -> list:
    """Per layer, per spec, a [per_rank, *row_shape] tensor with the old map's experts (garbage if empty)."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    layers = []
    for layer in range(old.shape[0]):
        tensors = []
        for index, (row_shape, dtype) in enumerate(specs):
            rows = []
            for row in range(per_rank):
                expert = int(old[layer, rank * per_rank + row])
                if expert >= 0:
                    rows.append(_pattern(layer, index, expert, row_shape, dtype, device))
                else:
                    rows.append((torch.randint(0, 100, row_shape, generator=generator) + 1000).to(dtype).to(device))
            tensors.append(torch.stack(rows))
        layers.append(tensors)
    return layers


def _check_layer(weights: list, before: list, new: np.ndarray, layer: int, rank: int, per_rank: int,
                 specs: list, context: str) -> None:
    for index, (row_shape, dtype) in enumerate(specs):
        tensor = weights[layer][index]
        for row in range(per_rank):
            expert = int(new[layer, rank * per_rank + row])
            expected = (_pattern(layer, index, expert, row_shape, dtype, tensor.device) if expert >= 0
                        else before[layer][index][row])  # emptied rows keep what they held
            assert torch.equal(tensor[row], expected), (
                f"{context}: layer {layer} rank {rank} row {row} tensor {index} should hold expert {expert}")


def _snapshot(weights: list) -> list:
    return [[t.clone() for t in layer] for layer in weights]


def _assert_unchanged(weights: list, before: list, context: str) -> None:
    for layer, (now, then) in enumerate(zip(weights, before)):
        for index, (a, b) in enumerate(zip(now, then)):
            assert torch.equal(a, b), f"{context}: layer {layer} tensor {index} changed"


def _random_case(seed: int, world_size: int) -> tuple:
    """The same maps on every rank: seeded, not communicated."""
    from test_transfer_plan import random_maps

    rng = np.random.default_rng(seed)
    per_rank = int(rng.integers(1, 6))
    num_layers = int(rng.integers(1, 4))
    old, new = random_maps(rng, num_layers, world_size, per_rank, empty_fraction=0.2,
                           keep_fraction=float(rng.random()) * 0.6)
    specs = [WEIGHT_SPECS[i] for i in sorted(rng.choice(len(WEIGHT_SPECS), int(rng.integers(1, 4)), replace=False))]
    return old, new, per_rank, specs


# --------------------------------------------------------------------- per-rank bodies


def _sync_cases(rank: int, world_size: int, num_cases: int) -> int:
    from moe_ext.eplb import rearrange_expert_weights_inplace

    device = _device(rank)
    bystander = torch.arange(10.0, device=device)
    moved = 0
    for seed in range(num_cases):
        old, new, per_rank, specs = _random_case(seed, world_size)
        weights = _make_weights(old, rank, per_rank, specs, device, seed)
        before = _snapshot(weights)
        plan = rearrange_expert_weights_inplace(torch.from_numpy(old), torch.from_numpy(new), weights, None,
                                                ranks_per_node=seed % 3, allow_dropping_experts=True)
        moved += plan.total_rows_moved
        for layer in range(old.shape[0]):
            _check_layer(weights, before, new, layer, rank, per_rank, specs, f"sync case {seed}")
    assert torch.equal(bystander, torch.arange(10.0, device=device))
    return moved


def _async_cases(rank: int, world_size: int, num_cases: int) -> None:
    from moe_ext.eplb import rearrange_expert_weights_async

    device = _device(rank)
    for seed in range(100, 100 + num_cases):
        old, new, per_rank, specs = _random_case(seed, world_size)
        weights = _make_weights(old, rank, per_rank, specs, device, seed)
        before = _snapshot(weights)
        handle = rearrange_expert_weights_async(old, new, weights, allow_dropping_experts=True)
        for expected_layer in range(old.shape[0]):
            # Layers not committed yet still hold their old weights exactly.
            for layer in range(expected_layer, old.shape[0]):
                _assert_unchanged([weights[layer]], [before[layer]], f"async case {seed} before commit")
            assert handle.commit_next_layer() == expected_layer
            _check_layer(weights, before, new, expected_layer, rank, per_rank, specs, f"async case {seed}")
        assert handle.done
        with pytest.raises(ValueError, match="already committed"):
            handle.commit_next_layer()
        for layer in range(old.shape[0]):
            _check_layer(weights, before, new, layer, rank, per_rank, specs, f"async case {seed} at the end")


def _profile_and_identity(rank: int, world_size: int) -> None:
    from moe_ext.eplb import rearrange_expert_weights_inplace

    device = _device(rank)
    old, new, per_rank, specs = _random_case(7, world_size)
    weights = _make_weights(old, rank, per_rank, specs, device, 7)
    before = _snapshot(weights)
    rearrange_expert_weights_inplace(old, new, weights, None, is_profile=True, allow_dropping_experts=True)
    _assert_unchanged(weights, before, "is_profile")
    plan = rearrange_expert_weights_inplace(old, old, weights, None)
    assert plan.total_rows_moved == 0
    _assert_unchanged(weights, before, "identical maps")


def _refusals(rank: int, world_size: int) -> list:
    """Bad calls raise ValueError on every rank and leave every weight as it was (the maps drop
    experts at random: allowed here, refused by default - see test_rearrange_reliability.py)."""
    from moe_ext.eplb import rearrange_expert_weights_inplace

    device = _device(rank)
    old, new, per_rank, specs = _random_case(3, world_size)
    weights = _make_weights(old, rank, per_rank, specs, device, 3)
    before = _snapshot(weights)
    missing = new.copy()
    missing[0, 0] = old.max() + 1  # nobody holds it
    out_of_range = new.copy()
    out_of_range[-1, -1] = -3
    wrong_rows = [[torch.zeros(per_rank + 1, 2, device=device)] + layer[1:] for layer in weights]
    other_rank_differs = new.copy()
    if rank == world_size - 1:  # only one rank sees a different map: the ranks must agree to refuse
        other_rank_differs = old.copy()
    one_rank_bad_weights = [list(layer) for layer in weights]
    if rank == 0:
        one_rank_bad_weights[0][0] = torch.zeros(per_rank + 1, *weights[0][0].shape[1:], device=device,
                                                 dtype=weights[0][0].dtype)
    non_contiguous = [[torch.zeros(per_rank, 2, 4, device=device).transpose(1, 2)] for _ in weights]
    cases = {
        "missing expert": (old, missing, weights, None),
        "id out of range": (old, out_of_range, weights, None),
        "first dimension": (old, new, wrong_rows, None),
        "layer count": (old, new, weights[:-1], None),
        "maps differ between ranks": (old, other_rank_differs, weights, None),
        "one rank's weights are wrong": (old, new, one_rank_bad_weights, None),
        "rank_mapping keys": (old, new, weights, {0: 0, 5: 1}),
        "rank_mapping duplicates": (old, new, weights, {r: 0 for r in range(world_size)}),
        "non-contiguous rows": (old, new, non_contiguous, None),
    }
    messages = []
    for name, (o, n, w, mapping) in cases.items():
        with pytest.raises(ValueError) as refused:
            rearrange_expert_weights_inplace(o, n, w, None, rank_mapping=mapping, allow_dropping_experts=True)
        messages.append(f"{name}: {refused.value}")
        _assert_unchanged(weights, before, f"refused call '{name}'")
    return messages


def _scale(rank: int, world_size: int, old_ep: int, new_ep: int, seed: int) -> None:
    """Scale up (group = new ranks) or down (group = old ranks) with a rank mapping."""
    from moe_ext.eplb import rearrange_expert_weights_inplace

    device = _device(rank)
    rng = np.random.default_rng(seed)
    per_rank, num_layers = 3, 2
    specs = WEIGHT_SPECS[:2]
    experts = min(old_ep, new_ep) * per_rank
    # Old placement over old_ep ranks, new over new_ep, both holding experts [0, experts).
    old_small = np.stack([rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, old_ep * per_rank - experts)]))
                          for _ in range(num_layers)]).astype(np.int64)
    new_small = np.stack([rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, new_ep * per_rank - experts)]))
                          for _ in range(num_layers)]).astype(np.int64)
    if new_ep > old_ep:  # scale up: old rank r becomes new rank mapping[r]
        assert world_size == new_ep
        targets = sorted(rng.choice(new_ep, old_ep, replace=False).tolist())
        mapping = {r: targets[r] for r in range(old_ep)}
        held = np.full((num_layers, new_ep * per_rank), -1, dtype=np.int64)  # what each group rank holds now
        for r, t in mapping.items():
            held[:, t * per_rank:(t + 1) * per_rank] = old_small[:, r * per_rank:(r + 1) * per_rank]
        wanted = new_small
    else:  # scale down: the group is the old ranks; mapping[r] = new rank or -1
        assert world_size == old_ep
        kept = sorted(rng.choice(old_ep, new_ep, replace=False).tolist())
        mapping = {r: (kept.index(r) if r in kept else -1) for r in range(old_ep)}
        held = old_small
        wanted = np.full((num_layers, old_ep * per_rank), -1, dtype=np.int64)
        for r in kept:
            n = mapping[r]
            wanted[:, r * per_rank:(r + 1) * per_rank] = new_small[:, n * per_rank:(n + 1) * per_rank]
    weights = _make_weights(held, rank, per_rank, specs, device, seed)
    before = _snapshot(weights)
    rearrange_expert_weights_inplace(torch.from_numpy(old_small), torch.from_numpy(new_small), weights, None,
                                     rank_mapping=mapping)
    for layer in range(num_layers):
        _check_layer(weights, before, wanted, layer, rank, per_rank, specs, f"scale {old_ep}->{new_ep}")


def _suite(rank: int, world_size: int, num_sync: int, num_async: int, scales: list) -> dict:
    moved = _sync_cases(rank, world_size, num_sync)
    _async_cases(rank, world_size, num_async)
    _profile_and_identity(rank, world_size)
    messages = _refusals(rank, world_size)
    for seed, (old_ep, new_ep) in enumerate(scales):
        _scale(rank, world_size, old_ep, new_ep, 500 + seed)
    return {"moved": moved, "messages": messages}


def _scale_only(rank: int, world_size: int, scales: list) -> None:
    for seed, (old_ep, new_ep) in enumerate(scales):
        _scale(rank, world_size, old_ep, new_ep, 700 + seed)


# --------------------------------------------------------------------- tests


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, num_sync, num_async, scales", [
    (2, 25, 6, [(1, 2), (2, 1)]),
    (3, 12, 4, []),
    (4, 10, 3, [(2, 4), (4, 2)]),
])
def test_rearrange_suite(world_size, num_sync, num_async, scales):
    if not _world_sizes_available(world_size):
        pytest.skip(f"needs {world_size} GPUs for the nccl backend")
    results = run_distributed(_suite, world_size, num_sync, num_async, scales, backend=BACKEND, timeout=240)
    assert results[0]["moved"] > 0  # the random cases did move rows
    assert all(r["moved"] == results[0]["moved"] for r in results)  # same plan everywhere
    messages = results[0]["messages"]
    assert any("no rank holds it" in m for m in messages)
    assert any("first dimension" in m and "slots_per_rank" in m for m in messages)
    assert any("different maps" in m for m in messages)
    assert any("another rank" in m or "first dimension" in m for m in results[1]["messages"])


@pytest.mark.distributed
def test_rearrange_eight_ranks():
    if not _world_sizes_available(8):
        pytest.skip("needs 8 GPUs for the nccl backend")
    run_distributed(_suite, 8, 3, 1, [(4, 8), (8, 4)], backend=BACKEND, timeout=300)
