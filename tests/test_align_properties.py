"""Property tests of align's invariants (kernels/ops.py `Aligned`) for the reference and every backend.

Legend: T tokens, K top-k, E experts, S = T*K routed rows (slots s = t*K + k), BM rows per block, NB blocks.

Hypothesis draws T, E, K, BM and ids that are either top-k like (K distinct experts per row) or arbitrary
(repeats within a row: align must not care), with arbitrary fp32 weights. Every implementation must produce
the documented layout: per-expert counts, BM-padded offsets, one expert per block, the scatter index as the
inverse of the gather, and inert pad rows. The backends must also equal the reference exactly.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetune.ir.program import Problem
from moetune.ir.target import resolve_target
from moetune.kernels import reference as ref
from moetune.kernels.ops import Aligned
from moetune.kernels.registry import default_config, get_impl

# deadline=None: the first run of each (E, K, BM) compiles a TVM module (~0.3 s).
FAST = settings(max_examples=60, deadline=None)
TVM = settings(FAST, max_examples=40)  # every new (E, K, BM) is a compile
INT_POISON = -12345


@pytest.fixture(scope="module", autouse=True)
def _tvm_cache(tmp_path_factory):
    """Compiled TVM modules go to a fresh dir (tvm_build reads $MOETUNE_CACHE_DIR at build time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOETUNE_CACHE_DIR", str(tmp_path_factory.mktemp("moetune-cache")))
        yield


@contextlib.contextmanager
def _poisoned_empty():
    """torch.empty returns NaN / a sentinel: a pad row a kernel never writes cannot pass as zero-filled memory."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else INT_POISON)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", poisoned)
        yield


@st.composite
def align_inputs(draw):
    """(weights (T, K) fp32, ids (T, K) int32, E, BM)."""
    e = draw(st.integers(1, 12))
    k = draw(st.integers(1, e))
    t = draw(st.integers(1, 40))
    bm = draw(st.sampled_from([1, 2, 4, 8]))
    if draw(st.booleans()):  # top-k like: K distinct experts per row
        rows = [draw(st.permutations(range(e)))[:k] for _ in range(t)]
    else:  # arbitrary, repeats allowed
        rows = draw(st.lists(st.lists(st.integers(0, e - 1), min_size=k, max_size=k), min_size=t, max_size=t))
    floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    weights = draw(st.lists(st.lists(floats, min_size=k, max_size=k), min_size=t, max_size=t))
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(rows, dtype=torch.int32), e, bm


def _run(impl: str, weights: torch.Tensor, ids: torch.Tensor, e: int, bm: int) -> Aligned:
    if impl == "reference":
        return ref.align(weights, ids, e, bm)
    problem = Problem.make("align", "int32", E=e, K=ids.shape[1], BM=bm)
    target = resolve_target("cpu")
    with _poisoned_empty():
        return get_impl("align", impl).fn(problem, default_config(problem, impl, target), target, weights, ids)


def _check_invariants(al: Aligned, weights: torch.Tensor, ids: torch.Tensor, e: int, bm: int) -> None:
    t, k = ids.shape
    s = t * k
    flat_ids = ids.reshape(-1).long()
    nb = al.num_blocks
    assert al.sorted_token.shape == al.sorted_weight.shape == al.sorted_slot.shape == (nb, bm)
    assert al.block_expert.shape == (nb,) and al.inverse.shape == (t, k)

    # counts: rows per expert, S in all
    counts = al.counts.long()
    assert al.counts.shape == (e,) and int(counts.sum()) == s
    assert torch.equal(counts, torch.bincount(flat_ids, minlength=e))

    # offsets: prefix sum of the counts padded up to multiples of BM; the last is NB*BM
    offsets = al.offsets.long()
    padded = (counts + bm - 1) // bm * bm
    assert al.offsets.shape == (e + 1,) and int(offsets[0]) == 0
    assert torch.equal(offsets[1:], padded.cumsum(0))
    assert int(offsets[e]) == nb * bm

    # blocks: expert e owns exactly the blocks [offsets[e]/BM, offsets[e+1]/BM) (so block_expert is sorted)
    block_expert = al.block_expert.long()
    assert bool((block_expert.diff() >= 0).all())
    for x in range(e):
        owned = (block_expert == x).nonzero().flatten()
        assert torch.equal(owned, torch.arange(int(offsets[x]) // bm, int(offsets[x + 1]) // bm))

    # the scatter index is the inverse permutation of the gather: sorted_slot[inverse[s]] == s
    slot = al.sorted_slot.reshape(-1).long()
    pos = al.inverse.reshape(-1).long()
    assert bool(((pos >= 0) & (pos < nb * bm)).all())
    assert torch.equal(slot[pos], torch.arange(s))

    # pads (every position no slot maps to): slot -1, token 0, weight 0
    is_pad = torch.ones(nb * bm, dtype=torch.bool)
    is_pad[pos] = False
    assert bool((slot[is_pad] == -1).all())
    assert bool((al.sorted_token.reshape(-1)[is_pad] == 0).all())
    assert bool((al.sorted_weight.reshape(-1)[is_pad] == 0).all())

    # an expert's rows are contiguous: the first counts[e] positions of its padded segment
    start = offsets[flat_ids]
    assert bool(((pos >= start) & (pos < start + counts[flat_ids])).all())

    # each row carries its slot's token and weight
    assert torch.equal(al.sorted_token.reshape(-1)[pos].long(), torch.arange(s) // k)
    assert torch.equal(al.sorted_weight.reshape(-1)[pos], weights.reshape(-1))


@FAST
@given(align_inputs())
def test_reference_align_invariants(inputs):
    weights, ids, e, bm = inputs
    _check_invariants(_run("reference", weights, ids, e, bm), weights, ids, e, bm)


def _check_backend(backend: str, inputs) -> None:
    weights, ids, e, bm = inputs
    got = _run(backend, weights, ids, e, bm)
    _check_invariants(got, weights, ids, e, bm)
    want = ref.align(weights, ids, e, bm)
    for name in ("sorted_token", "sorted_weight", "sorted_slot", "block_expert", "inverse", "counts", "offsets"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@FAST
@given(align_inputs())
def test_torch_align_invariants(inputs):
    _check_backend("torch", inputs)


@TVM
@given(align_inputs())
def test_tvm_align_invariants(inputs):
    _check_backend("tvm", inputs)
