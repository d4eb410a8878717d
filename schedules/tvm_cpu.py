"""CPU schedule templates (TVM s_tir) for every lowered op, with their search spaces and default points.

Legend: T tokens, H hidden, I intermediate, E experts, BM rows per block, NB blocks.

GEMM template (router logits, gemm1, gemm2). The output is tiled per block as (mt rows) x (nt columns); the
fp32 accumulator tile of that (for a gated gemm1 2*nt wide: gate and up columns side by side; nt wide for a
non-gated one) lives in registers ("local"), is computed over the whole reduction with the reduction loop
outermost, unrolled by kt, and its columns are vectorised (the packed weight layout makes them contiguous).
The parallel loop is the blocks, or blocks x column panels.
  nt   panel width = vectorised columns; also the packed weight layout (a multiple of the SIMD lanes)
  mt   rows per register tile; a divisor of BM (BM is static, so no predicate: see ir/tvm_ir.py)
  kt   reduction unroll; divides the reduction length so the innermost loop has no bounds check
  order "panels_outer": for each column panel, all blocks (blocks are sorted by expert, so one expert's
       weight panel is read from memory once and reused from cache by its other blocks); "blocks_outer"
  par  "outer": parallel over the outer loop; "fused": over outer x inner (balances small NB or few panels)
Constraint "registers": the accumulator tiles must fit the vector register file with room for the loads.
Router logits use mt = 1 (T is symbolic and not split, for the same compile reason) and parallelise rows.

Default point (good without tuning): among the (mt, nt) that fit the registers (mt dividing BM, nt not wider
than the output), first those whose panel width divides the output width (a partial last panel is slow: on
gpt-oss-20b/4, H = I = 720, nt = 32/64 -> 16 made the whole layer 2.8x faster at T=16 in fp32 and 4.4x in bf16;
results/amd-epyc-znver3-2c-x86_64/default_nt_gpt-oss-20b_shrink4.json), then the one
with the most FMAs per load per reduction step (tiles*mt*nt/lanes FMAs against
mt broadcasts + tiles*nt/lanes weight loads), ties to the larger mt (measured on Mixtral-8x7B gemm1, T=256:
mt=4 x nt=8 808 ms vs mt=2 x nt=16 1003 ms); kt = 4 when it divides the reduction
(else 2, else 1; quantized GEMMs: G is a multiple of 32, so 4); order = "panels_outer" (weight traffic once per
expert); par = "fused".

align and route's top-k selection are sequential TVMScript (ir/tvm_script.py): their spaces are empty.

w8a8 / w4a8 GEMMs (Problem.act_quant) on a target with AVX-512 VNNI (or AVX-VNNI on an AVX2 CPU: the same
kernels on 8-lane ymm vectors, nt 8 / 16 / 32, 16 registers) run the integer dot-product kernels of
ir/tvm_vnni.py instead: space nt (16, 32, 64: the panel width, also their weight layout), mt, order, with the
registers constraint counting an int32 and an fp32 accumulator per vector of the tile. Default: 64 columns per
tile (W = 2nt for a gated gemm1), the most rows (<= 4) that fit and divide BM, panels_outer. Measured on the
Intel AVX-512 VNNI host, qwen3-30b-a3b, gemm1 + gemm2 (default pairs W = 32 / 64): T=1 w4a8 1.11 -> 0.97 ms,
T=16 13.5 -> 12.3 ms, T=256 (mt 4 -> 2) w4a8 83.1 -> 79.2 ms, w8a8 89.3 -> 81.0 ms; blocks_outer within +-8%.
Elsewhere (no VNNI) they run the weight-only kernels on the quantized input's values
(kernels/tvm_cpu/launchers.py).

bf16 GEMMs (dense bf16 weights and inputs) on a target with AVX-512 BF16 run the `vdpbf16ps` kernels of
ir/tvm_bf16.py: the same space as the VNNI kernels (nt, mt, order; their weight layout pairs k: kpack 2), the
registers constraint counting one fp32 accumulator per vector of the tile. Default: 32-wide panels (a gated
gemm1's tile 64 columns), the most rows that fit and divide BM, panels_outer (prefill); a panel width that divides the
output comes first, as above. Measured on the Zen5 host (qwen3-30b-a3b, T=256, BM=8; results/amd-epyc-znver5-2c-
x86_64/RESULTS.md): gemm1 mt 4 x nt 32 39.9 ms (8 x 16: 43.4), gemm2 8 x 32 23.2 ms (4 x 64: 31.9); T=1 layer
with gemm2 nt 32 2.37 ms, nt 64 2.62 ms.

Both dot-product kernels also take pf, a software prefetch distance along the weight panel (0 / 4 / 8 / 16
KiB): at BM <= 2 (decode: each weight read once, from memory) `decode_prefetch_kib` (8 on Intel, 0 on AMD Zen:
measured), else 0 (prefill reuses a panel across blocks; w4a8 at T=256 on the Intel Emerald Rapids host, pf 8
was 0-5% slower). At decode their default order is blocks_outer: a thread streams whole experts.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import tvm

from moetune.ir import tvm_bf16, tvm_ir, tvm_script, tvm_vnni
from moetune.ir.program import Problem
from moetune.ir.target import Target
from moetune.schedules.space import Constraint, Param, Point, SearchSpace

NT_CHOICES = (8, 16, 32, 64)
MT_CHOICES = (1, 2, 3, 4, 6, 8)
KT_CHOICES = (1, 2, 4, 8)
PAR_CHOICES = ("outer", "fused")
ORDER_CHOICES = ("panels_outer", "blocks_outer")
PF_CHOICES = (0, 4, 8, 16)  # the dot-product kernels' software prefetch distance, KiB (ir/tvm_vnni.py)


@cache
def _features(target: Target) -> frozenset[str]:
    from tvm.target import codegen

    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(target.tvm)))


def dot_kernel(problem: Problem, target: Target) -> str | None:
    """Which dot-product kernel `problem` runs on `target`: "vnni" (w8a8 / w4a8 on AVX-512 VNNI: ir/tvm_vnni.py),
    "bf16" (dense bf16 expert GEMMs on AVX-512 BF16: ir/tvm_bf16.py), or None (the TE templates). The one place
    that decides it: the space, the schedule, the launchers and the weight layout (kpack) all ask here."""
    features = _features(target)
    if problem.gemm not in ("gemm1", "gemm2") or _gemm_dims(problem)[0] <= 8:
        return None  # their panels are 16-column multiples: a narrower output runs the TE kernels
    zmm, ymm = {"avx512vnni", "avx512bw"} <= features, "avxvnni" in features and "avx512f" not in features
    if problem.act_quant and (zmm or ymm):  # AVX-VNNI: the same instruction on 8 lanes (AVX2 CPUs)
        return "vnni"
    bf16 = problem.quant == "none" and problem.dtype == "bfloat16" and _gemm_dims(problem)[1] % 2 == 0
    return "bf16" if bf16 and {"avx512bf16", "avx512f"} <= features else None


def decode_prefetch_kib(target: Target) -> int:
    """The dot kernels' default software prefetch distance (KiB) where each weight is read once (BM <= 2).
    Measured, 2 threads reading a weight stream each (read_streams.c in results/): an Intel Xeon (Emerald Rapids)
    reads 8 GB/s per one-stream thread and more with prefetch (bf16 layer at T=1 1.12x, w4a8 1.06x with 8 KiB),
    while an AMD EPYC Zen4 reads ~28 of its ~31 GB/s with one stream per thread, and prefetching there made the
    same layers 1.1-1.3x slower. So AMD's Zen cores get none; the tuner explores PF_CHOICES everywhere."""
    return 0 if str(target.tvm.get("mcpu", "")).startswith("znver") else 8


