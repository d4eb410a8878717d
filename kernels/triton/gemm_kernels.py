"""Triton grouped GEMMs: gemm1 (gate_up + activation) and gemm2 (down + routing weight + combine), and their
quantized forms qgemm1 / qgemm2 (w8a16 / w4a16: the same kernels with constexpr QUANT, kernels/triton/quant_tiles.py).

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K slots, BM rows per aligned block,
NB blocks, P = NB*BM padded rows, U = 2 for gated experts (gate_up rows [gate | up]) else 1.

Tiling. Both GEMMs run every expert in one launch over the padded row space of the align output: a program
computes a BLOCK_M x BLOCK_N tile of one aligned block (one expert). BLOCK_M divides BM when BM >= 16; when
BM < 16 (CPU-lowered programs) the tile has 16 rows and those past BM are masked. Programs are ordered in
groups of GROUP_M row tiles per column tile (Triton tutorial 03): consecutive row tiles mostly belong to the
same expert, so its weight tile is read from L2 rather than HBM. GROUP_M is a runtime argument (it changes
no code, so it costs no compile). An empty block (block_expert -1) is skipped: gemm1 writes zeros, gemm2
writes nothing (kernels/ops.py).

gemm1 reads activation rows through the sorted token index (no padded copy of x), accumulates [gate | up] in
two fp32 tiles (one for non-gated experts), then in the epilogue: * routing weight (W_IN, Llama 4), + bias,
activation (ACT: 0 silu, 1 gelu, 2 gelu_tanh, 3 relu, 4 swiglu_oai with ALPHA / LIMIT), cast, store.

gemm2 accumulates act @ down[e]^T in fp32, + bias, * routing weight (W_OUT), then combines:
  COMBINE_ATOMIC 0 (deterministic): each row is stored at its slot s = t*K + k of an (S, H) fp32 buffer (pad
      rows have slot -1 and are not stored); `_combine_kernel` then sums each token's K rows in k order.
  COMBINE_ATOMIC 1: tl.atomic_add into a zeroed (T, H) fp32 buffer (order of the K additions not fixed).
Both sum in fp32 like the reference, then cast to the activations' dtype.

Quantized weights (QUANT 1 int8, 2 int4; QGROUP = G): w_ptr points at the natural-layout codes and s_ptr at the
fp16 group scales (kernels/quant.py); each weight tile is dequantized in the main loop (quant_tiles.weight_tile)
and fed to the same tl.dot. Dense launches pass QUANT 0, QGROUP 1 and the weight again as s_ptr (never read).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moetune.kernels.triton.common import aot_spec
from moetune.kernels.triton.quant_tiles import (
    aot_weight,
    check_point,
    quant_constexprs,
    weight_ptrs,
    weight_strides,
    weight_tile,
)

ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_oai": 4}
_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}
COMBINE_BLOCK_H = 256  # the combine is a memory-bound sum of K rows: not tuned


@triton.jit
def _gemm1_kernel(
    # pointers
    x_ptr,  # (T, H) activations
    w_ptr,  # (E, U*I, H) gate_up_proj, or its codes (E, U*I, H or H/2) (QUANT)
    s_ptr,  # (E, U*I, H/G) fp16 scales (QUANT)
    b_ptr,  # (E, U*I) gate_up_bias (HAS_BIAS)
    token_ptr,  # (P,) int32 sorted token of each padded row
    rw_ptr,  # (P,) fp32 routing weight of each padded row (W_IN)
    block_expert_ptr,  # (NB,) int32
    out_ptr,  # (P, I) act out, x's dtype
    # dimensions
    N,  # I
    H,
    BM,
    num_pid_m,  # NB * ceil(BM / BLOCK_M)
    GROUP_M,
    alpha,  # fp32 swiglu_oai
    limit,  # fp32 swiglu_oai
    # strides
    stride_xt,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_be,
    stride_ot,
    # meta-parameters
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_IN: tl.constexpr,
    QUANT: tl.constexpr,  # 0 dense, 1 int8, 2 int4 (quant_tiles.QUANT_MODES)
    QGROUP: tl.constexpr,  # G: weights per scale along the reduction (1 when dense)
    PRECISION: tl.constexpr,  # "ieee" for fp32 tiles (no TF32: the reference is fp32), else "tf32" (unused)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    tiles_per_block = tl.cdiv(BM, BLOCK_M)
    blk = pid_m // tiles_per_block
    r = (pid_m % tiles_per_block) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows within the block
    row_ok = r < BM
    rows = blk.to(tl.int64) * BM + r
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    out_ptrs = out_ptr + rows[:, None] * stride_ot + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    expert = tl.load(block_expert_ptr + blk)
    if QUANT != 0:
        tl.static_assert(QGROUP % BLOCK_K == 0, "a K step must lie in one scale group: BLOCK_K divides G")
    if expert < 0:  # an empty trailing block
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tok = tl.load(token_ptr + rows, mask=row_ok, other=0)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None].to(tl.int64) * stride_xt + ks[None, :]
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        g_ptrs = weight_ptrs(w_base, cols, ks, stride_wn, QUANT)  # (BLOCK_K, BLOCK_N); int4 (BLOCK_K / 2, BLOCK_N)
        s_ptrs = s_ptr + expert.to(tl.int64) * stride_se + cols.to(tl.int64) * stride_sn  # (BLOCK_N,) (QUANT)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k_ok = (k0 + ks) < H
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_mask = k_ok[:, None] & col_ok[None, :]
            bg = weight_tile(g_ptrs, s_ptrs, k0, ks, b_mask, col_ok, QUANT, QGROUP).to(x_ptr.dtype.element_ty)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
            if GATED:  # the up rows: N rows further, in the weight (or codes) and in the scales
                bu = weight_tile(g_ptrs + N * stride_wn, s_ptrs + N * stride_sn, k0, ks, b_mask, col_ok, QUANT, QGROUP)
                acc_u = tl.dot(a, bu.to(x_ptr.dtype.element_ty), acc_u, input_precision=PRECISION)
        if W_IN:
            rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0)[:, None]
            acc_g = acc_g * rw
            acc_u = acc_u * rw
        if HAS_BIAS:
            b_base = b_ptr + expert.to(tl.int64) * stride_be
            acc_g += tl.load(b_base + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_u += tl.load(b_base + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        g = acc_g
        if ACT == 4:  # swiglu_oai: (clamp(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
            g = tl.minimum(g, limit)
            up = tl.minimum(tl.maximum(acc_u, -limit), limit)
            res = (up + 1.0) * (g * tl.sigmoid(g * alpha))
        else:
            if ACT == 0:
                act = g * tl.sigmoid(g)
            elif ACT == 1:
                act = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
            elif ACT == 2:  # tanh(z) = 2 sigmoid(2z) - 1
                z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
                act = g * tl.sigmoid(2.0 * z)
            else:
                act = tl.maximum(g, 0.0)
            res = act * acc_u if GATED else act
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gemm2_kernel(
    # pointers
    act_ptr,  # (P, I) gemm1's output
    w_ptr,  # (E, H, I) down_proj, or its codes (E, H, I or I/2) (QUANT)
    s_ptr,  # (E, H, I/G) fp16 scales (QUANT)
    b_ptr,  # (E, H) down_bias (HAS_BIAS)
    rw_ptr,  # (P,) fp32 routing weight of each padded row (W_OUT)
    slot_ptr,  # (P,) int32 slot t*K+k of each padded row (pad: -1)
    block_expert_ptr,  # (NB,) int32
    out_ptr,  # (S, H) fp32 per-slot rows, or (T, H) fp32 zeroed accumulator (COMBINE_ATOMIC)
    # dimensions
    N,  # H
    I,
    BM,
    TOPK,
    num_pid_m,
    GROUP_M,
    # strides
    stride_at,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_be,
    stride_ot,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    W_OUT: tl.constexpr,
    COMBINE_ATOMIC: tl.constexpr,
    QUANT: tl.constexpr,
    QGROUP: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 tiles (no TF32: the reference is fp32), else "tf32" (unused)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    tiles_per_block = tl.cdiv(BM, BLOCK_M)
    blk = pid_m // tiles_per_block
    r = (pid_m % tiles_per_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < BM
    rows = blk.to(tl.int64) * BM + r
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    expert = tl.load(block_expert_ptr + blk)
    if QUANT != 0:
        tl.static_assert(QGROUP % BLOCK_K == 0, "a K step must lie in one scale group: BLOCK_K divides G")
    if expert >= 0:  # empty trailing blocks hold no slot: nothing to do
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + rows[:, None] * stride_at + ks[None, :]
        b_ptrs = weight_ptrs(w_ptr + expert.to(tl.int64) * stride_we, cols, ks, stride_wn, QUANT)
        s_ptrs = s_ptr + expert.to(tl.int64) * stride_se + cols.to(tl.int64) * stride_sn  # (QUANT)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k_ok = (k0 + ks) < I
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_mask = k_ok[:, None] & col_ok[None, :]
            b = weight_tile(b_ptrs, s_ptrs, k0, ks, b_mask, col_ok, QUANT, QGROUP).to(act_ptr.dtype.element_ty)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + expert.to(tl.int64) * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[
                None, :
            ]
        if W_OUT:
            acc = acc * tl.load(rw_ptr + rows, mask=row_ok, other=0.0)[:, None]
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
        mask = (slot >= 0)[:, None] & col_ok[None, :]
        if COMBINE_ATOMIC:
            dest = (slot // TOPK).to(tl.int64)
            tl.atomic_add(out_ptr + dest[:, None] * stride_ot + cols[None, :], acc, mask=mask, sem="relaxed")
        else:
            tl.store(out_ptr + slot[:, None].to(tl.int64) * stride_ot + cols[None, :], acc, mask=mask)


@triton.jit
def _combine_kernel(
    z_ptr,  # (T*TOPK, H) fp32 per-slot rows, or (T, H) fp32 sums (TOPK = 1)
    out_ptr,  # (T, H) out
    H,
    TOPK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOPK):  # fixed order: deterministic
        acc += tl.load(z_ptr + (t * TOPK + k) * H + cols, mask=ok, other=0.0)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def gemm1_constexprs(problem, point) -> dict:
    return {
        "GATED": bool(problem["gated"]),
        "ACT": ACTS[problem["act"]],
        "HAS_BIAS": bool(problem["bias"]),
        "W_IN": bool(problem["w_in"]),
        **quant_constexprs(problem),
        "PRECISION": "ieee" if problem.dtype == "float32" else "tf32",
        "BLOCK_M": point["BLOCK_M"],
        "BLOCK_N": point["BLOCK_N"],
        "BLOCK_K": point["BLOCK_K"],
    }


def gemm2_constexprs(problem, point) -> dict:
    return {
        "HAS_BIAS": bool(problem["bias"]),
        "W_OUT": bool(problem["w_out"]),
        "COMBINE_ATOMIC": point["combine"] == "atomic",
        **quant_constexprs(problem),
        "PRECISION": "ieee" if problem.dtype == "float32" else "tf32",
        "BLOCK_M": point["BLOCK_M"],
        "BLOCK_N": point["BLOCK_N"],
        "BLOCK_K": point["BLOCK_K"],
    }


def _grid(n_blocks: int, bm: int, n: int, point) -> tuple[int, int]:
    num_pid_m = n_blocks * triton.cdiv(bm, point["BLOCK_M"])
    return num_pid_m, num_pid_m * triton.cdiv(n, point["BLOCK_N"])


def launch_gemm1(kernel, problem, point, x, w, b, token, rw, block_expert, out, s=None):
    """x (T, H), w (E, U*I, H), b (E, U*I) | None, token / rw (P,), block_expert (NB,), out (P, I); a quantized
    problem: w its codes (E, U*I, H or H/2) and s its scales (E, U*I, H/G), natural layout (kernels/quant.py).

    Returns what the launch returns (the compiled kernel on a GPU, None under the interpreter)."""
    n, h, bm = problem["I"], problem["H"], problem["BM"]
    check_point(problem, point)
    num_pid_m, programs = _grid(block_expert.shape[0], bm, n, point)
    return kernel[(programs,)](
        x,
        w,
        s if s is not None else w,
        b if b is not None else w,
        token,
        rw,
        block_expert,
        out,
        n,
        h,
        bm,
        num_pid_m,
        point["GROUP_M"],
        float(problem["alpha"]),
        float(problem["limit"]),
        x.stride(0),
        *weight_strides(w, s),
        b.stride(0) if b is not None else 0,
        out.stride(0),
        **gemm1_constexprs(problem, point),
        num_warps=point["num_warps"],
        num_stages=point["num_stages"],
    )


def launch_gemm2(kernel, problem, point, act, w, b, rw, slot, block_expert, out, s=None):
    """act (P, I), w (E, H, I), b (E, H) | None, rw / slot (P,), block_expert (NB,), out (S or T, H) fp32; a
    quantized problem: w its codes (E, H, I or I/2), s its scales (E, H, I/G)."""
    n, i, bm = problem["H"], problem["I"], problem["BM"]
    check_point(problem, point)
    num_pid_m, programs = _grid(block_expert.shape[0], bm, n, point)
    return kernel[(programs,)](
        act,
        w,
        s if s is not None else w,
        b if b is not None else w,
        rw,
        slot,
        block_expert,
        out,
        n,
        i,
        bm,
        problem["K"],
        num_pid_m,
        point["GROUP_M"],
        act.stride(0),
        *weight_strides(w, s),
        b.stride(0) if b is not None else 0,
        out.stride(0),
        **gemm2_constexprs(problem, point),
        num_warps=point["num_warps"],
        num_stages=point["num_stages"],
    )


def launch_combine(kernel, z, out, topk: int) -> None:
    t, h = out.shape
    kernel[(t, triton.cdiv(h, COMBINE_BLOCK_H))](z, out, h, TOPK=topk, BLOCK_H=COMBINE_BLOCK_H, num_warps=4)


def aot_gemm1(problem, point, dtype: str):
    ty = _PTR[dtype]
    h, i = problem["H"], problem["I"]
    u = 2 if problem["gated"] else 1
    weight_types, weight_sizes = aot_weight(problem, ty, u * i, h)
    types = {
        "x_ptr": ty,
        **weight_types,
        "b_ptr": ty,
        "token_ptr": "*i32",
        "rw_ptr": "*fp32",
        "block_expert_ptr": "*i32",
        "out_ptr": ty,
        "alpha": "fp32",
        "limit": "fp32",
    }
    sizes = {"N": i, "H": h, "stride_xt": h, **weight_sizes, "stride_be": u * i, "stride_ot": i}
    return aot_spec(
        _gemm1_kernel, types, gemm1_constexprs(problem, point), point["num_warps"], point["num_stages"], sizes
    )


def aot_gemm2(problem, point, dtype: str):
    ty = _PTR[dtype]
    h, i = problem["H"], problem["I"]
    weight_types, weight_sizes = aot_weight(problem, ty, h, i)
    types = {
        "act_ptr": ty,
        **weight_types,
        "b_ptr": ty,
        "rw_ptr": "*fp32",
        "slot_ptr": "*i32",
        "block_expert_ptr": "*i32",
        "out_ptr": "*fp32",
    }
    sizes = {"N": h, "I": i, "stride_at": i, **weight_sizes, "stride_be": h, "stride_ot": h}
    return aot_spec(
        _gemm2_kernel, types, gemm2_constexprs(problem, point), point["num_warps"], point["num_stages"], sizes
    )
