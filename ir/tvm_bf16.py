"""The bf16 expert GEMMs on CPUs with AVX-512 BF16: `vdpbf16ps` dot products of bf16 pairs, in TVMScript.

Legend: T tokens, R input rows, NB blocks, BM rows per block, E experts, K reduction, P panel, W panel width (2P
for a gated gemm1, else P), NP panels.

Why not the TE templates of ir/tvm_ir.py. Those widen each bf16 weight and input to fp32 in registers (a shift
per 16 weights) and run one fp32 FMA per weight and row. `vdpbf16ps` multiplies 32 bf16 weights (16 columns x 2
consecutive k) by one broadcast pair of bf16 inputs and adds each pair of products into 16 fp32 lanes: twice
the multiply-adds of an FMA, no widening, the weights read as stored. TE cannot state an instruction over 2 k at
once (same reason as ir/tvm_vnni.py), so the reduction is a loop nest with the vector types explicit, and its
epilogue is the dense kernels' TE (`tvm_vnni.epilogue_func`).

The instruction. TVM's LLVM code generator has no bf16 vector type (its passes store bf16 as uint16 and
compute in fp32; without them it crashes), while LLVM types the intrinsic's operands <32 x bfloat>. So the
kernel calls `moetune_dpbf16ps(acc, words, words)` on 32-bit words (two bf16 each), a function written in LLVM
IR that bit-casts them and calls the intrinsic; it reaches LLVM through TVM's `pragma_import_llvm`, which links
it into the kernel's module, where it is inlined (one `vdpbf16ps` per call in the assembly: tested).

The reduction ("acc" function). Inputs: the input rows as 32-bit words of k pairs x (R, K/2) (gemm1: the token
rows, gemm2: gemm1's output slots), the block rows `rows` (NB, BM) (gemm1: the token of each slot; gemm2: the
slot itself), the block experts bexp (NB,), the weight words in the k-paired panel layout (E, NP, K/2, W)
(kernels/packed.py, kpack 2). Output acc (NB, BM, NP * W) fp32, the panelled accumulator the TE epilogues read.
Rounding: each instruction adds two products to the fp32 accumulator (products exact in fp32; round to nearest
even, denormals flushed), which differs from an FMA chain by about one fp32 rounding per pair: far inside the
bf16 tolerance.
  nt    P, the panel width (a multiple of 16 lanes)
  mt    rows per register tile (divides BM)
  order "panels_outer" (one expert's panel stays in cache across its blocks) or "blocks_outer"; the parallel
        loop is always blocks x panels fused.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from moetune.ir.program import Problem
from moetune.ir.tvm_vnni import LANES, ahead, dims, prefetch

DPBF16PS = "moetune_dpbf16ps"


def _llvm_dpbf16ps() -> str:
    """The helper in LLVM IR. LLVM types the intrinsic's operands <32 x bfloat> from LLVM 17, <16 x i32> before
    (the bit-casts are then no-ops)."""
    from tvm.target import codegen

    bf = "<32 x bfloat>" if codegen.llvm_version_major() >= 17 else "<16 x i32>"
    intrinsic = "@llvm.x86.avx512bf16.dpbf16ps.512"
    return f"""
declare <16 x float> {intrinsic}(<16 x float>, {bf}, {bf})
define internal <16 x float> @{DPBF16PS}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {{
  %a2 = bitcast <16 x i32> %a to {bf}
  %b2 = bitcast <16 x i32> %b to {bf}
  %r = call <16 x float> {intrinsic}(<16 x float> %acc, {bf} %a2, {bf} %b2)
  ret <16 x float> %r
}}
"""


def acc_func(problem: Problem, panel: int, mt: int, panels_outer: bool, pf: int = 0) -> tvm.tirx.PrimFunc:
    """The reduction of a bf16 GEMM (module doc): x, rows, bexp, weight words -> acc; `pf` the software
    prefetch distance in KiB along the panel (ir/tvm_vnni.py's module doc)."""
    bm, e_ = problem["BM"], problem["E"]
    k_, np_, w_ = dims(problem, panel)
    nc, words = w_ // LANES, k_ // 2
    pf_rows = ahead(pf, w_ * 4)  # a k pair's row: W 32-bit words
    helper = _llvm_dpbf16ps()

    def lanes(i):
        return T.ramp(i * LANES, 1, LANES)

    @T.prim_func
    def acc_fn(
        x_h: T.handle,
        rows_h: T.handle,
        bexp_h: T.handle,
        w: T.Buffer((e_, np_, words, w_), "int32"),
        acc_h: T.handle,
    ):
        T.func_attr({"global_symbol": "acc", "tirx.noalias": True})
        nr, nb = T.int32(), T.int32()
        x = T.match_buffer(x_h, (nr, words), "int32")
        rows = T.match_buffer(rows_h, (nb, bm), "int32")
        bexp = T.match_buffer(bexp_h, (nb,), "int32")
        acc = T.match_buffer(acc_h, (nb, bm, np_ * w_), "float32")
        with T.attr(T.int32(0), "pragma_import_llvm", helper):
            for pb in T.parallel(np_ * nb):
                p = T.meta_var(pb // nb if panels_outer else pb % np_)
                b = T.meta_var(pb % nb if panels_outer else pb // np_)
                for m0 in range(bm // mt):
                    accf = T.alloc_buffer((mt * nc * LANES,), "float32", scope="global")
                    for i in T.unroll(mt * nc):
                        accf[lanes(i)] = T.broadcast(T.float32(0), LANES)
                    for q in range(words):
                        if pf_rows > 0:
                            for c in T.unroll(nc):
                                prefetch(w, bexp[b], p, q + pf_rows, c * LANES)
                        for c in T.unroll(nc):
                            v = T.meta_var(w[bexp[b], p, q, lanes(c)])
                            for r in T.unroll(mt):
                                xr = T.meta_var(T.broadcast(x[rows[b, m0 * mt + r], q], LANES))
                                accf[lanes(r * nc + c)] = T.call_pure_extern(
                                    "float32x16", DPBF16PS, accf[lanes(r * nc + c)], v, xr
                                )
                    for r in T.unroll(mt):
                        for c in T.unroll(nc):
                            acc[b, m0 * mt + r, T.ramp(p * w_ + c * LANES, 1, LANES)] = accf[lanes(r * nc + c)]

    return acc_fn