@cache
def simd(target: Target) -> tuple[int, int]:
    """(fp32 lanes per vector register, number of vector registers) of a CPU target, from its LLVM features:
    AVX-512 16 lanes x 32 zmm, AVX/AVX2 8 x 16 ymm, NEON (AArch64) 4 x 32 q-registers, SSE 4 x 16 xmm."""
    features = _features(target)
    if "avx512f" in features:
        return 16, 32
    if "avx2" in features or "avx" in features:
        return 8, 16
    if "neon" in features:
        return 4, 32
    return 4, 16  # SSE


def _gemm_dims(problem: Problem) -> tuple[int, int, int, int]:
    """(output width N, reduction length, BM, accumulator tiles) of a GEMM-like op."""
    if problem.gemm == "gemm1":  # gated: gate and up accumulator tiles; non-gated: the up tile alone
        return problem["I"], problem["H"], problem["BM"], 2 if problem["gated"] else 1
    if problem.gemm == "gemm2":
        return problem["H"], problem["I"], problem["BM"], 1
    return problem["E"], problem["H"], 1, 1  # route logits


def _dot_space(problem: Problem, target: Target, kind: str) -> SearchSpace:
    n, _, bm, tiles = _gemm_dims(problem)
    lanes, vregs = simd(target)
    per_vector = 2 if kind == "vnni" else 1  # VNNI: an int32 and an fp32 accumulator per vector of the tile
    return SearchSpace(
        problem.op,
        params=(
            Param("nt", (lanes, 2 * lanes, 4 * lanes), "columns per panel = the k-packed weight layout's panel width"),
            Param("mt", MT_CHOICES, "rows per register tile (divides BM)"),
            Param("order", ORDER_CHOICES, "outer loop: column panels or blocks (fused with the other, parallel)"),
            Param("pf", PF_CHOICES, "software prefetch distance along the weight panel, KiB (0: none)"),
        ),
        constraints=(
            Constraint("mt_divides_bm", f"mt must divide BM={bm}", lambda p: bm % p["mt"] == 0),
            Constraint(
                "registers",
                f"{tiles} tile(s) of mt x nt/{lanes} {'int32 and fp32' if per_vector == 2 else 'fp32'} accumulators"
                f" must leave 4 of {vregs} registers free",
                lambda p: per_vector * tiles * p["mt"] * p["nt"] // lanes <= vregs - 4,
            ),
            Constraint(
                "panel_not_wider_than_output", f"nt must be < 2x the output width {n}", lambda p: p["nt"] < 2 * n
            ),
            Constraint(
                "prefetch_with_stack_accumulators",
                f"pf > 0 needs each accumulator buffer ({tiles} x mt x nt x 4 bytes) under 1 KiB: TVM puts larger"
                " ones in a heap workspace, and LLVM then stores them after every instruction a prefetch follows",
                lambda p: p["pf"] == 0 or tiles * p["mt"] * p["nt"] * 4 < 1024,
            ),
        ),
    )


