"""The w8a8 / w4a8 expert GEMMs on CPUs with AVX-512 VNNI or AVX-VNNI: integer dot products (`vpdpbusd`) in
TVMScript (zmm: 16 int32 lanes; AVX-VNNI on AVX2 CPUs: the same instruction on 8-lane ymm vectors).

Legend: T tokens, R input rows, NB blocks, BM rows per block, E experts, K reduction, G group, P panel, W panel
width (2P for a gated gemm1, else P), NP panels, KB codes per 32-bit word of the weight (4 int8, 8 int4).

Why not the TE templates of ir/tvm_ir.py. A weight-only quantized GEMM widens each code to fp32 and runs one
FMA per weight and row: on the Zen4 host int4 came out compute-bound at 0.66-0.87x llama.cpp's Q4_0, which
quantizes the activations to int8 and multiplies bytes (results/amd-epyc-znver4-2c-x86_64/RESULTS.md). Here one
`vpdpbusd` multiplies 64 unsigned weight bytes by 4 broadcast signed activation bytes and adds each 4 products
into 16 int32 lanes: 4 k of 16 columns in one instruction. TE cannot state an instruction over 4 k at once
(tensorize would have to match the indirect row read x[tok[b, m]]), so the reduction is written as a loop
nest with the vector types explicit; its epilogue stays TE (`epilogue_func`).

The reduction ("acc" function). Inputs: the rows' int8 codes as 32-bit words xq (R, K/4), their fp32 scales
xs (R, K/G) and code sums xsum (R, K/G) ("quant": kernels/quant.py's quantize_rows in TVM), the block rows
`rows` (NB, BM) (gemm1: the token of each slot; gemm2: the slot itself), the block experts bexp (NB,), the
weight codes in the VNNI layout (E, NP, K/KB, W) words, unsigned offset binary (kernels/quant.py), and their
scales (E, NP, K/G, W) fp16. Output acc (NB, BM, NP * W) fp32, the panelled accumulator the TE epilogues read
(tvm_ir.gemm1_out and gemm2_out). Per register tile of mt rows x W columns and per group: int32 sums of codes x codes,
then  acc += float(isum - OFFSET * xsum) * (weight scale * input scale)
(the unsigned codes are code + OFFSET, so OFFSET times the input's code sum comes off once per group). The
tile's int32 and fp32 accumulators stay in registers; the weight words are read once per tile.

Keeping them in registers (also ir/tvm_bf16.py). TVM lowers a "local" buffer, and any buffer of 1 KiB or more,
to a heap workspace per parallel task; a name assigned in a TVMScript loop (`v = codes[...]`) becomes such a
buffer too. LLVM cannot tell that workspace from the weights, so every accumulator update was stored back to
it, and a prefetch (which LLVM counts as touching memory) kept the stores in the innermost loop: 5 vector stores
per 2 `vdpbf16ps`. So the accumulators are "global" buffers under 1 KiB (stack allocas, promoted to registers;
the space's prefetch_with_stack_accumulators constraint), and named values are `T.meta_var` expressions. Zen4:
w4a8 layer at T=1 1.56 -> 1.30 ms, T=16 17.0 -> 13.5 ms (results/amd-epyc-znver4-2c-x86_64/RESULTS.md).
  nt    P, the panel width (a multiple of the vector's lanes)
  mt    rows per register tile (divides BM)
  order "panels_outer" (one expert's panel stays in cache across its blocks) or "blocks_outer"; the parallel
        loop is always blocks x panels fused.
  pf    software prefetch distance in KiB along the panel's weight stream (0: none): at each group, one
        `prefetcht0` per 64-byte line of the group that far ahead. Decode reads each weight once and the
        hardware prefetcher alone keeps too few lines in flight on some CPUs (the Intel Emerald Rapids host:
        qwen3-30b-a3b w4a8 at T=1, gemm1 1.15-1.19 -> 1.01-1.04 ms at 8 KiB; results/intel-*-emeraldrapids-*),
        and costs time where it does not (AMD Zen4): the default is schedules/tvm_cpu.decode_prefetch_kib.
        A prefetch past the buffer's end (the last groups of the last panel) is a hint, never a fault, on x86.
"""

