"""CUDA schedule templates (TVM s_tir) for the grouped GEMMs, with their search spaces and default points.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, BM rows per aligned block, NB blocks (data
dependent), U = 2 for gated experts else 1, N output width (gemm1: I, gemm2: H), R reduction length (gemm1: H,
gemm2: I). IR: ir/tvm_ir.py's `gemm1_cuda_func` / `gemm2_cuda_func` (natural weight layouts, no packing).

Template (both GEMMs). A thread block computes a (BMT rows) x (BN columns) output tile of one aligned block:
grid x = NB * BM/BMT (the row tiles of every block: blocks never mix experts), grid y = N/BN; threads =
(BMT/TM) x (BN/TN), each holding a TM x U x TN fp32 accumulator tile in registers. The reduction walks R in
steps of BK; per step the block stages the gathered token rows (BMT x BK) and its expert's weight rows
(U*BN x BK) in shared memory, loaded cooperatively with VEC-element vector loads (both operands are contiguous
along R), then every thread accumulates its tile from shared memory. gemm1's epilogue applies bias, w_in and
the activation in registers; gemm2's scales by the routing weight into an fp32 scratch z (NB,BM,H), and a second
kernel sums each token's K rows in a fixed order (deterministic, no atomics).
  BMT  rows per thread block (divides BM, so a tile never straddles two experts)
  BN   output columns per thread block (divides N: no predicate on the static extent)
  TM   rows per thread, TN columns per thread (register tile; TM*U*TN fp32 accumulators)
  BK   reduction step = the depth of the shared-memory tiles (divides R)
  VEC  elements per vector load from global memory (divides BK and R, so every row start stays aligned)
Empty blocks. NB comes from the align output's shape at launch; a block with bexp = -1 skips the whole
reduction (a guard on the blockIdx, wrapped around the reduction loop after scheduling: `_guard_empty`), so an
empty trailing block costs one read of bexp and, for gemm1, the write of its zero rows.

Tensor cores are not used. TVM 0.27 can tensorize with its WMMA/MMA intrinsics only on fixed 16x16x16
fragment layouts from shared memory staged by its own `cache_read` + layout transforms; here the A operand is
a gather (`XG`) and the expert index a data value, which those intrinsic registrations do not cover without
writing new intrinsic descriptions (and ldmatrix layouts) for this problem. The tensor-core path on CUDA is the
Triton backend (tl.dot); this template is the CUDA-core baseline that needs neither Triton nor TVM at run time.

Constraints: the divisibility rules above; 32..1024 threads; the two stage sizes are whole multiples of
threads * VEC (no predicated vector loads); TM*U*TN <= 128 accumulators per thread (of 255 registers); static
shared memory (BMT + U*BN) * stride * bytes <= 48 KiB (the static __shared__ limit of every architecture; more
needs the dynamic opt-in), stride = the smallest row length >= BK that is 8 mod 32 (rows padded against bank
conflicts; 16 bytes keep the vector stores aligned).

Default point: BMT = min(BM, 64), TM = 4 (2 when BMT = 16 ... any TM that gives >= 32 threads), the widest BN
of (64, 32, 16) dividing N, TN = 4 (U = 2: 2), BK = 32 (the largest of 32, 16, 8 dividing R), VEC the widest
of 8, 4, 2, 1 that is feasible; if that point is still infeasible, the feasible point closest to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetune.ir.program import Problem
from moetune.ir.target import Target
from moetune.schedules.space import Constraint, Param, Point, SearchSpace

if TYPE_CHECKING:
    import tvm

BMT = (16, 32, 64, 128)
BN = (16, 32, 64, 128)
TM = (1, 2, 4, 8)
TN = (1, 2, 4, 8)
BK = (8, 16, 32, 64)
VEC = (1, 2, 4, 8)
STATIC_SMEM = 48 * 1024
ACC_REGS = 128
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SMEM_PAD = 8  # elements of padding per shared-memory row (bank conflicts; see _stage)
COMBINE_THREADS = 256  # gemm2's combine: one output element per thread (memory bound; not worth a parameter)


def gemm_dims(problem: Problem) -> tuple[int, int, int]:
    """(output width N, reduction length R, accumulator tiles U)."""
    if problem.op == "gemm1":
        return problem["I"], problem["H"], 2 if problem["gated"] else 1
    if problem.op == "gemm2":
        return problem["H"], problem["I"], 1
    raise ValueError(f"the TVM CUDA backend has gemm1 and gemm2 only, not {problem.op}")


def threads(point: Point) -> int:
    return (point["BN"] // point["TN"]) * (point["BMT"] // point["TM"])


def smem_bytes(problem: Problem, point: Point) -> int:
    _, _, u = gemm_dims(problem)
    return (point["BMT"] + u * point["BN"]) * row_stride(point["BK"]) * DTYPE_BYTES[problem.dtype]


def row_stride(bk: int) -> int:
    """Elements per shared-memory row: the smallest stride >= BK that is SMEM_PAD mod 32 (storage_align)."""
    return bk + (SMEM_PAD - bk) % 32


def space(problem: Problem, target: Target) -> SearchSpace:
    n, red, u = gemm_dims(problem)
    bm = problem["BM"]

    def stages_ok(p: Point) -> bool:
        step = threads(p) * p["VEC"]
        return (p["BMT"] * p["BK"]) % step == 0 and (u * p["BN"] * p["BK"]) % step == 0

    return SearchSpace(
        problem.op,
        params=(
            Param("BMT", BMT, "rows per thread block (divides BM)"),
            Param("BN", BN, "output columns per thread block (divides N)"),
            Param("TM", TM, "rows per thread"),
            Param("TN", TN, "columns per thread"),
            Param("BK", BK, "reduction step (shared-memory tile depth)"),
            Param("VEC", VEC, "elements per vector load from global memory"),
        ),
        constraints=(
            Constraint("bmt_divides_bm", f"BMT must divide BM={bm}", lambda p: bm % p["BMT"] == 0),
            Constraint("bn_divides_n", f"BN must divide the output width {n}", lambda p: n % p["BN"] == 0),
            Constraint("tm_divides_bmt", "TM must divide BMT", lambda p: p["BMT"] % p["TM"] == 0),
            Constraint("tn_divides_bn", "TN must divide BN", lambda p: p["BN"] % p["TN"] == 0),
            Constraint("bk_divides_r", f"BK must divide the reduction length {red}", lambda p: red % p["BK"] == 0),
            Constraint("vec_divides_bk", "VEC must divide BK", lambda p: p["BK"] % p["VEC"] == 0),
            Constraint("threads", "32..1024 threads per block", lambda p: 32 <= threads(p) <= 1024),
            Constraint("whole_vector_loads", "stage sizes must be multiples of threads*VEC", stages_ok),
            Constraint(
                "registers", f"TM*{u}*TN <= {ACC_REGS} accumulators", lambda p: p["TM"] * u * p["TN"] <= ACC_REGS
            ),
            Constraint(
                "static_smem",
                f"(BMT + {u}*BN) * padded BK * bytes <= {STATIC_SMEM}",
                lambda p: smem_bytes(problem, p) <= STATIC_SMEM,
            ),
        ),
    )


def default_point(problem: Problem, target: Target) -> Point:
    sp = space(problem, target)
    n, red, u = gemm_dims(problem)
    bmt = min(problem["BM"], 64)
    want = {
        "BMT": bmt if problem["BM"] % bmt == 0 else next(v for v in reversed(BMT) if problem["BM"] % v == 0),
        "BN": next((v for v in (64, 32, 16) if n % v == 0), 16),
        "TM": 4,
        "TN": 4 if u == 1 else 2,
        "BK": next((v for v in (32, 16, 8) if red % v == 0), 8),
    }
    while (want["BN"] // want["TN"]) * (want["BMT"] // want["TM"]) < 32 and want["TM"] > 1:
        want["TM"] //= 2
    for vec in (8, 4, 2, 1):
        if sp.is_feasible({**want, "VEC": vec}):
            return {**want, "VEC": vec}
    feasible = list(sp.points())
    if not feasible:
        raise ValueError(f"no feasible TVM CUDA point for {problem} (output width or reduction not a multiple of 8?)")
    want["VEC"] = 8
    return min(feasible, key=lambda p: sum(p[k] != want[k] for k in want))


# ---- applying a point --------------------------------------------------------------------------------------
def _stage(sch, block, anchor, nthreads_y: int, nthreads_x: int, vec: int) -> None:
    """Place a producer block in shared memory under `anchor` and load it cooperatively, VEC elements a thread."""
    sch.set_scope(block, 0, "shared")  # before compute_at: a shared region is relaxed over the thread loops
    # rows padded to row_stride(BK): threads reading rows BK apart would hit one bank (16 B keeps alignment)
    ndim = len(sch.get(block).iter_vars)  # the staged buffer has one axis per block iterator
    sch.storage_align(block, 0, ndim - 2, 32, SMEM_PAD)
    sch.compute_at(block, anchor)
    fused = sch.fuse(*sch.get_loops(block)[5:])  # below blockIdx.x, blockIdx.y, threadIdx.y, threadIdx.x, ko
    _, ty, tx, vi = sch.split(fused, [None, nthreads_y, nthreads_x, vec])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vi)


def _tile(sch, out_name: str, acc_name: str, staged: list, point: Point) -> None:
    """Tile the output block, keep the accumulator in registers, stage the operands in shared memory."""
    out = sch.get_sblock(out_name)
    b, m, n = sch.get_loops(out)
    ny, nx = point["BMT"] // point["TM"], point["BN"] // point["TN"]
    mo, ty, mi = sch.split(m, [None, ny, point["TM"]])
    no, tx, ni = sch.split(n, [None, nx, point["TN"]])
    sch.reorder(b, mo, no, ty, tx, mi, ni)
    sch.bind(sch.fuse(b, mo), "blockIdx.x")
    sch.bind(no, "blockIdx.y")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    acc = sch.get_sblock(acc_name)
    sch.compute_at(acc, tx)
    sch.set_scope(acc, 0, "local")
    *spatial, red = sch.get_loops(acc)[4:]
    ko, ki = sch.split(red, [None, point["BK"]])
    sch.reorder(ko, ki, *spatial)
    for loop in spatial:
        sch.unroll(loop)
    for block in staged:
        _stage(sch, block if not isinstance(block, str) else sch.get_sblock(block), ko, ny, nx, point["VEC"])
    sch.decompose_reduction(acc, ko)
    sch.unroll(mi)
    sch.unroll(ni)


def _schedule_gemm1(problem: Problem, point: Point) -> tvm.tirx.PrimFunc:
    import tvm

    from moetune.ir import tvm_ir

    sch = tvm.s_tir.Schedule(tvm_ir.gemm1_cuda_func(problem))
    _tile(sch, "A", "GU", ["XG", "WG"], point)
    return sch.mod["main"]


def _schedule_gemm2(problem: Problem, point: Point) -> tvm.tirx.PrimFunc:
    import tvm

    from moetune.ir import tvm_ir

    sch = tvm.s_tir.Schedule(tvm_ir.gemm2_cuda_func(problem))
    acc = sch.get_sblock("Zacc")
    act_shared = sch.cache_read(acc, 0, "shared")  # act is read at affine indices: a plain cache_read stages it
    _tile(sch, "Z", "Zacc", [act_shared, "WG"], point)
    combine = sch.get_sblock("O")
    bx, tx = sch.split(sch.fuse(*sch.get_loops(combine)), [None, COMBINE_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch.mod["main"]


def scheduled_module(problem: Problem, point: Point, target: Target) -> tvm.IRModule:
    """The op's IRModule with the point applied (TVM is imported here only: a deployed model runs cubins)."""
    import tvm

    violations = space(problem, target).violations(point)
    if violations:
        raise ValueError(f"infeasible point {point} for {problem}: {'; '.join(violations)}")
    func = _schedule_gemm1(problem, point) if problem.op == "gemm1" else _schedule_gemm2(problem, point)
    return tvm.IRModule({"main": func})


def launches(problem: Problem, point: Point) -> list[dict]:
    """The kernels of an op in launch order, each with its grid as [symbol, multiplier, divisor] per dimension
    (extent = ceil(symbol * multiplier / divisor), symbol None: the constant multiplier) and its block."""
    n, _, _ = gemm_dims(problem)
    main = {
        "role": "main",
        "grid": [["NB", problem["BM"] // point["BMT"], 1], [None, n // point["BN"], 1], [None, 1, 1]],
        "block": [point["BN"] // point["TN"], point["BMT"] // point["TM"], 1],
    }
    if problem.op == "gemm1":
        return [main]
    combine = {
        "role": "combine",
        "grid": [["T", problem["H"], COMBINE_THREADS], [None, 1, 1], [None, 1, 1]],
        "block": [COMBINE_THREADS, 1, 1],
    }
    return [main, combine]
