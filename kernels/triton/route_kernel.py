"""Triton router: logits (in-kernel GEMM or given), score function, group limit, top-k, renormalise, scale.

Legend: T tokens, H hidden, E experts, K top-k, E_PAD = max(16, next pow2 of E), G groups (n_group).

One program routes BLOCK_T tokens with all E logits in registers, so every router kind is one launch:
  logits   LOGITS_FUSED: x (T, H) @ weight (E, H)^T accumulated in fp32 over H in BLOCK_K steps (tl.dot, so
           BLOCK_T >= 16 and E_PAD >= 16; fp32 inputs use IEEE products, bf16/fp16 products are exact in fp32);
           else read from a (T, E) fp32 tensor that torch's matmul produced (config logits="torch": cuBLAS
           spreads a decode step's GEMV over every SM, where the fused kernel runs it on ceil(T/BLOCK_T) SMs)
  scores   SCORE 0 softmax over E, 1 sigmoid, 2 the raw logits (topk_softmax / topk_sigmoid / topk_hard)
  choice   scores (+ correction bias for softmax / sigmoid), group-limited when N_GROUP > 1: the best
           TOPK_GROUP groups by their max (or top-2 sum) stay eligible
  top-k    K rounds of argmax over the experts not chosen yet (ties to the lower expert id; NaN scores rank
           last, so a broken router still yields K distinct ids in [0, E)), the chosen score gathered in the same pass
  weights  POST 0 the chosen scores, 1 softmax over the K chosen logits, 2 their sigmoid, 3 ones (topk_hard);
           then / sum (NORM), then * scale
The semantics are reference.select_experts' (kernels/reference.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moetune.kernels.triton.common import aot_spec, next_pow2

SCORES = {"softmax": 0, "sigmoid": 1, "topk_softmax": 2, "topk_sigmoid": 2, "topk_hard": 2}
POSTS = {"softmax": 0, "sigmoid": 0, "topk_softmax": 1, "topk_sigmoid": 2, "topk_hard": 3}


@triton.jit
def _route_kernel(
    # pointers
    x_ptr,  # (T, H) activations (LOGITS_FUSED)
    w_ptr,  # (E, H) router weight, x's dtype (LOGITS_FUSED)
    bias_ptr,  # (E,) router bias, x's dtype (LOGITS_FUSED and HAS_BIAS)
    logits_ptr,  # (T, E) fp32 logits, bias included (not LOGITS_FUSED)
    cbias_ptr,  # (E,) fp32 score-correction bias (HAS_CBIAS)
    weights_ptr,  # (T, K) fp32 out
    ids_ptr,  # (T, K) int32 out
    # dimensions
    T,
    H,
    scale,  # fp32 routed_scaling_factor
    # strides
    stride_xt,
    stride_we,
    # meta-parameters
    E: tl.constexpr,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    SCORE: tl.constexpr,
    POST: tl.constexpr,
    NORM: tl.constexpr,
    N_GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CBIAS: tl.constexpr,
    LOGITS_FUSED: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 tiles (no TF32: the reference is fp32), else "tf32" (unused)
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E

    # ---- logits (BLOCK_T, E_PAD) fp32
    if LOGITS_FUSED:
        acc = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, H, BLOCK_K):
            k_ok = (k0 + ks) < H
            xa = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * stride_xt + (k0 + ks)[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            wb = tl.load(
                w_ptr + cols[None, :] * stride_we + (k0 + ks)[:, None],
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )  # (BLOCK_K, E_PAD)
            acc = tl.dot(xa, wb, acc, input_precision=PRECISION)
        logits = acc
        if HAS_BIAS:
            logits += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        logits = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=row_ok[:, None] & col_ok[None, :])
    neg = float("-inf")
    logits = tl.where(col_ok[None, :], logits, neg)

    # ---- scores and the choice they make
    if SCORE == 0:
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        scores = p / tl.sum(p, axis=1)[:, None]
    elif SCORE == 1:
        scores = tl.sigmoid(logits)
    else:
        scores = logits
    choice = scores
    if HAS_CBIAS:
        choice = choice + tl.load(cbias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    choice = tl.where(col_ok[None, :] & (choice == choice), choice, neg)  # NaN (a broken router) ranks last

    # ---- group limit: keep the TOPK_GROUP best of N_GROUP groups of E // N_GROUP experts
    if N_GROUP > 1:
        gid = cols // (E // N_GROUP)
        g_idx = tl.arange(0, G_PAD)
        gscore = tl.full((BLOCK_T, G_PAD), neg, tl.float32)
        for g in tl.static_range(N_GROUP):
            vals = tl.where((gid == g)[None, :] & col_ok[None, :], choice, neg)
            best = tl.max(vals, axis=1)
            if GROUP_TOP2:
                first = tl.min(tl.where(vals == best[:, None], cols[None, :], E_PAD), axis=1)
                best += tl.max(tl.where(cols[None, :] == first[:, None], neg, vals), axis=1)
            gscore = tl.where(g_idx[None, :] == g, best[:, None], gscore)
        keep = tl.zeros((BLOCK_T, G_PAD), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gscore, axis=1)
            pick = tl.min(tl.where(gscore == best[:, None], g_idx[None, :], G_PAD), axis=1)
            hit = g_idx[None, :] == pick[:, None]
            keep = tl.where(hit, 1, keep)
            gscore = tl.where(hit, neg, gscore)
        keep_e = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
        for g in tl.static_range(N_GROUP):
            kept = tl.sum(tl.where(g_idx[None, :] == g, keep, 0), axis=1)  # (BLOCK_T,) 0 / 1
            keep_e = tl.where((gid == g)[None, :], kept[:, None], keep_e)
        choice = tl.where(keep_e > 0, choice, neg)

    # ---- top-k by K rounds of argmax
    k_idx = tl.arange(0, K_PAD)
    top_ids = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    top_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    taken = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
    for k in tl.static_range(K):
        free = (taken == 0) & col_ok[None, :]  # an expert, not chosen yet: ids stay in [0, E) and distinct
        best = tl.max(tl.where(free, choice, neg), axis=1)
        pick = tl.min(tl.where(free & (choice >= best[:, None]), cols[None, :], E_PAD), axis=1)
        hit = cols[None, :] == pick[:, None]
        taken = tl.where(hit, 1, taken)
        chosen = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        top_ids = tl.where(k_idx[None, :] == k, pick[:, None], top_ids)
        top_w = tl.where(k_idx[None, :] == k, chosen[:, None], top_w)
        choice = tl.where(hit, neg, choice)

    # ---- weights
    k_ok = k_idx < K
    if POST == 1:
        masked = tl.where(k_ok[None, :], top_w, neg)
        p = tl.exp(masked - tl.max(masked, axis=1)[:, None])
        top_w = p / tl.sum(p, axis=1)[:, None]
    elif POST == 2:
        top_w = tl.sigmoid(top_w)
    elif POST == 3:
        top_w = tl.where(k_ok[None, :], 1.0, 0.0) + tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    top_w = tl.where(k_ok[None, :], top_w, 0.0)
    if NORM:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    top_w = top_w * scale
    out = rows[:, None] * K + k_idx[None, :]
    mask = row_ok[:, None] & k_ok[None, :]
    tl.store(weights_ptr + out, top_w, mask=mask)
    tl.store(ids_ptr + out, top_ids, mask=mask)


def constexprs(problem, point, dtype: str) -> dict:
    """The kernel's constexprs for a route problem (ir/program.py) and a point of schedules/triton.py."""
    e, router = problem["E"], problem["router"]
    return {
        "E": e,
        "K": problem["K"],
        "E_PAD": max(16, next_pow2(e)),
        "K_PAD": next_pow2(problem["K"]),
        "SCORE": SCORES[router],
        "POST": POSTS[router],
        "NORM": bool(problem["norm"]),
        "N_GROUP": problem["n_group"],
        "G_PAD": next_pow2(problem["n_group"]),
        "TOPK_GROUP": problem["topk_group"],
        "GROUP_TOP2": problem["group_score"] == "top2_sum",
        "HAS_BIAS": bool(problem["bias"]),
        "HAS_CBIAS": bool(problem["cbias"]) and SCORES[router] < 2,
        "LOGITS_FUSED": point["logits"] == "fused",
        "PRECISION": "ieee" if dtype == "float32" else "tf32",
        "BLOCK_T": point["BLOCK_T"],
        "BLOCK_K": point["BLOCK_K"],
    }


