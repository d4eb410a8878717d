"""Weight layouts for the CPU gemm2 of qwen3-30b-a3b (fp32, full size): could the kernels read a weight where it
already is, instead of a packed copy? Two layouts that need no copy, each against the packed panels of the same
tile, same inputs, same process (p50 of 15 calls). Run: .venv/bin/python results/<machine>/layout_experiments.py

  rows     the parameter's own (E, H, I) layout, rows contiguous along the reduction: dot-product tiles
           (mt rows x nt outputs, a vector of partial sums per output over the reduction, summed at the end)
  k-major  the parameter's storage transposed once to (E, I, H) (the parameter becomes a strided view of it):
           the packed kernels with one panel as wide as the output, each tile reading nt of H columns per step
"""

import statistics
import time

import torch
import tvm
from tvm import te

from moetune.ir import tvm_ir
from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels.registry import KernelConfig, get_impl
from moetune.model.config import MoEConfig
from moetune.schedules import tvm_cpu

F32 = "float32"
TARGET = resolve_target("cpu")
LANES, _ = tvm_cpu.simd(TARGET)


def median_ms(fn, n: int = 15) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gemm2_rows(h: int, i: int, e: int, k: int, bm: int):
    """gemm2 on (E, H, I) weights: ZP[b, m, n, l] partial sums over the reduction in vectors of LANES."""
    t, nb = te.var("T"), te.var("NB")
    act = te.placeholder((nb, bm, i), F32, name="act")
    wt = te.placeholder((nb, bm), F32, name="wt")
    bexp = te.placeholder((nb,), "int32", name="bexp")
    inv = te.placeholder((t, k), "int32", name="inv")
    wd = te.placeholder((e, h, i), F32, name="wd")
    ko = te.reduce_axis((0, i // LANES), name="ko")
    zp = te.compute(
        (nb, bm, h, LANES),
        lambda b, m, n, lane: te.sum(act[b, m, ko * LANES + lane] * wd[bexp[b], n, ko * LANES + lane], axis=ko),
        name="ZP",
    )
    lane = te.reduce_axis((0, LANES), name="lane")
    zacc = te.compute((nb, bm, h), lambda b, m, n: te.sum(zp[b, m, n, lane], axis=lane), name="Zacc")
    z = te.compute((nb, bm, h), lambda b, m, n: zacc[b, m, n] * wt[b, m], name="Z")

    def combine(tt, n):
        total = z[inv[tt, 0] // bm, inv[tt, 0] % bm, n]
        for kk in range(1, k):
            total = total + z[inv[tt, kk] // bm, inv[tt, kk] % bm, n]
        return total

    out = te.compute((t, h), combine, name="O")
    return te.create_prim_func([act, wt, bexp, inv, wd, z, out])


def _combine_schedule(sch) -> None:
    t, n = sch.get_loops(sch.get_sblock("O"))
    _, ni = sch.split(n, [None, LANES])
    sch.parallel(t)
    sch.vectorize(ni)


def rows_module(h, i, e, k, bm, mt, nt):
    sch = tvm.s_tir.Schedule(gemm2_rows(h, i, e, k, bm))
    b, m, n = sch.get_loops(sch.get_sblock("Z"))
    mo, mi = sch.split(m, [None, mt])
    no, ni = sch.split(n, [None, nt])
    sch.reorder(no, b, mo, mi, ni)
    zacc, zp = sch.get_sblock("Zacc"), sch.get_sblock("ZP")
    for block in (zacc, zp):
        sch.compute_at(block, mo)
        sch.set_scope(block, 0, "local")
    *spatial, lane, ko = sch.get_loops(zp)[3:]
    sch.reorder(ko, *spatial, lane)
    sch.vectorize(lane)
    for loop in spatial + sch.get_loops(zacc)[3:-1]:
        sch.unroll(loop)
    sch.parallel(sch.fuse(no, b))
    sch.decompose_reduction(zp, sch.get_loops(zp)[2])
    _combine_schedule(sch)
    return tvm.compile(sch.mod["main"], target=tvm.target.Target(TARGET.tvm))


def kmajor_module(problem, point, h):
    sch = tvm.s_tir.Schedule(tvm_ir.gemm2_func(problem, h))  # one panel of width H = the transposed weight
    tvm_cpu._tile_accumulators(sch, sch.get_sblock("Z"), ("Zacc",), point, rows_split=True)
    _combine_schedule(sch)
    return tvm.compile(sch.mod["main"], target=tvm.target.Target(TARGET.tvm))


def compare(cfg: MoEConfig, tokens: int, points: list[dict], row_tiles: list[tuple[int, int]]) -> None:
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k
    wd = torch.randn(e, h, i) * 0.02
    wd_kmajor = wd.transpose(1, 2).contiguous().unsqueeze(1)  # (E, 1, I, H)
    prog = lower(cfg, tokens)
    p2 = prog.op("experts.gemm2")
    bm = p2["BM"]
    x = torch.randn(tokens, h)
    route = get_impl("route", "torch").fn
    w, ids = route(prog.op("route"), KernelConfig.of("torch"), TARGET, x, torch.randn(e, h) * 0.02, None, None)
    al = get_impl("align", "tvm").fn(prog.op("align"), KernelConfig.of("tvm"), TARGET, w, ids)
    act = torch.randn(al.num_blocks, bm, i)
    used = al.trimmed()
    a = act[: used.num_blocks].contiguous()
    z, out = torch.empty(used.num_blocks, bm, h), torch.empty(tokens, h)
    g2 = get_impl("gemm2", "tvm").fn

    def packed_ms(config: KernelConfig) -> float:
        return median_ms(lambda: g2(p2, config, TARGET, act, al, wd, None))

    def module_ms(mod, weight: torch.Tensor) -> float:
        return median_ms(lambda: mod["main"](a, used.sorted_weight, used.block_expert, used.inverse, weight, z, out))

    for point in points:
        config = KernelConfig.of("tvm", {**point, "order": "panels_outer", "par": "fused"})
        ref = g2(p2, config, TARGET, act, al, wd, None)
        packed = packed_ms(config)
        kmajor = module_ms(kmajor_module(p2, config.as_dict(), h), wd_kmajor)
        err = ((out - ref).norm() / ref.norm()).item()
        print(f"T={tokens} {point}: packed {packed:.2f} ms, k-major {kmajor:.2f} ({packed / kmajor:.2f}x) {err:.0e}")
    for mt, nt in row_tiles:
        rows = module_ms(rows_module(h, i, e, k, bm, mt, nt), wd)
        err = ((out - ref).norm() / ref.norm()).item()
        print(f"T={tokens} rows mt={mt} nt={nt}: {rows:.2f} ms (packed {packed:.2f}, {packed / rows:.2f}x) {err:.0e}")


def main() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig.preset("qwen3-30b-a3b", dtype="float32")
    compare(cfg, 1, [dict(kt=1, mt=1, nt=32), dict(kt=4, mt=1, nt=64)], [(1, 4), (1, 8)])
    compare(cfg, 256, [dict(kt=8, mt=8, nt=32), dict(kt=4, mt=4, nt=64)], [(4, 4), (2, 8)])


if __name__ == "__main__":
    main()
