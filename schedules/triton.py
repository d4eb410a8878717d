"""Triton search spaces (as data) and default points for every lowered op on CUDA targets.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, BM rows per aligned block, U = 2 for gated
experts else 1, E_PAD = next pow2 of E (>= 16 for the router's tl.dot).

Parameters (kernels/triton_*.py say what each tile is):
  gemm1, gemm2  BLOCK_M (rows per program: divides BM, or 16 with rows past BM masked when BM < 16), BLOCK_N,
                BLOCK_K (reduction step), GROUP_M (row tiles per column tile in the launch order; a runtime
                argument, so no extra compile), num_warps, num_stages (software pipelining depth);
                gemm2 also `combine`: "slots" (deterministic: per-slot rows, then a fixed-order sum over K) or
                "atomic" (fp32 atomic adds: one launch fewer, order of the K additions not fixed)
  qgemm1,       gemm1's / gemm2's parameters (the same kernels, dequantizing int8 / int4 weight tiles in the
  qgemm2        main loop: kernels/triton/quant_tiles.py) and two constraints between BLOCK_K and the format:
                `block_k_divides_group` (G % BLOCK_K == 0) and `int4_even_block_k`; their shared-memory floor
                counts the weight tile at the codes' size (a byte, half for int4) plus its scales.
  route         BLOCK_T (tokens per program), logits ("fused": the router GEMM in the kernel; "torch": cuBLAS
                logits, then the selection kernel), BLOCK_K and num_stages of the fused GEMM, num_warps
  align         BLOCK_S (slots per step of its one program), num_warps
BM itself is not a parameter: the align output, and so every GEMM's grid, depends on it (ir/program.py).

Static constraints prune what can never run well: tiles wider than the problem, fp32 accumulators beyond
128 registers per thread (of 255: the rest hold the operand fragments; more spills), pipelines deeper than
the reduction loop, and shared memory that exceeds the largest per-block limit of any architecture even at
its lowest (num_stages - 1 buffered tiles). The exact per-architecture limits (shared memory, spills,
registers per SM) come from compiling each point ahead of time (`moetune tune --target sm_90 --prepare`,
autotune/tuning/prepare.py): on a CUDA target the space carries one more constraint, `aot`, which refuses the points
that compile found infeasible for that architecture (points never compiled pass).

Quantized GEMMs: which of BLOCK_K and G divides the other. We require BLOCK_K to divide G: a K step then lies
inside one scale group, so its scales are one (BLOCK_N,) vector loaded once per step. The other choice (G divides
BLOCK_K) puts several groups in a step: a (BLOCK_K, BLOCK_N) gather of repeated scales (vLLM's gptq_awq kernel
loads them per element, as many scale loads as code loads) or a reshape of the code tile into groups, every step.
The cost: BLOCK_K <= G, so G = 32 (the CPU's default) leaves BLOCK_K = 32 only, while the GPU's default G = 128
keeps 32, 64 and 128 (256 went to long dense reductions at decode; a quantized tile of 128 codes is already
as many bytes as a dense one of 32 to 64). Since G divides the reduction (MoEConfig checks it), so does BLOCK_K:
no K tail. vLLM's int4 tuner crashed on exactly this pair (vllm#52845: its space held BLOCK_SIZE_K that a kernel
asserted against group_size only at launch); here it is a named constraint, so the tuner never proposes such a
point and prepare never compiles one. `int4_even_block_k`: two codes per byte along K, so a K step must start on
a byte (every BLOCK_K offered is even; the constraint keeps it so if the choices change).

Grid sizes: gemm1 1536 points (4 x 4 x 4 x 3 x 2 x 4), gemm2 3072 (x 2 combine), route 162, align 20; the static
constraints and the GROUP_M / BLOCK_M deduplication leave at most a few hundred distinct kernels per op to
compile (prepare prints the exact counts).

Default point (no tuning; in the spirit of vLLM's fused_moe defaults): BLOCK_M = BM clamped to [16, 64];
BLOCK_N = 64 while blocks are small (BM <= 16: decode, many experts with few rows, so more column tiles keep the
SMs busy), else 128; BLOCK_K = 64 (32 for fp32 tiles); GROUP_M = 8; 4 warps; 3 stages (2 for fp32); "slots"
combine; a quantized GEMM's BLOCK_K at most G. Route: BLOCK_T = 16, fused logits, BLOCK_K = 64, 4 warps (8 past
E_PAD = 256), 2 stages. Align: BLOCK_S = 64 (fewer for large E), 4 warps. Each is clamped to the problem and, if
still infeasible (a static constraint, or the prepared compile for the architecture), replaced by the feasible
point that differs from it in the fewest parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moetune.ir.program import Problem
from moetune.ir.target import GPU_LIMITS, Target
from moetune.schedules.space import Constraint, Param, Point, SearchSpace

BLOCK_M = (16, 32, 64, 128)
BLOCK_N = (32, 64, 128, 256)
BLOCK_K = (32, 64, 128, 256)  # 256: long reductions at decode (Mixtral gemm2, K = 14336)
GROUP_M = (1, 8, 32)
GEMM_WARPS = (4, 8)
GEMM_STAGES = (2, 3, 4, 5)
COMBINE = ("slots", "atomic")
ROUTE_BLOCK_T = (16, 32, 64)
ROUTE_LOGITS = ("fused", "torch")
ROUTE_WARPS = (2, 4, 8)
ROUTE_STAGES = (1, 2, 3)
ALIGN_BLOCK_S = (16, 32, 64, 128, 256)
ALIGN_WARPS = (1, 2, 4, 8)
ACC_REGS = 128  # fp32 accumulator registers per thread we allow (of 255)
MAX_SMEM = max(limits.smem_per_block for limits in GPU_LIMITS.values())
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CODE_BYTES = {"int8": 1.0, "int4": 0.5}  # shared memory per weight of a quantized GEMM's pipelined code tile
SCALE_BYTES = 2  # fp16 group scales


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _gemm_dims(problem: Problem) -> tuple[int, int, int]:
    """(output width N, reduction length, accumulator tiles U) of gemm1 / gemm2, quantized or not."""
    if problem.gemm == "gemm1":
        return problem["I"], problem["H"], 2 if problem["gated"] else 1
    return problem["H"], problem["I"], 1


def _quant_constraints(problem: Problem) -> tuple[Constraint, ...]:
    """A quantized GEMM's constraints between BLOCK_K and its code format (the module doc says why)."""
    if problem.quant == "none":
        return ()
    g = problem["G"]
    group = Constraint(
        "block_k_divides_group",
        f"BLOCK_K must divide the quant group G={g} (a K step reads one scale per column; vllm#52845)",
        lambda p: g % p["BLOCK_K"] == 0,
    )
    if problem.quant != "int4":
        return (group,)
    even = Constraint(
        "int4_even_block_k",
        "int4 packs two codes per byte along K: BLOCK_K must be even (a K step starts on a byte)",
        lambda p: p["BLOCK_K"] % 2 == 0,
    )
    return group, even


