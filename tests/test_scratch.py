"""kernels/scratch.py: launcher scratch reused per name, dtype and thread; and a layer stays exact when its
kernels' scratch holds a previous, larger call's values."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import rel_err

from moetune.kernels import scratch as sc
from moetune.model import MoE, MoEConfig, TunedMoE


@pytest.fixture(autouse=True)
def _fresh_pool():
    sc.release()
    yield
    sc.release()


def test_same_name_and_dtype_reuse_one_buffer_grown_as_needed():
    a = sc.scratch("t", (4, 8), torch.float32)
    b = sc.scratch("t", (2, 8), torch.float32)
    assert b.shape == (2, 8) and b.data_ptr() == a.data_ptr()
    c = sc.scratch("t", (16, 8), torch.float32)  # larger: a new buffer, which is then the one kept
    assert c.shape == (16, 8) and c.is_contiguous()
    assert sc.scratch("t", (3,), torch.float32).data_ptr() == c.data_ptr()


def test_names_dtypes_and_threads_do_not_share():
    a = sc.scratch("t", (8,), torch.float32)
    assert sc.scratch("u", (8,), torch.float32).data_ptr() != a.data_ptr()
    i = sc.scratch("t", (8,), torch.int32)
    assert i.dtype == torch.int32 and i.data_ptr() != a.data_ptr()
    other = []
    th = threading.Thread(target=lambda: other.append(sc.scratch("t", (8,), torch.float32).data_ptr()))
    th.start()
    th.join()
    assert other[0] != a.data_ptr()


def test_large_requests_are_not_kept_and_release_drops_the_pool(monkeypatch):
    monkeypatch.setattr(sc, "MAX_BYTES", 64)
    big = sc.scratch("t", (32,), torch.float32)  # 128 bytes > 64: fresh each call
    assert big.shape == (32,) and sc.release() == 0
    small = sc.scratch("t", (8,), torch.float32)  # 32 bytes: kept
    assert sc.scratch("t", (8,), torch.float32).data_ptr() == small.data_ptr()
    assert sc.release() == 32
    assert sc.release() == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_is_exact_after_a_larger_call_left_its_scratch(dtype):
    """gemm2's per-slot scratch and the GEMMs' accumulators are reused: a small call after a large one reads
    only what it wrote (stale rows past its own would show up as errors)."""
    torch.manual_seed(0)
    cfg = MoEConfig(64, 32, 8, 2, dtype=dtype)
    ref = MoE(cfg)
    tuned = TunedMoE.from_module(ref, backends=("tvm",), db=False)
    for t in (96, 5, 96, 1):
        x = torch.randn(t, 64).to(cfg.torch_dtype)
        want, got = ref(x), tuned(x)
        want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
        tol = 1e-5 if dtype == "float32" else 2e-2
        assert rel_err(got.float(), want.float()) <= tol, t
