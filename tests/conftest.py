"""Shared pytest setup: deterministic seeds, small thread counts (CI has 2 cores), the GPU marker."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)

pytest_plugins = ["postgres"]  # the postgres_url / fresh_pg_url fixtures (tests/postgres.py)


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """Compiled kernels and the kernel DB go to a fresh dir: tests never read or pollute ~/.cache/moetune."""
    root = tmp_path_factory.mktemp("moetune-cache")
    old = {name: os.environ.get(name) for name in ("MOETUNE_CACHE_DIR", "MOETUNE_DB")}
    os.environ["MOETUNE_CACHE_DIR"] = str(root)
    os.environ["MOETUNE_DB"] = str(root / "kernels.db")
    yield
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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