from __future__ import annotations

import tvm
from tvm import te
from tvm.script import tirx as T

from moetune.ir import tvm_ir
from moetune.ir.program import Problem

LANES = 16  # int32 lanes of a zmm register
OFFSET = {"int8": 128, "int4": 8}  # kernels/quant.py: the VNNI layout's codes are code + OFFSET
CODES_PER_WORD = {"int8": 4, "int4": 8}


def _byte_vector(lanes: int) -> str:
    """vpdpbusd's byte operands as LLVM types them: <4L x i8> from LLVM 22 (llvm/llvm-project#155194), <L x i32>
    before (L int32 lanes); TVM passes them as written, so the TVMScript names the type of the linked LLVM."""
    from tvm.target import codegen

    return f"int8x{4 * lanes}" if codegen.llvm_version_major() >= 22 else f"int32x{lanes}"


def dims(problem: Problem, panel: int) -> tuple[int, int, int]:
    """(reduction K, panels NP, panel width W) of a GEMM in panels of `panel` columns (also ir/tvm_bf16.py's)."""
    if problem.gemm == "gemm1":
        return problem["H"], -(-problem["I"] // panel), (2 if problem["gated"] else 1) * panel
    return problem["I"], -(-problem["H"] // panel), panel


def prefetch(buf, *index):
    """A `prefetcht0` of the line holding buf[index] (llvm.prefetch: read, high locality, data cache)."""
    address = T.address_of(buf[index])
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", address, T.int32(0), T.int32(3), T.int32(1)))


def ahead(pf_kib: int, row_bytes: int) -> int:
    """A prefetch distance of `pf_kib` KiB in rows of `row_bytes` (at least one row when pf_kib > 0)."""
    return max(1, pf_kib * 1024 // row_bytes) if pf_kib else 0


def acc_func(
    problem: Problem, panel: int, mt: int, panels_outer: bool, vl: int = LANES, pf: int = 0
) -> tvm.tirx.PrimFunc:
    """The reduction of a w8a8 / w4a8 GEMM (module doc): xq, xs, xsum, rows, bexp, codes, scales -> acc. `vl`
    int32 lanes per vector: 16 (zmm, AVX-512 VNNI) or 8 (ymm: AVX-VNNI, the same instruction on AVX2 CPUs);
    `pf` the prefetch distance in KiB (module doc)."""
    fmt, g_, bm, e_ = problem["wq"], problem["G"], problem["BM"], problem["E"]
    k_, np_, w_ = dims(problem, panel)
    nc, kb, off = w_ // vl, CODES_PER_WORD[fmt], OFFSET[fmt]
    words, ngroups = g_ // kb, k_ // g_  # weight words per group; groups
    int4 = fmt == "int4"
    pf_groups = ahead(pf, words * w_ * 4)  # a group's codes: `words` rows of W 32-bit words
    vdp = T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{32 * vl}")
    byte_vector, i32v, f32v = _byte_vector(vl), f"int32x{vl}", f"float32x{vl}"

    def lanes(i):
        return T.ramp(i * vl, 1, vl)

    def dot(acc, codes, x):
        """acc (vl x int32) + the 4-byte dot products of vl words of unsigned codes with the broadcast word x."""
        bytes_x = T.reinterpret(T.broadcast(x, vl), dtype=byte_vector)
        return T.call_llvm_pure_intrin(vdp, acc, T.reinterpret(codes, dtype=byte_vector), bytes_x, dtype=i32v)

    @T.prim_func
    def acc_fn(
        xq_h: T.handle,
        xs_h: T.handle,
        xsum_h: T.handle,
        rows_h: T.handle,
        bexp_h: T.handle,
        codes: T.Buffer((e_, np_, k_ // kb, w_), "int32"),
        scales: T.Buffer((e_, np_, ngroups, w_), "float16"),
        acc_h: T.handle,
    ):
        T.func_attr({"global_symbol": "acc", "tirx.noalias": True})
        nr, nb = T.int32(), T.int32()
        xq = T.match_buffer(xq_h, (nr, k_ // 4), "int32")
        xs = T.match_buffer(xs_h, (nr, ngroups), "float32")
        xsum = T.match_buffer(xsum_h, (nr, ngroups), "int32")
        rows = T.match_buffer(rows_h, (nb, bm), "int32")
        bexp = T.match_buffer(bexp_h, (nb,), "int32")
        acc = T.match_buffer(acc_h, (nb, bm, np_ * w_), "float32")
        for pb in T.parallel(np_ * nb):
            p = T.meta_var(pb // nb if panels_outer else pb % np_)
            b = T.meta_var(pb % nb if panels_outer else pb // np_)
            for m0 in range(bm // mt):
                accf = T.alloc_buffer((mt * nc * vl,), "float32", scope="global")
                acci = T.alloc_buffer((mt * nc * vl,), "int32", scope="global")
                for i in T.unroll(mt * nc):
                    accf[lanes(i)] = T.broadcast(T.float32(0), vl)
                for g in range(ngroups):
                    for i in T.unroll(mt * nc):
                        acci[lanes(i)] = T.broadcast(T.int32(0), vl)
                    if pf_groups > 0:
                        for q in T.unroll(words):
                            for c in T.unroll(nc):
                                prefetch(codes, bexp[b], p, (g + pf_groups) * words + q, c * vl)
                    for q in T.unroll(words):
                        for c in T.unroll(nc):
                            v = T.meta_var(codes[bexp[b], p, g * words + q, lanes(c)])
                            for r in T.unroll(mt):
                                x0 = T.meta_var(xq[rows[b, m0 * mt + r], g * (g_ // 4) + q * (kb // 4)])
                                if int4:  # low nibbles: k 0..3 of the word's 8, high nibbles: k 4..7
                                    lo = T.meta_var(T.bitwise_and(v, T.broadcast(T.int32(0x0F0F0F0F), vl)))
                                    hi = T.meta_var(
                                        T.bitwise_and(
                                            T.shift_right(v, T.broadcast(T.int32(4), vl)),
                                            T.broadcast(T.int32(0x0F0F0F0F), vl),
                                        )
                                    )
                                    x1 = T.meta_var(xq[rows[b, m0 * mt + r], g * (g_ // 4) + q * 2 + 1])
                                    acci[lanes(r * nc + c)] = dot(dot(acci[lanes(r * nc + c)], lo, x0), hi, x1)
                                else:
                                    acci[lanes(r * nc + c)] = dot(acci[lanes(r * nc + c)], v, x0)
                    for c in T.unroll(nc):
                        ws = T.meta_var(T.Cast(f32v, scales[bexp[b], p, g, lanes(c)]))
                        for r in T.unroll(mt):
                            row = T.meta_var(rows[b, m0 * mt + r])
                            isum = T.meta_var(acci[lanes(r * nc + c)] - T.broadcast(xsum[row, g] * off, vl))
                            accf[lanes(r * nc + c)] = accf[lanes(r * nc + c)] + T.Cast(f32v, isum) * (
                                ws * T.broadcast(xs[row, g], vl)
                            )
                for r in T.unroll(mt):
                    for c in T.unroll(nc):
                        acc[b, m0 * mt + r, T.ramp(p * w_ + c * vl, 1, vl)] = accf[lanes(r * nc + c)]

    return acc_fn


def quant_func(problem: Problem) -> tvm.tirx.PrimFunc:
    """The input rows quantized to int8 per row and group ("quant"): x (R, K) -> codes (R, K) int8, scales (R, K/G)
    fp32, code sums (R, K/G) int32. The same arithmetic as kernels/quant.py's quantize_rows (fp32 max / 127, its
    reciprocal, round half to even, clamp to +-127), so the kernel and the reference see the same codes; in TVM
    rather than torch because a torch op between two TVM calls costs more than the quantization (its OpenMP
    threads and TVM's take turns on the cores: 0.18 ms per GEMM at T=1 on the Intel host, the kernel 0.01 ms)."""
    g_, dt = problem["G"], problem.dtype
    k_ = problem["H"] if problem.gemm == "gemm1" else problem["I"]
    ngroups = k_ // g_

    @T.prim_func
    def quant_fn(x_h: T.handle, q_h: T.handle, s_h: T.handle, sum_h: T.handle):
        T.func_attr({"global_symbol": "quant", "tirx.noalias": True})
        nr = T.int32()
        x = T.match_buffer(x_h, (nr, k_), dt)
        q = T.match_buffer(q_h, (nr, k_), "int8")
        xs = T.match_buffer(s_h, (nr, ngroups), "float32")
        xsum = T.match_buffer(sum_h, (nr, ngroups), "int32")
        for r in T.parallel(nr):
            for g in range(ngroups):
                amax = T.alloc_buffer((1,), "float32", scope="local")
                isum = T.alloc_buffer((1,), "int32", scope="local")
                amax[0] = T.float32(0)
                for j in range(g_):
                    amax[0] = T.max(amax[0], T.abs(T.Cast("float32", x[r, g * g_ + j])))
                xs[r, g] = amax[0] / T.float32(127)
                isum[0] = 0
                for j in range(g_):
                    inv = T.if_then_else(xs[r, g] > T.float32(0), T.float32(1) / xs[r, g], T.float32(0))
                    c = T.max(
                        T.min(T.nearbyint(T.Cast("float32", x[r, g * g_ + j]) * inv), T.float32(127)), T.float32(-127)
                    )
                    q[r, g * g_ + j] = T.Cast("int8", c)
                    isum[0] = isum[0] + T.Cast("int32", c)
                xsum[r, g] = isum[0]

    return quant_fn


def epilogue_func(problem: Problem, panel: int) -> tvm.tirx.PrimFunc:
    """The TE epilogue ("main") over acc: gemm1's "A" (args wt, bexp [, bias], acc, act) or gemm2's "Z" and
    "O" (args wt, bexp, inv [, bias], acc, z, out): the same code as the dense kernels' (ir/tvm_ir.py)."""
    e, bm, dt = problem["E"], problem["BM"], problem.dtype
    _, np_, w_ = dims(problem, panel)
    nb = te.var("NB")
    acc = te.placeholder((nb, bm, np_ * w_), "float32", name="acc")
    wt = te.placeholder((nb, bm), "float32", name="wt")
    bexp = te.placeholder((nb,), "int32", name="bexp")
    if problem.gemm == "gemm1":
        u = 2 if problem["gated"] else 1
        bias = te.placeholder((e, u * problem["I"]), dt, name="bias") if problem["bias"] else None
        out = tvm_ir.gemm1_out(problem, panel, acc, wt, bexp, bias)
        return te.create_prim_func([wt, bexp, *([bias] if bias is not None else []), acc, out])
    t = te.var("T")
    inv = te.placeholder((t, problem["K"]), "int32", name="inv")
    bias = te.placeholder((e, problem["H"]), dt, name="bias") if problem["bias"] else None
    zacc = te.compute((nb, bm, problem["H"]), lambda b, m, n: acc[b, m, n], name="Zacc")
    z, out = tvm_ir.gemm2_out(problem, zacc, wt, bexp, inv, bias, t)
    return te.create_prim_func([wt, bexp, inv, *([bias] if bias is not None else []), acc, z, out])