def _gemm_space(problem: Problem) -> SearchSpace:
    n, red, tiles = _gemm_dims(problem)
    bm, elt = problem["BM"], DTYPE_BYTES[problem.dtype]
    # bytes per K step of a weight tile column: the weights, or their codes and a share of one scale per group
    w_elt = elt if problem.quant == "none" else CODE_BYTES[problem.quant] + SCALE_BYTES / problem["G"]
    params = [
        Param("BLOCK_M", BLOCK_M, "rows per program (divides BM; 16 with masked rows when BM < 16)"),
        Param("BLOCK_N", BLOCK_N, "output columns per program"),
        Param("BLOCK_K", BLOCK_K, "reduction step"),
        Param("GROUP_M", GROUP_M, "row tiles per column tile in launch order (L2 reuse of a weight tile)"),
        Param("num_warps", GEMM_WARPS, "warps per program"),
        Param("num_stages", GEMM_STAGES, "software-pipelining depth of the reduction loop"),
    ]
    if problem.gemm == "gemm2":
        params.append(Param("combine", COMBINE, "slots: per-slot rows + fixed-order sum (deterministic); atomic"))
    return SearchSpace(
        problem.op,
        params=tuple(params),
        constraints=(
            Constraint(
                "block_m_fits_bm",
                f"BLOCK_M must be <= max(BM={bm}, 16) (a program's rows stay in one block)",
                lambda p: p["BLOCK_M"] <= max(bm, 16),
            ),
            Constraint(
                "block_n_not_wider",
                f"BLOCK_N must be <= max(32, next pow2 of the output width {n})",
                lambda p: p["BLOCK_N"] <= max(32, _pow2(n)),
            ),
            Constraint(
                "block_k_not_wider",
                f"BLOCK_K must be <= max(32, next pow2 of the reduction length {red})",
                lambda p: p["BLOCK_K"] <= max(32, _pow2(red)),
            ),
            Constraint(
                "accumulators",
                f"{tiles} fp32 accumulator tile(s) of BLOCK_M x BLOCK_N over 32 * num_warps threads must take "
                f"<= {ACC_REGS} registers per thread",
                lambda p: tiles * p["BLOCK_M"] * p["BLOCK_N"] <= ACC_REGS * 32 * p["num_warps"],
            ),
            Constraint(
                "stages_useful",
                f"num_stages - 1 must not exceed the reduction steps ceil({red} / BLOCK_K)",
                lambda p: p["num_stages"] - 1 <= max(1, -(-red // p["BLOCK_K"])),
            ),
            Constraint(
                "shared_memory_floor",
                f"(num_stages - 1) buffered A and B tiles must fit {MAX_SMEM // 1024} KiB (the largest per-block "
                "shared memory of any architecture)",
                lambda p: (
                    (p["num_stages"] - 1) * (p["BLOCK_M"] * elt + tiles * p["BLOCK_N"] * w_elt) * p["BLOCK_K"]
                    <= MAX_SMEM
                ),
            ),
            *_quant_constraints(problem),
        ),
    )


def _route_space(problem: Problem) -> SearchSpace:
    e_pad, h = max(16, _pow2(problem["E"])), problem["H"]
    return SearchSpace(
        "route",
        params=(
            Param("BLOCK_T", ROUTE_BLOCK_T, "tokens per program (>= 16 for tl.dot)"),
            Param("logits", ROUTE_LOGITS, "fused: the router GEMM in the kernel; torch: cuBLAS logits, then select"),
            Param("BLOCK_K", BLOCK_K, "reduction step of the fused router GEMM"),
            Param("num_warps", ROUTE_WARPS, "warps per program"),
            Param("num_stages", ROUTE_STAGES, "software-pipelining depth of the fused router GEMM"),
        ),
        constraints=(
            Constraint(
                "torch_logits_canonical",
                "with torch logits BLOCK_K and num_stages are unused: BLOCK_K = 32 and num_stages = 1",
                lambda p: p["logits"] == "fused" or (p["BLOCK_K"] == 32 and p["num_stages"] == 1),
            ),
            Constraint(
                "block_k_not_wider",
                f"BLOCK_K must be <= max(32, next pow2 of H={h})",
                lambda p: p["BLOCK_K"] <= max(32, _pow2(h)),
            ),
            Constraint(
                "registers",
                f"four fp32 (BLOCK_T, {e_pad}) tiles (logits, scores, choice, a mask) must take <= {ACC_REGS} "
                "registers per thread",
                lambda p: 4 * p["BLOCK_T"] * e_pad <= ACC_REGS * 32 * p["num_warps"],
            ),
        ),
    )


def _align_space(problem: Problem) -> SearchSpace:
    e_pad = _pow2(problem["E"])
    return SearchSpace(
        "align",
        params=(
            Param("BLOCK_S", ALIGN_BLOCK_S, "slots per step (a BLOCK_S x E one-hot in registers)"),
            Param("num_warps", ALIGN_WARPS, "warps of the single program"),
        ),
        constraints=(
            Constraint(
                "registers",
                f"the (BLOCK_S, {e_pad}) int32 one-hot and its cumsum must take <= 64 registers per thread",
                lambda p: 2 * p["BLOCK_S"] * e_pad <= 64 * 32 * p["num_warps"],
            ),
        ),
    )


# The prepared compile results, as a function (problem, point, target) -> verdict dict or None. They belong to
# the Triton kernels (kernels/triton/aot.py), above this module in the flow, which hand it in when imported.
_VERDICT_SOURCE: list[Callable[[Problem, Point, Target], dict[str, Any] | None] | None] = [None]


def set_verdict_source(verdict: Callable[[Problem, Point, Target], dict[str, Any] | None] | None) -> None:
    """Where the `aot` constraint reads the prepared verdicts (kernels/triton/aot.py registers itself)."""
    _VERDICT_SOURCE[0] = verdict


def static_space(problem: Problem) -> SearchSpace:
    """The op's space with its static constraints only (what prepare compiles)."""
    if problem.gemm is not None:  # gemm1, gemm2, qgemm1, qgemm2
        return _gemm_space(problem)
    if problem.op == "route":
        return _route_space(problem)
    return _align_space(problem)


def space(problem: Problem, target: Target) -> SearchSpace:
    """The op's space on a target; on a CUDA arch also the `aot` constraint of the prepared compile results."""
    sp = static_space(problem)
    if target.kind != "cuda":
        return sp

    verdict = _VERDICT_SOURCE[0]
    if verdict is None:
        return sp

    def compiled_ok(point: Point) -> bool:
        found = verdict(problem, point, target)
        return found is None or found["feasible"]

    aot = Constraint(
        "aot",
        f"compiled ahead of time for {target.arch} (moetune tune --prepare): over its shared memory, spilling, "
        "or no block fits an SM",
        compiled_ok,
    )
    return SearchSpace(sp.op, sp.params, (*sp.constraints, aot))


def _clamp(sp: SearchSpace, point: Point) -> Point:
    """The point if feasible, else the feasible point that differs from it in the fewest parameters."""
    if sp.is_feasible(point):
        return point
    best, best_diff = point, len(point) + 1
    for candidate in sp.points():
        diff = sum(candidate[k] != point.get(k) for k in candidate)
        if diff < best_diff:
            best, best_diff = candidate, diff
            if diff == 1:
                break
    return best


def default_point(problem: Problem, target: Target) -> Point:
    sp = space(problem, target)
    if problem.gemm is not None:
        n, red, _ = _gemm_dims(problem)
        bm, fp32 = problem["BM"], problem.dtype == "float32"
        point = {
            "BLOCK_M": min(max(bm, 16), 64),
            "BLOCK_N": min(64 if bm <= 16 else 128, max(32, _pow2(n))),
            "BLOCK_K": min(32 if fp32 else 64, max(32, _pow2(red))),
            "GROUP_M": 8,
            "num_warps": 4,
            "num_stages": 2 if fp32 else 3,
        }
        if problem.quant != "none":  # a K step inside one scale group (block_k_divides_group)
            point["BLOCK_K"] = min(point["BLOCK_K"], problem["G"])
        point["num_stages"] = min(point["num_stages"], max(1, -(-red // point["BLOCK_K"])) + 1)
        if problem.gemm == "gemm2":
            point["combine"] = "slots"
        return _clamp(sp, point)
    if problem.op == "route":
        e_pad = max(16, _pow2(problem["E"]))
        point = {
            "BLOCK_T": 16,
            "logits": "fused",
            "BLOCK_K": min(64, max(32, _pow2(problem["H"]))),
            "num_warps": 4 if e_pad <= 256 else 8,
            "num_stages": 2,
        }
        return _clamp(sp, point)
    e_pad = _pow2(problem["E"])
    block_s = 64
    while block_s > 16 and 2 * block_s * e_pad > 64 * 32 * 4:
        block_s //= 2
    return _clamp(sp, {"BLOCK_S": block_s, "num_warps": 4})
