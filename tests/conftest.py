"""Shared pytest setup: deterministic seeds, small thread counts (CI has 2 cores), the GPU marker."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """Compiled kernels go to a fresh cache dir: tests never read (or pollute) the user's ~/.cache/moetune."""
    old = os.environ.get("MOETUNE_CACHE_DIR")
    os.environ["MOETUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("moetune-cache"))
    yield
    if old is None:
        os.environ.pop("MOETUNE_CACHE_DIR", None)
    else:
        os.environ["MOETUNE_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
