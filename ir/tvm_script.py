"""TVMScript of the sequential, data-dependent ops: top-k selection (route) and the align counting sort.

Python-level constants (E, K, the router kind, ...) specialise each function per Problem at parse time, so
the compiled code has no branches on them. Legend: T tokens, E experts, K top-k, BM rows per block,
NB blocks, NG groups, TG groups kept, GS = E / NG experts per group.
Ties pick the lowest expert index (torch.topk leaves them unspecified; random inputs have none).
"""

from __future__ import annotations

from tvm.script import tirx as T

from moetune.ir.program import Problem

NEG = -3.0e38  # below every finite score; marks an expert as not eligible
TAKEN = -3.4e38  # below NEG: marks an expert as already chosen


def route_select_func(problem: Problem):
    """logits (T,E) f32, cbias (E,) f32 -> weights (T,K) f32, ids (T,K) i32, per the router kind.

    Kinds as in model/config/moe_config.py: softmax / sigmoid score first; topk_softmax / topk_sigmoid /
    topk_hard choose on the raw logits, then weigh the chosen: softmax over K, sigmoid, or 1.0 (unweighted
    selection)."""
    e_, k_, router = problem["E"], problem["K"], problem["router"]
    ng, tg, top2, cbias = (
        problem["n_group"],
        problem["topk_group"],
        problem["group_score"] == "top2_sum",
        problem["cbias"],
    )
    gs_ = e_ // ng
    softmax, sigmoid = router == "softmax", router == "sigmoid"
    topk_softmax, topk_sigmoid = router == "topk_softmax", router == "topk_sigmoid"
    topk_hard = router == "topk_hard"  # chosen on the raw logits like topk_*, every weight 1 (then norm, scale)
    renorm = problem["norm"] or topk_softmax  # topk_softmax: exp(l - max) then renormalise = softmax over K
    scale = float(problem["scale"])

    @T.prim_func
    def select(l_h: T.handle, cb: T.Buffer((e_,), "float32"), w_h: T.handle, i_h: T.handle):
        T.func_attr({"global_symbol": "select", "tirx.noalias": True})
        nt = T.int32()
        logits = T.match_buffer(l_h, (nt, e_), "float32")
        wout = T.match_buffer(w_h, (nt, k_), "float32")
        iout = T.match_buffer(i_h, (nt, k_), "int32")
        for t in T.parallel(nt):
            sc = T.alloc_buffer((e_,), "float32", scope="local")  # scores (weights come from these)
            ch = T.alloc_buffer((e_,), "float32", scope="local")  # choice values
            acc = T.alloc_buffer((2,), "float32", scope="local")
            best = T.alloc_buffer((1,), "int32", scope="local")
            if softmax:
                acc[0] = T.float32(NEG)
                for e in range(e_):
                    acc[0] = T.max(acc[0], logits[t, e])
                acc[1] = T.float32(0)
                for e in range(e_):
                    sc[e] = T.exp(logits[t, e] - acc[0])
                    acc[1] = acc[1] + sc[e]
                for e in range(e_):
                    sc[e] = sc[e] / acc[1]
            elif sigmoid:
                for e in range(e_):
                    sc[e] = T.sigmoid(logits[t, e])
            else:
                for e in range(e_):
                    sc[e] = logits[t, e]
            for e in range(e_):
                if cbias:
                    ch[e] = sc[e] + cb[e]
                else:
                    ch[e] = sc[e]
            if ng > 1:
                gsc = T.alloc_buffer((ng,), "float32", scope="local")
                keep = T.alloc_buffer((ng,), "int32", scope="local")
                for g in range(ng):
                    acc[0] = T.float32(NEG)
                    acc[1] = T.float32(NEG)
                    for j in range(gs_):
                        if ch[g * gs_ + j] > acc[0]:
                            acc[1] = acc[0]
                            acc[0] = ch[g * gs_ + j]
                        elif ch[g * gs_ + j] > acc[1]:
                            acc[1] = ch[g * gs_ + j]
                    if top2:
                        gsc[g] = acc[0] + acc[1]
                    else:
                        gsc[g] = acc[0]
                    keep[g] = 0
                for _ in range(tg):
                    best[0] = -1
                    for g in range(ng):
                        if keep[g] == 0:
                            # two ifs, not `or`: TIR's `or` does not short-circuit and gsc[-1] is out of bounds
                            if best[0] < 0:  # noqa: SIM114
                                best[0] = g
                            elif gsc[g] > gsc[best[0]]:
                                best[0] = g
                    keep[best[0]] = 1
                for e in range(e_):
                    if keep[e // gs_] == 0:
                        ch[e] = T.float32(NEG)
            for j in range(k_):
                best[0] = 0
                acc[0] = ch[0]
                for e in range(1, e_):  # branch-free (selects, not jumps): the comparisons are unpredictable
                    best[0] = T.Select(ch[e] > acc[0], e, best[0])
                    acc[0] = T.Select(ch[e] > acc[0], ch[e], acc[0])  # as the branch did, NaN included
                iout[t, j] = best[0]
                wout[t, j] = sc[best[0]]
                ch[best[0]] = T.float32(TAKEN)
            if topk_softmax:
                acc[0] = T.float32(NEG)
                for j in range(k_):
                    acc[0] = T.max(acc[0], wout[t, j])
                for j in range(k_):
                    wout[t, j] = T.exp(wout[t, j] - acc[0])
            if topk_sigmoid:
                for j in range(k_):
                    wout[t, j] = T.sigmoid(wout[t, j])
            if topk_hard:
                for j in range(k_):
                    wout[t, j] = T.float32(1)
            if renorm:
                acc[1] = T.float32(0)
                for j in range(k_):
                    acc[1] = acc[1] + wout[t, j]
                for j in range(k_):
                    wout[t, j] = wout[t, j] / (acc[1] + T.float32(1e-20))
            for j in range(k_):
                wout[t, j] = wout[t, j] * T.float32(scale)

    return select


def align_func(problem: Problem):
    """Counting sort of the T*K slots by expert, padded per expert to a multiple of BM.

    Args: ids (T,K) i32, w (T,K) f32 -> tok, wt, slot (NBmax,BM), bexp (NBmax,), inv (T,K), counts (E,),
    offsets (E+1,), nblocks (1,). NBmax is the caller's upper bound (ops.max_blocks); rows past
    nblocks*BM are left untouched. Sequential by design: O(T*K + E), far below any GEMM's cost.
    """
    e_, k_, bm = problem["E"], problem["K"], problem["BM"]

    @T.prim_func
    def align(
        ids_h: T.handle,
        w_h: T.handle,
        tok_h: T.handle,
        wt_h: T.handle,
        slot_h: T.handle,
        bexp_h: T.handle,
        inv_h: T.handle,
        counts: T.Buffer((e_,), "int32"),
        offsets: T.Buffer((e_ + 1,), "int32"),
        nblocks: T.Buffer((1,), "int32"),
    ):
        T.func_attr({"global_symbol": "align", "tirx.noalias": True})
        nt = T.int32()
        nbmax = T.int32()
        ids = T.match_buffer(ids_h, (nt, k_), "int32")
        w = T.match_buffer(w_h, (nt, k_), "float32")
        tok = T.match_buffer(tok_h, (nbmax, bm), "int32")
        wt = T.match_buffer(wt_h, (nbmax, bm), "float32")
        slot = T.match_buffer(slot_h, (nbmax, bm), "int32")
        bexp = T.match_buffer(bexp_h, (nbmax,), "int32")
        inv = T.match_buffer(inv_h, (nt, k_), "int32")
        cursor = T.alloc_buffer((e_,), "int32")
        for e in range(e_):
            counts[e] = 0
        for t in range(nt):
            for k in range(k_):
                counts[ids[t, k]] = counts[ids[t, k]] + 1
        offsets[0] = 0
        for e in range(e_):
            offsets[e + 1] = offsets[e] + (counts[e] + bm - 1) // bm * bm
            cursor[e] = offsets[e]
        nblocks[0] = offsets[e_] // bm
        for e in range(e_):
            for b in range(offsets[e] // bm, offsets[e + 1] // bm):
                bexp[b] = e
                for m in range(bm):
                    tok[b, m] = 0
                    wt[b, m] = T.float32(0)
                    slot[b, m] = -1
        for t in range(nt):
            for k in range(k_):
                p = cursor[ids[t, k]]
                cursor[ids[t, k]] = p + 1
                tok[p // bm, p % bm] = t
                wt[p // bm, p % bm] = w[t, k]
                slot[p // bm, p % bm] = t * k_ + k
                inv[t, k] = p

    return align
