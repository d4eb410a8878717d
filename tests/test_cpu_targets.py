"""The CPU schedule spaces on several ISAs, as data and as compiled code, whatever CPU runs the tests.

Development and CI machines change from session to session (AVX2 one time, AVX-512 the next), so nothing here
may assume the host's ISA: the space, its constraints and the default point are computed for named LLVM
targets (AVX2 with 16 vector registers, AVX-512 with 32, AArch64 NEON with 32 of 4 lanes), and one kernel of
each op is compiled (not run) for each of them: LLVM cross-compiles anywhere.
"""

from __future__ import annotations

import re

import pytest
import tvm

from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.model import MoEConfig
from moetune.schedules import tvm_cpu

# target spec -> (fp32 lanes, vector registers, a register name its vector code must use)
ISAS = {
    "llvm -mcpu=znver3": (8, 16, r"%ymm\d+"),  # AVX2
    "llvm -mcpu=skylake-avx512": (16, 32, r"%zmm\d+"),  # AVX-512
    "llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1": (4, 32, r"\bv\d+\.4s\b"),  # NEON
}
QWEN3 = MoEConfig.preset("qwen3-30b-a3b")


@pytest.mark.parametrize("spec", ISAS)
def test_simd_shape_comes_from_the_target(spec):
    lanes, vregs, _ = ISAS[spec]
    assert tvm_cpu.simd(resolve_target(spec)) == (lanes, vregs)


@pytest.mark.parametrize("spec", ISAS)
@pytest.mark.parametrize("op", ["experts.gemm1", "experts.gemm2", "route"])
def test_space_and_default_follow_the_register_file(spec, op):
    lanes, vregs, _ = ISAS[spec]
    target = resolve_target(spec)
    problem = lower(QWEN3, 256).op(op)
    space = tvm_cpu.space(problem, target)
    nts = space.params[0].choices
    assert nts and all(nt % lanes == 0 for nt in nts)  # a panel is whole vectors
    tiles = 2 if op == "experts.gemm1" else 1  # gate and up accumulators side by side
    feasible = list(space.points())
    assert feasible
    for point in feasible:
        assert tiles * point["mt"] * point["nt"] // lanes <= vregs - 4, point
    too_big = [p for p in space.grid() if tiles * p["mt"] * p["nt"] // lanes > vregs - 4]
    if op != "route":  # route has one row per tile: nothing it can choose overflows the registers
        assert too_big and all(any("registers" in v for v in space.violations(p)) for p in too_big)
    default = tvm_cpu.default_point(problem, target)
    assert space.is_feasible(default), space.violations(default)
    width = problem["I"] if op == "experts.gemm1" else problem["H"] if op == "experts.gemm2" else problem["E"]
    assert width % default["nt"] == 0  # qwen3's widths are multiples of every panel: no partial last panel


def test_more_registers_hold_a_bigger_default_tile():
    """AVX-512's 32 registers hold a bigger accumulator tile than AVX2's 16 (more FMAs per loaded weight)."""
    problem = lower(QWEN3, 256).op("experts.gemm1")
    vectors = {}
    for spec, (lanes, _, _) in ISAS.items():
        point = tvm_cpu.default_point(problem, resolve_target(spec))
        vectors[spec] = point["mt"] * point["nt"] // lanes
    assert vectors["llvm -mcpu=skylake-avx512"] > vectors["llvm -mcpu=znver3"]


@pytest.mark.parametrize("spec", ISAS)
def test_every_op_compiles_for_the_isa(spec):
    """Compile (not run) the default kernel of each op; the GEMMs' code uses the ISA's own vector registers."""
    _, _, register = ISAS[spec]
    target = resolve_target(spec)
    cfg = MoEConfig(hidden_size=64, intermediate_size=48, num_experts=8, top_k=2)
    for op in lower(cfg, 16):
        problem = op.problem
        module = tvm_cpu.scheduled_module(problem, tvm_cpu.default_point(problem, target), target)
        asm = tvm.compile(module, target=tvm.target.Target(target.tvm)).mod.inspect_source("asm")
        assert asm, op.name
        if problem.op in ("gemm1", "gemm2"):
            assert re.search(register, asm), (spec, op.name)
        if spec == "llvm -mcpu=znver3":
            assert "zmm" not in asm  # AVX2 code never touches AVX-512 registers (it would SIGILL there)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("llvm -mcpu=bogus", "LLVM does not know the CPU 'bogus'"),
        ("llvm -mcpu=znver3; rm -rf /", "bad CPU target"),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=znver3", "LLVM does not know the CPU 'znver3' for aarch64"),
    ],
)
def test_bad_cpu_targets_are_refused(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_target(spec)


def test_features_the_os_does_not_enable_are_not_reported_as_available():
    """LLVM lists the mcpu's features; a hypervisor may hide some (AMX under KVM): /proc/cpuinfo decides."""
    from moetune.ir.target import split_os_enabled

    llvm = ["amx-tile", "avx2", "avx512bf16", "avx512f", "sse4.1"]
    x86 = "processor\t: 0\nflags\t\t: fpu sse4_1 avx2 avx512f avx512_bf16 avx_vnni\n"
    assert split_os_enabled(llvm, x86) == (["avx2", "avx512bf16", "avx512f", "sse4.1"], ["amx-tile"])
    arm = "Features\t: fp asimd asimddp i8mm\n"
    assert split_os_enabled(["dotprod", "i8mm", "neon", "sve"], arm) == (["dotprod", "i8mm", "neon"], ["sve"])
    assert split_os_enabled(llvm, "") == (llvm, [])  # no cpuinfo: nothing filtered