def space(problem: Problem, target: Target) -> SearchSpace:
    if problem.op == "align":
        return SearchSpace("align")
    kind = dot_kernel(problem, target)
    if kind is not None:
        return _dot_space(problem, target, kind)
    lanes, vregs = simd(target)
    n, red, bm, tiles = _gemm_dims(problem)
    mts = (1,) if problem.op == "route" else MT_CHOICES
    return SearchSpace(
        problem.op,
        params=(
            Param("nt", tuple(v for v in NT_CHOICES if v >= lanes), "vectorised columns = packed panel width"),
            Param("mt", mts, "rows per register tile (divides BM)"),
            Param("kt", KT_CHOICES, "reduction unroll (divides the reduction length)"),
            Param(
                "order",
                ORDER_CHOICES,
                "outer loop: column panels (a weight panel stays in cache across the blocks of one expert) or blocks",
            ),
            Param("par", PAR_CHOICES, "parallel loop: the outer loop, or outer x inner fused"),
        ),
        constraints=(
            Constraint("mt_divides_bm", f"mt must divide BM={bm}", lambda p: bm % p["mt"] == 0),
            Constraint("kt_divides_k", f"kt must divide the reduction length {red}", lambda p: red % p["kt"] == 0),
            Constraint(
                "registers",
                f"{tiles} accumulator tile(s) of mt x nt/{lanes} vectors must leave 4 of {vregs} registers free",
                lambda p: tiles * p["mt"] * p["nt"] // lanes <= vregs - 4,
            ),
            Constraint(
                "panel_not_wider_than_output",
                f"nt must be < 2x the output width {n}",
                lambda p: p["nt"] < 2 * max(n, lanes),
            ),
        ),
    )


