"""Triton align: counts, padded offsets, the sorted row index and its inverse, with no host synchronisation.

Legend: T tokens, K top-k, S = T*K slots (s = t*K + k), E experts, E_PAD = next pow2 of E, BM rows per block,
NB = ops.max_blocks(S, E, BM) blocks (static: a decode step never waits for the row counts), P = NB*BM rows.

One program (one CTA) does it all in three passes over slots, each BLOCK_S slots at a time against all E
experts (a (BLOCK_S, E_PAD) one-hot in registers; O(S*E) work, a few microseconds for a decode batch):
  1. counts[e] = number of slots routed to e; padded counts, inclusive ends and starts (tl.cumsum)
  2. rank of each slot among the earlier slots of its expert (a running count per expert plus a cumsum of the
     chunk's one-hot), position p = start[e] + rank: writes token, weight, slot at p and inverse[s] = p
  3. every position p that no slot takes (rows past counts[e] in e's segment, and all rows past offsets[E]):
     pad values (token 0, weight 0, slot -1); each block's expert (-1 for empty blocks past offsets[E])
Passes 2 and 3 write disjoint positions, so they need no barrier between them. The layout is exactly
kernels/reference.py's `align` on the used blocks (ascending slot order within an expert).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moetune.kernels.triton.common import aot_spec, next_pow2


@triton.jit
def _align_kernel(
    # pointers
    ids_ptr,  # (S,) int32 expert of each slot
    w_ptr,  # (S,) fp32 routing weight of each slot
    token_ptr,  # (P,) int32 out
    sorted_w_ptr,  # (P,) fp32 out
    slot_ptr,  # (P,) int32 out
    block_expert_ptr,  # (NB,) int32 out
    inverse_ptr,  # (S,) int32 out
    counts_ptr,  # (E,) int32 out
    offsets_ptr,  # (E+1,) int32 out
    # dimensions
    S,
    NB,
    BM,
    TOPK,
    # meta-parameters
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    lanes = tl.arange(0, BLOCK_S)

    # 1. counts and padded offsets
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + lanes
        e = tl.load(ids_ptr + s, mask=s < S, other=E_PAD)  # E_PAD matches no column
        counts += tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(counts_ptr + cols, counts, mask=col_ok)
    tl.store(offsets_ptr + 1 + cols, ends, mask=col_ok)
    tl.store(offsets_ptr + cols, tl.zeros((E_PAD,), dtype=tl.int32), mask=cols == 0)

    # 2. place every slot: p = start of its expert + its rank among that expert's earlier slots
    running = tl.zeros((E_PAD,), dtype=tl.int32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + lanes
        s_ok = s < S
        e = tl.load(ids_ptr + s, mask=s_ok, other=E_PAD)
        hot = (e[:, None] == cols[None, :]).to(tl.int32)  # (BLOCK_S, E_PAD)
        rank = tl.cumsum(hot, axis=0) + running[None, :] - 1
        pos = tl.sum(hot * (starts[None, :] + rank), axis=1)
        tl.store(token_ptr + pos, s // TOPK, mask=s_ok)
        tl.store(sorted_w_ptr + pos, tl.load(w_ptr + s, mask=s_ok, other=0.0), mask=s_ok)
        tl.store(slot_ptr + pos, s, mask=s_ok)
        tl.store(inverse_ptr + s, pos, mask=s_ok)
        running += tl.sum(hot, axis=0)

    # 3. pad rows (positions no slot took) and each block's expert
    n_rows = NB * BM
    for p0 in range(0, n_rows, BLOCK_S):
        p = p0 + lanes
        inside = (starts[None, :] <= p[:, None]) & (p[:, None] < ends[None, :]) & col_ok[None, :]
        taken = tl.sum((inside & (p[:, None] - starts[None, :] < counts[None, :])).to(tl.int32), axis=1)
        pad = (taken == 0) & (p < n_rows)
        tl.store(token_ptr + p, tl.zeros((BLOCK_S,), dtype=tl.int32), mask=pad)
        tl.store(sorted_w_ptr + p, tl.zeros((BLOCK_S,), dtype=tl.float32), mask=pad)
        tl.store(slot_ptr + p, tl.full((BLOCK_S,), -1, tl.int32), mask=pad)
    for b0 in range(0, NB, BLOCK_S):
        b = b0 + lanes
        first = b * BM
        expert = tl.sum(((ends[None, :] <= first[:, None]) & col_ok[None, :]).to(tl.int32), axis=1)
        expert = tl.where(first < total, expert, -1)
        tl.store(block_expert_ptr + b, expert, mask=b < NB)


def constexprs(problem, point) -> dict:
    return {"E": problem["E"], "E_PAD": next_pow2(problem["E"]), "BLOCK_S": point["BLOCK_S"]}


def launch(kernel, problem, point, ids, weights, token, sorted_w, slot, block_expert, inverse, counts, offsets):
    s = ids.numel()
    kernel[(1,)](
        ids,
        weights,
        token,
        sorted_w,
        slot,
        block_expert,
        inverse,
        counts,
        offsets,
        s,
        block_expert.shape[0],
        problem["BM"],
        problem["K"],
        **constexprs(problem, point),
        num_warps=point["num_warps"],
        num_stages=1,
    )


def aot(problem, point, dtype: str):
    types = {
        "ids_ptr": "*i32",
        "w_ptr": "*fp32",
        "token_ptr": "*i32",
        "sorted_w_ptr": "*fp32",
        "slot_ptr": "*i32",
        "block_expert_ptr": "*i32",
        "inverse_ptr": "*i32",
        "counts_ptr": "*i32",
        "offsets_ptr": "*i32",
    }
    return aot_spec(_align_kernel, types, constexprs(problem, point), point["num_warps"], 1)