def launch(kernel, problem, point, x, weight, bias, logits, cbias, weights, ids) -> None:
    """Launch on x (T, H); `logits` (T, E) fp32 when point["logits"] == "torch", else None."""
    t, h = x.shape
    meta = constexprs(problem, point, str(x.dtype).removeprefix("torch."))
    dummy = weights  # pointer arguments a constexpr branch never reads
    grid = (triton.cdiv(t, point["BLOCK_T"]),)
    kernel[grid](
        x,
        weight,
        bias if bias is not None else dummy,
        logits if logits is not None else dummy,
        cbias if cbias is not None else dummy,
        weights,
        ids,
        t,
        h,
        float(problem["scale"]),
        x.stride(0),
        weight.stride(0),
        **meta,
        num_warps=point["num_warps"],
        num_stages=point["num_stages"],
    )


def aot(problem, point, dtype: str):
    """The AotSpec of this route kernel (x's dtype `dtype`)."""
    ty = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}[dtype]
    types = {
        "x_ptr": ty,
        "w_ptr": ty,
        "bias_ptr": ty,
        "logits_ptr": "*fp32",
        "cbias_ptr": "*fp32",
        "weights_ptr": "*fp32",
        "ids_ptr": "*i32",
        "scale": "fp32",
    }
    h = problem["H"]
    return aot_spec(
        _route_kernel,
        types,
        constexprs(problem, point, dtype),
        point["num_warps"],
        point["num_stages"],
        {"H": h, "stride_xt": h, "stride_we": h},
    )
