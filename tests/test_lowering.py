"""Lowering (MoEConfig -> MoEProgram), problem signatures, schedule spaces, and the compiled-kernel cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moetune.ir.program import Problem, block_m_for, lower, m_bucket
from moetune.ir.target import resolve_target
from moetune.model import MoEConfig
from moetune.schedules import tvm_cpu


def test_program_ops_in_order():
    assert [o.name for o in lower(MoEConfig.preset("qwen3-30b-a3b"), 16)] == [
        "route",
        "align",
        "experts.gemm1",
        "experts.gemm2",
    ]
    gated = lower(MoEConfig.preset("qwen1.5-moe-a2.7b"), 16)
    assert [o.name for o in gated][4:] == ["shared.route", "shared.align", "shared.gemm1", "shared.gemm2"]
    assert gated.op("shared.gemm1")["I"] == 5632 and gated.op("shared.gemm1")["E"] == 1
    assert [o.name for o in lower(MoEConfig.preset("deepseek-v3"), 1)][4:] == [
        "shared.align",
        "shared.gemm1",
        "shared.gemm2",
    ]


def test_signatures_are_canonical():
    program = lower(MoEConfig.preset("qwen3-30b-a3b"), 256)
    assert program.op("experts.gemm1").signature == (
        "gemm1[H=2048,I=768,E=128,BM=8,gated=1,act=silu,alpha=0.0,limit=0.0,bias=0,w_in=0]:bfloat16"
    )
    assert program.op("align").signature == "align[E=128,K=8,BM=8]:int32"
    assert lower(MoEConfig.preset("qwen3-30b-a3b"), 200).op("experts.gemm1") == program.op("experts.gemm1")
    # Llama 4 applies the routing weight to the input rows, so gemm2 does not weight its output
    llama = lower(MoEConfig.preset("llama4-scout"), 1)
    assert llama.op("experts.gemm1")["w_in"] and not llama.op("experts.gemm2")["w_out"]


def test_gatedness_and_router_kind_are_in_the_signatures():
    """Gated and non-gated gemm1 kernels compute different things: they must never share a DB key."""
    base = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2, activation="gelu", expert_bias=True)
    student = base.replace(gated=False, router="topk_hard", num_shared_experts=1, shared_intermediate_size=16)
    gated, plain = lower(base, 16), lower(student, 16)
    assert plain.op("experts.gemm1").signature == (
        "gemm1[H=64,I=32,E=8,BM=2,gated=0,act=gelu,alpha=0.0,limit=0.0,bias=1,w_in=0]:float32"
    )
    assert gated.op("experts.gemm1").signature == plain.op("experts.gemm1").signature.replace("gated=0", "gated=1")
    assert not plain.op("shared.gemm1")["gated"]  # the shared expert follows the routed experts
    assert plain.op("route")["router"] == "topk_hard" and "router=topk_hard" in plain.op("route").signature
    assert gated.op("experts.gemm2") == plain.op("experts.gemm2")  # gemm2 reads act (I columns) either way


def test_problem_validation():
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        Problem.make("conv", "float32", H=1)
    with pytest.raises(ValueError, match="align needs dims E, K, BM"):
        Problem.make("align", "int32", E=4, K=2)


def test_m_bucket_and_block_m():
    assert [m_bucket(t) for t in (1, 2, 3, 16, 17, 256)] == [1, 2, 4, 16, 32, 256]
    assert block_m_for(1, 8, 128) == 1  # decode: one row per block, no padding
    assert block_m_for(256, 8, 128) == 8  # 16 rows per expert on average -> blocks of 8
    assert block_m_for(4096, 2, 8) == 8  # capped: panels stay in cache, so bigger blocks only add padding
    with pytest.raises(ValueError, match="token count must be >= 1"):
        m_bucket(0)


@pytest.mark.parametrize("name", MoEConfig.presets())
def test_default_points_are_feasible(name):
    target = resolve_target("cpu")
    for t in (1, 16, 256):
        for op in lower(MoEConfig.preset(name), t):
            space = tvm_cpu.space(op.problem, target)
            point = tvm_cpu.default_point(op.problem, target)
            assert space.is_feasible(point), (op.name, point, space.violations(point))


def test_default_panel_width_divides_the_output_width():
    """gpt-oss-20b/4 has H = I = 720: 32- and 64-wide panels leave a partial last panel (measured 2.8-4.4x slower
    on the whole layer at T=16); the default takes a width that divides the output whenever one fits."""
    target = resolve_target("cpu")
    lanes, _ = tvm_cpu.simd(target)
    for cfg in (
        MoEConfig.preset("gpt-oss-20b").shrunk(4),
        MoEConfig(hidden_size=40, intermediate_size=24, num_experts=4, top_k=2),
    ):
        for t in (1, 16, 256):
            for op in lower(cfg, t):
                if op.problem.op in ("gemm1", "gemm2"):
                    width = op.problem["I"] if op.problem.op == "gemm1" else op.problem["H"]
                    nt = tvm_cpu.default_point(op.problem, target)["nt"]
                    assert width % nt == 0 or width % lanes, (op.name, t, width, nt)


def test_space_is_data_with_named_constraints():
    target = resolve_target("cpu")
    # fp32: the TE template's space on every host (bf16 runs the dot-product kernels where the CPU has AVX-512 BF16)
    problem = lower(MoEConfig.preset("qwen3-30b-a3b").replace(dtype="float32"), 256).op("experts.gemm1")
    space = tvm_cpu.space(problem, target)
    assert space.names == ("nt", "mt", "kt", "order", "par")
    assert set(space.describe()["constraints"]) == {
        "mt_divides_bm",
        "kt_divides_k",
        "registers",
        "panel_not_wider_than_output",
    }
    feasible = list(space.points())
    assert 0 < len(feasible) < sum(1 for _ in space.grid())
    assert any("mt_divides_bm" in v for v in space.violations({**feasible[0], "mt": 3}))
    nts = space.params[0].choices  # this host's panel widths: multiples of its SIMD lanes
    assert nts == tuple(v for v in tvm_cpu.NT_CHOICES if v % tvm_cpu.simd(target)[0] == 0)
    assert space.violations({**feasible[0], "nt": 7}) == [f"nt=7 not in {nts}"]
    with pytest.raises(ValueError, match="infeasible point"):
        tvm_cpu.scheduled_module(problem, {**feasible[0], "mt": 3}, target)


def test_non_gated_gemm1_keeps_one_accumulator_tile():
    """A gated tile holds gate and up accumulators (2 x mt x nt), a non-gated one only up: bigger tiles fit."""
    target = resolve_target("cpu")
    cfg = MoEConfig(hidden_size=64, intermediate_size=64, num_experts=8, top_k=2, activation="gelu")
    gated = tvm_cpu.space(lower(cfg, 256).op("experts.gemm1"), target)
    plain = tvm_cpu.space(lower(cfg.replace(gated=False), 256).op("experts.gemm1"), target)
    assert all(plain.is_feasible(p) for p in gated.points())
    only_plain = [p for p in plain.points() if not gated.is_feasible(p)]
    assert only_plain  # e.g. mt=8 x nt=lanes: 8 accumulator vectors fit the free registers, 16 need more on AVX2
    assert all(all("registers" in v for v in gated.violations(p)) for p in only_plain)


_BUILD = """
import sys
from moetune.ir.program import lower
from moetune.kernels.tvm_cpu import build as tvm_build
from moetune.ir.target import resolve_target
from moetune.model import MoEConfig
from moetune.schedules import tvm_cpu
if sys.argv[1] == "forbid":
    def no_compile(*a, **k):
        raise SystemExit("recompiled although the cache holds the kernel")
    tvm_build.compile_op = no_compile
