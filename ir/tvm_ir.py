"""TVM TensorIR of every lowered op: TE compute for the GEMMs, TVMScript for the data-dependent ops.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, BM rows per block, NB blocks, P panel width.

Why two front ends. The GEMMs (router logits, gemm1, gemm2) are dense tensor expressions with a reduction, so
TE `te.compute` states them in a line each and leaves every loop free for the schedule. Top-k selection and
the align counting sort are sequential, data-dependent algorithms (running maxima, cursors), which TE cannot
express; they are written as imperative TVMScript with Python-level constants specialising them per problem.

Shapes. T (tokens) and NB (blocks) are symbolic (`te.var`), so one compiled kernel serves every batch size;
everything else is static. Blocks are never split by a schedule (only their BM rows are, by divisors of BM):
TVM 0.27 fails to compile a predicated split of a symbolic extent under a local accumulator.

Weight layout. GEMM weights arrive packed in panels of P output columns, `(E, ceil(N/P), Kd, P)`, so the
innermost loop of a tile reads P contiguous weights and vectorises (packing: kernels/tvm_cpu/launchers.py); a gated
gemm1 interleaves its gate and up panels into `(E, ceil(I/P), H, 2P)`, a non-gated one uses plain P panels. P is the
schedule's `nt`, which is why these builders take it: the layout is part of the schedule point.

Quantized weights (qgemm1 / qgemm2, kernels/quant.py): the codes take the weight's place in the same panels,
(E, ceil(N/P), Kd, W) int8, or for int4 (E, ceil(N/P), Kd, W/2) bytes whose low nibble is column c and high
nibble column c + W/2 (offset binary), and the float16 group scales sit beside them as (E, ceil(N/P), Kd/G, W).
Codes are widened to fp32 in registers (never dequantized in memory) and summed per group of G, then each
group's sum is scaled once (`_accumulate`).
"""

from __future__ import annotations

import math

import tvm
from tvm import te

from moetune.ir.program import Problem

F32 = "float32"


def _plain_act(kind: str, v):
    """act(v) on an fp32 TE expression (same formulas as reference.plain_act)."""
    if kind == "silu":
        return v * te.sigmoid(v)
    if kind == "gelu":
        return 0.5 * v * (1.0 + te.erf(v * (1.0 / math.sqrt(2.0))))
    if kind == "gelu_tanh":
        return 0.5 * v * (1.0 + te.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v * v * v)))
    if kind == "relu":
        return te.max(v, tvm.tirx.const(0.0, F32))
    raise ValueError(f"unknown activation {kind!r}")


def _act(kind: str, g, u, alpha: float, limit: float):
    """act(gate) * up on fp32 TE expressions (same formulas as reference.gated_act)."""
    if kind == "swiglu_oai":
        g = te.min(g, tvm.tirx.const(limit, F32))
        u = te.max(te.min(u, tvm.tirx.const(limit, F32)), tvm.tirx.const(-limit, F32))
        return (u + 1.0) * (g * te.sigmoid(g * alpha))
    return _plain_act(kind, g) * u


