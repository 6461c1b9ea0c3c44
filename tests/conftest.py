"""Shared pytest fixtures: the backends to run on, and GPU marks that skip cleanly."""

from __future__ import annotations

import pytest
import torch


def backend_params() -> list:
    """'cpu' always; 'cuda' marked, and skipped without a GPU (never counted as passing)."""
    return [
        "cpu",
        pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
    ]


@pytest.fixture(params=backend_params())
def device(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not any(m.name == "skipif" for m in item.own_markers):
            item.add_marker(skip)