p = lower(MoEConfig(hidden_size=24, intermediate_size=16, num_experts=4, top_k=2), 8).op("experts.gemm1")
t = resolve_target("cpu")
tvm_build.build(p, tvm_cpu.default_point(p, t), t)
print(len(list(tvm_build.cache_dir().glob("*.so"))))
"""


def test_second_process_loads_the_cached_kernel(tmp_path):
    env = {**os.environ, "MOETUNE_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", _BUILD, "compile"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "1"
    second = subprocess.run([sys.executable, "-c", _BUILD, "forbid"], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr + second.stdout
    assert second.stdout.strip() == "1"


def test_tvm_thread_pool_defaults_leave_the_user_settings_alone():
    """Importing the TVM backend sets TVM's pool size and a short spin (so torch ops after a TVM kernel do not
    stall behind spinning workers) unless the user set them."""
    code = "import os, moetune.kernels.tvm_cpu.build; print(os.environ['TVM_THREAD_POOL_SPIN_COUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    theirs = subprocess.run(
        [sys.executable, "-c", code], env={**env, "TVM_THREAD_POOL_SPIN_COUNT": "77"}, capture_output=True, text=True
    )
    assert ours.stdout.strip() == "1000" and theirs.stdout.strip() == "77", ours.stderr + theirs.stderr