def _panels(n: int, p: int) -> int:
    return -(-n // p)


def _weight(problem: Problem, experts: int, npanel: int, red: int, width: int, name: str):
    """A GEMM's panelled weight: (its placeholders, value(e, p, k, j) as fp32, scale(e, p, g, j) or None).

    Dense: value is the weight and scale None. Quantized: value is the code and scale the fp32 scale of group
    g = k // G, applied once per group by `_accumulate`. An int4 value is the nibble itself, code + 8: the 8 is
    taken off once per group (`_accumulate`'s offset), not once per weight."""
    if problem.quant == "none":
        w = te.placeholder((experts, npanel, red, width), problem.dtype, name=name)
        return [w], lambda e, p, k, j: w[e, p, k, j].astype(F32), None
    int4, group = problem.quant == "int4", problem["G"]
    half = width // 2  # int4: byte c of a panel row holds columns c and c + W/2 (kernels/quant.py)
    codes = te.placeholder(
        (experts, npanel, red, half if int4 else width), "uint8" if int4 else "int8", name=f"{name}_codes"
    )
    scales = te.placeholder((experts, npanel, red // group, width), "float16", name=f"{name}_scales")

    def code(e, p, k, j):
        if not int4:
            return codes[e, p, k, j].astype(F32)
        return ((codes[e, p, k, j % half].astype("int32") >> (j // half * 4)) & 15).astype(F32)

    return [codes, scales], code, lambda e, p, g, j: scales[e, p, g, j].astype(F32)


def _group_sums(problem: Problem, rows: tuple, red: int, name: str):
    """int4: (the placeholder of the inputs' sums per group of G, lhs_sum(b, m, g)); else ([], None)."""
    if problem.quant != "int4":
        return [], None
    sums = te.placeholder((*rows, red // problem["G"]), F32, name=name)
    return [sums], sums


def _accumulate(
    problem: Problem, shape: tuple, red: int, lhs, where, value, scale, name: str, lhs_sum=None
) -> te.Tensor:
    """name[b, m, j] = sum_k lhs(b, m, k) * weight(k, j) in fp32, the weight at `where(b, j, k)` -> (e, p, k, jj).

    Quantized (scale given), in two levels: "<name>_part"[b, m, g, j] sums the G products of group g with the
    codes alone, then name sums the groups times their scale: one scale multiply per group instead of per
    weight (the schedule computes the part of one group of one register tile at a time). int4 (`lhs_sum`: the
    input's sum over each group): the part used nibbles, code + 8, so 8 x that sum comes off per group."""
    if scale is None:
        k = te.reduce_axis((0, red), name="k")
        return te.compute(shape, lambda b, m, j: te.sum(lhs(b, m, k) * value(*where(b, j, k)), axis=k), name=name)
    group = problem["G"]
    kk = te.reduce_axis((0, group), name="kk")
    part = te.compute(
        (*shape[:2], red // group, shape[2]),
        lambda b, m, g, j: te.sum(lhs(b, m, g * group + kk) * value(*where(b, j, g * group + kk)), axis=kk),
        name=f"{name}_part",
    )
    g = te.reduce_axis((0, red // group), name="g")

    def term(b, m, j):
        v = part[b, m, g, j] if lhs_sum is None else part[b, m, g, j] - 8.0 * lhs_sum(b, m, g)
        return v * scale(*where(b, j, g))

    return te.compute(shape, lambda b, m, j: te.sum(term(b, m, j), axis=g), name=name)


def gemm1_func(problem: Problem, panel: int) -> tvm.tirx.PrimFunc:
    """act[b, m, n] = act(x[tok[b,m]] . Wg[e_b, n] (+ bias), x[tok[b,m]] . Wu[e_b, n] (+ bias)), or for a
    non-gated problem act(x[tok[b,m]] . Wu[e_b, n] (+ bias)).

    Args: x (T,H), tok (NB,BM) i32, wt (NB,BM) f32, bexp (NB,) i32, wgu (E,ceil(I/P),H,W) (qgemm1: its codes
    and scales, module doc; int4: then xsum (T, H/G) f32, x summed per group) [, bias (E,UI)], act (NB,BM,I);
    W = 2P, U = 2 when gated, else W = P, U = 1. A gated panel holds P gate columns then the
    P matching up columns, so one reduction ("GU", fp32) computes gate and up together: one pass over the x
    row feeds both, and a register tile covers 2P columns. A non-gated panel is P plain up columns (the
    layout of every other GEMM) and the activation applies to the one accumulator. With w_in the routing
    weight scales the GEMM result before the bias (= scaling the input). Blocks: "GU" (the reduction), "A"
    (the epilogue, the output).
    """
    h, i, e, bm, dt = problem["H"], problem["I"], problem["E"], problem["BM"], problem.dtype
    gated = bool(problem["gated"])
    t, nb = te.var("T"), te.var("NB")
    x = te.placeholder((t, h), dt, name="x")
    tok = te.placeholder((nb, bm), "int32", name="tok")
    wt = te.placeholder((nb, bm), F32, name="wt")
    bexp = te.placeholder((nb,), "int32", name="bexp")
    npanel, width = _panels(i, panel), (2 * panel if gated else panel)
    wgu, value, scale = _weight(problem, e, npanel, h, width, "wgu")
    xsum, sums = _group_sums(problem, (t,), h, "xsum")
    gu = _accumulate(
        problem,
        (nb, bm, npanel * width),
        h,
        lambda b, m, k: x[tok[b, m], k].astype(F32),
        lambda b, j, k: (bexp[b], j // width, k, j % width),
        value,
        scale,
        "GU",
        None if sums is None else lambda b, m, g: sums[tok[b, m], g],
    )
    args = [x, tok, wt, bexp, *wgu, *xsum]
    bias = te.placeholder((e, (2 if gated else 1) * i), dt, name="bias") if problem["bias"] else None
    out = gemm1_out(problem, panel, gu, wt, bexp, bias)
    return te.create_prim_func([*args, *([bias] if bias is not None else []), out])


def gemm1_out(problem: Problem, panel: int, gu, wt, bexp, bias) -> te.Tensor:
    """gemm1's epilogue "A" (NB, BM, I) from its panelled fp32 accumulator gu (NB, BM, ceil(I/P) * W): the
    routing weight (w_in), the bias, the activation (gated: gate column c and up column c + P of a panel)."""
    i, dt, gated = problem["I"], problem.dtype, bool(problem["gated"])
    width = 2 * panel if gated else panel

    def pre(b, m, col, n):  # one pre-activation: accumulator column col, bias column n, fp32
        v = gu[b, m, col]
        if problem["w_in"]:
            v = v * wt[b, m]
        return v + bias[bexp[b], n].astype(F32) if bias is not None else v

    def epilogue(b, m, n):
        if not gated:
            return _plain_act(problem["act"], pre(b, m, n, n)).astype(dt)
        col = n // panel * width + n % panel
        gv, uv = pre(b, m, col, n), pre(b, m, col + panel, n + i)
        return _act(problem["act"], gv, uv, problem["alpha"], problem["limit"]).astype(dt)

    return te.compute((gu.shape[0], gu.shape[1], i), epilogue, name="A")


def gemm2_func(problem: Problem, panel: int) -> tvm.tirx.PrimFunc:
    """z[b, m, n] = (act[b,m] . Wd[e_b, n] (+ bias)) (* wt[b,m] if w_out); out[t, n] = sum_k z[inv[t,k], n].

    Args: act (NB,BM,I), wt (NB,BM) f32, bexp (NB,) i32, inv (T,K) i32, wd (E,ceil(H/P),I,P) (qgemm2: codes and
    scales; int4: then asum (NB,BM,I/G) f32, act summed per group) [, bias (E,H)],
    z (NB,BM,H) f32 scratch, out (T,H). Blocks: "Zacc" (reduction), "Z" (epilogue), "O" (the combine).
    The combine is a fixed-order sum over K (deterministic, no atomics).
    """
    h, i, e, k, bm, dt = problem["H"], problem["I"], problem["E"], problem["K"], problem["BM"], problem.dtype
    t, nb = te.var("T"), te.var("NB")
    act = te.placeholder((nb, bm, i), dt, name="act")
    wt = te.placeholder((nb, bm), F32, name="wt")
    bexp = te.placeholder((nb,), "int32", name="bexp")
    inv = te.placeholder((t, k), "int32", name="inv")
    wd, value, scale = _weight(problem, e, _panels(h, panel), i, panel, "wd")
    asum, sums = _group_sums(problem, (nb, bm), i, "asum")
    zacc = _accumulate(
        problem,
        (nb, bm, h),
        i,
        lambda b, m, r: act[b, m, r].astype(F32),
        lambda b, n, r: (bexp[b], n // panel, r, n % panel),
        value,
        scale,
        "Zacc",
        None if sums is None else lambda b, m, g: sums[b, m, g],
    )
    args = [act, wt, bexp, inv, *wd, *asum]
    bias = te.placeholder((e, h), dt, name="bias") if problem["bias"] else None
    z, out = gemm2_out(problem, zacc, wt, bexp, inv, bias, t)
    return te.create_prim_func([*args, *([bias] if bias is not None else []), z, out])


def gemm2_out(problem: Problem, zacc, wt, bexp, inv, bias, t) -> tuple[te.Tensor, te.Tensor]:
    """gemm2's epilogue "Z" (NB, BM, H) f32 from its accumulator zacc (bias, w_out) and the combine "O" (T, H):
    each token's K rows of Z summed in a fixed order (deterministic, no atomics)."""
    k, bm, dt = problem["K"], problem["BM"], problem.dtype

    def epilogue(b, m, n):
        v = zacc[b, m, n]
        if bias is not None:
            v = v + bias[bexp[b], n].astype(F32)
        return v * wt[b, m] if problem["w_out"] else v

    z = te.compute(tuple(zacc.shape), epilogue, name="Z")

    def combine(tt, n):
        total = None
        for kk in range(k):
            p = inv[tt, kk]
            term = z[p // bm, p % bm, n]
            total = term if total is None else total + term
        return total.astype(dt)

    return z, te.compute((t, problem["H"]), combine, name="O")


def route_logits_func(problem: Problem, panel: int) -> tvm.tirx.PrimFunc:
    """logits[t, e] = x[t] . W[e] (+ bias[e]) in fp32. Args: x (T,H), w (ceil(E/P),H,P) [, bias (E,)], logits."""
    h, e, dt = problem["H"], problem["E"], problem.dtype
    t = te.var("T")
    x = te.placeholder((t, h), dt, name="x")
    w = te.placeholder((_panels(e, panel), h, panel), dt, name="w")
    r = te.reduce_axis((0, h), name="r")
    acc = te.compute(
        (t, e),
        lambda tt, n: te.sum(x[tt, r].astype(F32) * w[n // panel, r, n % panel].astype(F32), axis=r),
        name="Lacc",
    )
    args = [x, w]
    if problem["bias"]:
        bias = te.placeholder((e,), dt, name="bias")
        args.append(bias)
        logits = te.compute((t, e), lambda tt, n: acc[tt, n] + bias[n].astype(F32), name="L")
    else:
        logits = te.compute((t, e), lambda tt, n: acc[tt, n], name="L")
    return te.create_prim_func([*args, logits])


# ---- CUDA variants (schedules/tvm_cuda.py) ------------------------------------------------------------------
# The GPU kernels read the weights in their natural layout (E, U*I, H) and (E, H, I): a weight row is contiguous
# along the reduction, so a thread block stages (rows x BK) tiles of both operands in shared memory with
# coalesced, vectorised loads and nothing is packed on the host (a deployed model passes its parameters as they
# are). Two extra stages make those tiles expressible as TE producers the schedule can place in shared memory:
# "XG", the gathered token rows (an indirect read, which `cache_read` cannot stage), and "WG", the block's expert
# weights (the expert index bexp[b] is data, so the region of a plain cache_read would be all E experts).
# Empty trailing blocks (bexp = -1, kernels/ops.py) read expert 0 (clamped, so no out-of-bounds address is ever
# formed) and the schedule skips their reduction; gemm1 writes zeros into their rows.


def _expert(bexp, b):
    return te.max(bexp[b], tvm.tirx.const(0, "int32"))


def gemm1_cuda_func(problem: Problem) -> tvm.tirx.PrimFunc:
    """act[b, m, n] as gemm1_func, weights unpacked.

    Args: x (T,H), tok (NB,BM) i32, wt (NB,BM) f32, bexp (NB,) i32, w (E,U*I,H) [, bias (E,U*I)], act (NB,BM,I).
    Blocks: "XG" (gathered rows), "WG" (the block's expert weights as (NB, U, I, H)), "GU" (fp32 reduction,
    (NB, BM, U, I): gate u=0 and up u=1 side by side, so one thread's tile holds both halves of its columns),
    "A" (epilogue: activation, zeros for an empty block).
    """
    h, i, e, bm, dt = problem["H"], problem["I"], problem["E"], problem["BM"], problem.dtype
    u = 2 if problem["gated"] else 1
    t, nb = te.var("T"), te.var("NB")
    x = te.placeholder((t, h), dt, name="x")
    tok = te.placeholder((nb, bm), "int32", name="tok")
    wt = te.placeholder((nb, bm), F32, name="wt")
    bexp = te.placeholder((nb,), "int32", name="bexp")
    w = te.placeholder((e, u * i, h), dt, name="w")
    xg = te.compute((nb, bm, h), lambda b, m, k: x[tok[b, m], k], name="XG")
    wg = te.compute((nb, u, i, h), lambda b, uu, n, k: w[_expert(bexp, b), uu * i + n, k], name="WG")
    k = te.reduce_axis((0, h), name="k")
    gu = te.compute(
        (nb, bm, u, i),
        lambda b, m, uu, n: te.sum(xg[b, m, k].astype(F32) * wg[b, uu, n, k].astype(F32), axis=k),
        name="GU",
    )
    args = [x, tok, wt, bexp, w]
    bias = te.placeholder((e, u * i), dt, name="bias") if problem["bias"] else None
    if bias is not None:
        args.append(bias)

    def pre(b, m, uu, n):
        v = gu[b, m, uu, n]
        if problem["w_in"]:
            v = v * wt[b, m]
        return v + bias[_expert(bexp, b), uu * i + n].astype(F32) if bias is not None else v

    def epilogue(b, m, n):
        if u == 1:
            v = _plain_act(problem["act"], pre(b, m, 0, n))
        else:
            v = _act(problem["act"], pre(b, m, 0, n), pre(b, m, 1, n), problem["alpha"], problem["limit"])
        return te.if_then_else(bexp[b] >= 0, v, tvm.tirx.const(0.0, F32)).astype(dt)

    out = te.compute((nb, bm, i), epilogue, name="A")
    return te.create_prim_func([*args, out])


def gemm2_cuda_func(problem: Problem) -> tvm.tirx.PrimFunc:
    """z and out as gemm2_func, weights unpacked.

    Args: act (NB,BM,I), wt (NB,BM) f32, bexp (NB,) i32, inv (T,K) i32, w (E,H,I) [, bias (E,H)], z (NB,BM,H) f32
    scratch, out (T,H). Blocks: "WG" (the block's expert weights as (NB, H, I)), "Zacc" (reduction), "Z"
    (epilogue), "O" (fixed-order combine over K: deterministic). An empty block's z rows are never read (no slot
    maps to them).
    """
    h, i, e, k, bm, dt = problem["H"], problem["I"], problem["E"], problem["K"], problem["BM"], problem.dtype
    t, nb = te.var("T"), te.var("NB")
    act = te.placeholder((nb, bm, i), dt, name="act")
    wt = te.placeholder((nb, bm), F32, name="wt")
    bexp = te.placeholder((nb,), "int32", name="bexp")
    inv = te.placeholder((t, k), "int32", name="inv")
    w = te.placeholder((e, h, i), dt, name="w")
    wg = te.compute((nb, h, i), lambda b, n, r: w[_expert(bexp, b), n, r], name="WG")
    r = te.reduce_axis((0, i), name="r")
    zacc = te.compute(
        (nb, bm, h), lambda b, m, n: te.sum(act[b, m, r].astype(F32) * wg[b, n, r].astype(F32), axis=r), name="Zacc"
    )
    args = [act, wt, bexp, inv, w]
    bias = te.placeholder((e, h), dt, name="bias") if problem["bias"] else None
    if bias is not None:
        args.append(bias)

    def epilogue(b, m, n):
        v = zacc[b, m, n]
        if bias is not None:
            v = v + bias[_expert(bexp, b), n].astype(F32)
        return v * wt[b, m] if problem["w_out"] else v

    z = te.compute((nb, bm, h), epilogue, name="Z")

    def combine(tt, n):
        total = None
        for kk in range(k):
            p = inv[tt, kk]
            term = z[p // bm, p % bm, n]
            total = term if total is None else total + term
        return total.astype(dt)

    out = te.compute((t, h), combine, name="O")
    return te.create_prim_func([*args, z, out])