def default_point(problem: Problem, target: Target) -> Point:
    sp = space(problem, target)
    if not sp.params:
        return {}
    n, red, _, tiles = _gemm_dims(problem)
    kind = dot_kernel(problem, target)
    if kind is not None:  # VNNI: 4 vectors per tile, <= 4 rows; bf16: 32-wide panels, the most rows that fit
        lanes = simd(target)[0]
        widths = (4 * lanes // tiles, 2 * lanes, lanes) if kind == "vnni" else (2 * lanes, lanes, 4 * lanes)
        fits = [v for v in widths if lanes <= v < 2 * n] or [lanes]
        nt = next((v for v in fits if n % v == 0), fits[0])
        rows = (4, 3, 2, 1) if kind == "vnni" else (8, 6, 4, 3, 2, 1)
        decode = problem["BM"] <= 2  # each weight read once, from memory; prefill re-reads panels from cache
        # decode: a thread streams whole experts (their panels are contiguous) rather than one panel of each
        # expert in turn: Zen4 bf16 / w4a8 / w8a8 layers at T=1 1.085x / 1.11x / 1.07x, w4a8 T=16 1.16x
        order = "blocks_outer" if decode else "panels_outer"
        point = {"nt": nt, "order": order, "pf": decode_prefetch_kib(target) if decode else 0}
        mt = next(v for v in rows if sp.is_feasible({**point, "mt": v}))
        return {**point, "mt": mt}
    lanes, _ = simd(target)
    kt = next(v for v in (4, 2, 1) if red % v == 0)
    base = {"kt": kt, "order": "panels_outer", "par": "fused"}
    tiles_ok = [
        (mt, nt)
        for nt in sp.params[0].choices
        for mt in sp.params[1].choices
        if sp.is_feasible({**base, "mt": mt, "nt": nt})
    ]

    def merit(mt_nt: tuple[int, int]) -> tuple[bool, float, int]:  # ties: more rows per loaded weight vector
        mt, nt = mt_nt
        vectors = nt // lanes
        return n % nt == 0, tiles * mt * vectors / (mt + tiles * vectors), mt

    mt, nt = max(tiles_ok, key=merit)
    return {**base, "mt": mt, "nt": nt}


# ---- applying a point --------------------------------------------------------------------------------------
def _tile_accumulators(
    sch, out_block, acc_blocks, point: Point, rows_split: bool, parts: bool = False, halves: bool = False
):
    """Tile `out_block` (.., m, n) and compute each accumulator block in registers per tile.

    `parts`: each accumulator sums per-group partials "<acc>_part" (a quantized GEMM, ir/tvm_ir.py): the
    accumulator's reduction is the groups, and the part of one group is computed in registers inside it, its
    own reduction unrolled by kt. `halves` (int4 codes, two columns per byte: ir/tvm_ir.py): the part's columns
    are vectorised as two halves, so each half reads its bytes as one contiguous vector with a constant shift."""
    loops = sch.get_loops(out_block)
    if rows_split:  # (b, m, n)
        b, m, n = loops
        mo, mi = sch.split(m, [None, point["mt"]])
        no, ni = sch.split(n, [None, point["nt"]])
        outer, inner = (no, b) if point["order"] == "panels_outer" else (b, no)
        sch.reorder(outer, inner, mo, mi, ni)
        anchor = mo  # loops down to the anchor: outer, inner, mo
    else:  # router logits (t, n): rows are symbolic, never split
        b, n = loops
        no, ni = sch.split(n, [None, point["nt"]])
        outer, inner = (no, b) if point["order"] == "panels_outer" else (b, no)
        sch.reorder(outer, inner, ni)
        anchor = inner  # outer, inner
    depth = 3 if rows_split else 2

    def registers(blk, red, kt: int, halves: bool = False) -> Any:
        """The block's reduction loop outermost, split by kt; its tile (rows, columns) unrolled and vectorised."""
        *spatial, _ = sch.get_loops(blk)[red:]
        ko, ki = sch.split(sch.get_loops(blk)[-1], [None, kt])
        sch.reorder(ko, ki, *spatial)
        if halves:
            half, columns = sch.split(spatial[-1], [2, None])
            sch.unroll(half)
            spatial[-1] = columns
        if spatial:  # empty only for a 1-column, 1-row tile (a one-expert route)
            sch.vectorize(spatial[-1])
        if len(spatial) == 2:
            sch.unroll(spatial[0])
        sch.unroll(ki)
        return ko

    for name in acc_blocks:
        blk = sch.get_sblock(name)
        sch.compute_at(blk, anchor)
        sch.set_scope(blk, 0, "local")
        group_loop = registers(blk, depth, 1 if parts else point["kt"])  # (mi), (ni), k: compute_at drops unit loops
        if parts:
            part = sch.get_sblock(f"{name}_part")
            sch.compute_at(part, group_loop)
            sch.set_scope(part, 0, "local")
            registers(part, depth + 1, point["kt"], halves)
    fused = point["par"] == "fused"
    sch.parallel(sch.fuse(outer, inner) if fused else outer)  # before decompose_reduction, or s_tir refuses
    sch.vectorize(ni)
    for name in acc_blocks:  # the accumulator's init goes above the reduction loop ko
        blk = sch.get_sblock(name)
        sch.decompose_reduction(blk, sch.get_loops(blk)[depth - fused])
        if parts:  # the part's init inside the group loop, above its own reduction
            part = sch.get_sblock(f"{name}_part")
            sch.decompose_reduction(part, sch.get_loops(part)[depth + 1 - fused])


def _schedule_gemm1(problem: Problem, point: Point):
    sch = tvm.s_tir.Schedule(tvm_ir.gemm1_func(problem, point["nt"]))
    quant = problem.quant
    _tile_accumulators(sch, sch.get_sblock("A"), ("GU",), point, True, quant != "none", quant == "int4")
    return sch.mod["main"]


def _schedule_gemm2(problem: Problem, point: Point, lanes: int):
    sch = tvm.s_tir.Schedule(tvm_ir.gemm2_func(problem, point["nt"]))
    quant = problem.quant
    _tile_accumulators(sch, sch.get_sblock("Z"), ("Zacc",), point, True, quant != "none", quant == "int4")
    combine = sch.get_sblock("O")
    t, n = sch.get_loops(combine)
    _, ni = sch.split(n, [None, lanes])
    sch.parallel(t)
    sch.vectorize(ni)
    return sch.mod["main"]


def _schedule_route(problem: Problem, point: Point):
    sch = tvm.s_tir.Schedule(tvm_ir.route_logits_func(problem, point["nt"]))
    _tile_accumulators(sch, sch.get_sblock("L"), ("Lacc",), point, rows_split=False)
    return sch.mod["main"]


def _schedule_dot(problem: Problem, point: Point, lanes: int, kind: str) -> tvm.IRModule:
    """acc (ir/tvm_vnni.py: and quant; ir/tvm_bf16.py) and the TE epilogue "main", parallel over blocks (gemm1)
    or tokens (gemm2's combine), vectorised along the columns."""
    if kind == "vnni":
        acc = tvm_vnni.acc_func(problem, point["nt"], point["mt"], point["order"] == "panels_outer", lanes, point["pf"])
    else:
        acc = tvm_bf16.acc_func(problem, point["nt"], point["mt"], point["order"] == "panels_outer", point["pf"])
    sch = tvm.s_tir.Schedule(tvm_vnni.epilogue_func(problem, point["nt"]))
    if problem.gemm == "gemm2":
        sch.compute_inline(sch.get_sblock("Zacc"))
        combine = sch.get_sblock("O")
        t, n = sch.get_loops(combine)
        sch.vectorize(sch.split(n, [None, lanes])[1])
        sch.parallel(t)
    epilogue = sch.get_sblock("A" if problem.gemm == "gemm1" else "Z")
    b, m, n = sch.get_loops(epilogue)
    sch.vectorize(sch.split(n, [None, lanes])[1])
    sch.parallel(sch.fuse(b, m))
    funcs = {"acc": acc, "main": sch.mod["main"]}
    return tvm.IRModule({"quant": tvm_vnni.quant_func(problem), **funcs} if kind == "vnni" else funcs)


def scheduled_module(problem: Problem, point: Point, target: Target) -> tvm.IRModule:
    """The op's IRModule with the point applied; function names: main (GEMMs; dot-product kernels: [quant,] acc
    then main), logits + select, align."""
    violations = space(problem, target).violations(point)
    if violations:
        raise ValueError(f"infeasible point {point} for {problem}: {'; '.join(violations)}")
    if problem.op == "align":
        return tvm.IRModule({"align": tvm_script.align_func(problem)})
    kind = dot_kernel(problem, target)
    if kind is not None:
        return _schedule_dot(problem, point, simd(target)[0], kind)
    if problem.op == "route":
        logits = _schedule_route(problem, point).with_attr("global_symbol", "logits")
        return tvm.IRModule({"logits": logits, "select": tvm_script.route_select_func(problem)})
    if problem.gemm == "gemm1":
        return tvm.IRModule({"main": _schedule_gemm1(problem, point)})
    return tvm.IRModule({"main": _schedule_gemm2(problem, point, simd(target)[0])})
