"""Preparing GPU architectures on this CPU: CUDA targets, CUDA lowering, Triton spaces, AOT compiles, the CLI.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, BM rows per block.

Real ahead-of-time compiles (Triton + its ptxas, no GPU) check a few configs per kernel for sm_80 and sm_90
(shared memory and registers read back, > 0) and that a config over sm_89's 99 KiB of shared memory is pruned
there while it fits sm_90. The prepare run and its CLI summary are checked with a fake compiler (the counting,
the cache, the space's `aot` constraint, --json), so they stay fast; `moetune tune --target sm_90 --prepare` on a
real preset takes minutes (qwen3-30b-a3b: ~340 kernels).
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from moetune.autotune.cli import app
from moetune.autotune.tuning import prepare as prep
from moetune.ir.program import Problem, lower
from moetune.ir.target import GPU_LIMITS, cuda_gpus, device_slug, resolve_target
from moetune.kernels.registry import backends_for
from moetune.model import MoEConfig
from moetune.schedules import triton as spaces

runner = CliRunner()
SMALL = MoEConfig(hidden_size=256, intermediate_size=96, num_experts=16, top_k=4, dtype="bfloat16", name="small")


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Each test gets its own prepare cache (and Triton's own cache stays out of the home dir)."""
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))


# ---- targets, lowering, registry ----------------------------------------------------------------------------
def test_cuda_targets_resolve_without_a_gpu():
    for spec in ("sm_80", "sm_89", "sm_90", "cuda -arch=sm_90"):
        target = resolve_target(spec)
        assert target.kind == "cuda" and target.name == f"cuda -arch={target.arch}"
        assert target.capability == int(target.arch[3:]) and target.limits == GPU_LIMITS[target.arch]
    assert resolve_target("sm_90").name == "cuda -arch=sm_90"  # the DB's target string
    assert resolve_target("cpu").arch is None
    with pytest.raises(ValueError, match="unknown CUDA architecture 'sm_75'"):
        resolve_target("sm_75")
    if not cuda_gpus():
        with pytest.raises(ValueError, match="no CUDA GPU found"):
            resolve_target.__wrapped__("cuda")


def test_a_gpu_device_target_keeps_its_arch_and_falls_back_to_it():
    """`cuda` resolves to the GPU's arch and name; its winners are looked up under both, the device's first."""
    t = resolve_target("cuda -arch=sm_90 -device=nvidia-h200")
    assert (t.kind, t.arch, t.device, t.capability, t.limits) == (
        "cuda",
        "sm_90",
        "nvidia-h200",
        90,
        GPU_LIMITS["sm_90"],
    )
    assert t.lookup_names == ("cuda -arch=sm_90 -device=nvidia-h200", "cuda -arch=sm_90")
    assert resolve_target("sm_90").lookup_names == ("cuda -arch=sm_90",)
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    with pytest.raises(ValueError, match="bad CUDA target"):
        resolve_target("cuda -arch=sm_90 -gpu=x")


def test_tuned_moe_uses_the_device_records_then_the_arch_records():
    from moetune.kernels.db import KernelKey, KernelRecord, MemoryKernelDB, current_versions
    from moetune.model import MoE, TunedMoE

    cfg = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2, dtype="bfloat16")
    device = resolve_target("cuda -arch=sm_90 -device=nvidia-h200")
    problem = lower(cfg, 16, "cuda").op("experts.gemm1")
    point = dict(spaces.default_point(problem, device), GROUP_M=1)
    assert point != spaces.default_point(problem, device) and spaces.space(problem, device).is_feasible(point)

    def record(target: str, config: dict) -> KernelRecord:
        key = KernelKey(target, problem.signature, problem.dtype, 16)
        return KernelRecord(key, current_versions(), "triton", config, 1.0, 1.0, 1.0, 2.0, 8)

    def chosen(db) -> dict:
        plan = TunedMoE.from_module(MoE(cfg), target=device.name, db=db).describe(16)
        return next(p for p in plan if p["op"] == "experts.gemm1")

    arch_only = chosen(MemoryKernelDB([record("cuda -arch=sm_90", point)]))
    assert arch_only["config"] == point and arch_only["source"] == "db:exact"
    other = dict(point, GROUP_M=32)
    both = chosen(MemoryKernelDB([record("cuda -arch=sm_90", point), record(device.name, other)]))
    assert both["config"] == other  # the device's own winner comes first
    assert chosen(MemoryKernelDB([record("cuda -arch=sm_80", point)]))["source"] == "default"


def test_cuda_lowering_gives_tensor_core_blocks():
    cfg = MoEConfig.preset("qwen3-30b-a3b")
    assert lower(cfg, 1).block_m == 1  # the CPU's rule is unchanged
    assert lower(cfg, 1, "cuda").block_m == 16  # tl.dot needs 16 rows
    assert lower(cfg, 256, "cuda").block_m == 16  # 16 rows per expert on average
    assert lower(cfg, 4096, "cuda").block_m == 128  # 256 rows per expert: capped at the largest BLOCK_M
    assert lower(cfg, 4096, "cuda").op("experts.gemm1")["BM"] == 128
    with pytest.raises(ValueError, match="unknown target kind"):
        lower(cfg, 1, "tpu")


def test_backend_preference_per_target_kind():
    assert backends_for("gemm1", "cuda") == ["triton", "tvm_cuda", "torch"]
    assert backends_for("route", "cuda") == ["triton", "torch"]  # tvm_cuda has the GEMMs only
    assert backends_for("gemm1", "cpu") == ["tvm", "torch"]


DEFAULT_CONFIGS = [MoEConfig.preset(name) for name in MoEConfig.presets()] + [
    MoEConfig(hidden_size=37, intermediate_size=29, num_experts=13, top_k=13, activation="swiglu_oai"),
    MoEConfig(hidden_size=5, intermediate_size=3, num_experts=1, top_k=1, expert_bias=True),
]


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_default_triton_point_of_every_op_is_feasible(kind):
    target = resolve_target("sm_90")
    for cfg in DEFAULT_CONFIGS:
        for t in (1, 7, 64, 4096):
            for op in lower(cfg, t, kind):
                point = spaces.default_point(op.problem, target)
                assert spaces.space(op.problem, target).is_feasible(point), (cfg.name, t, op.name, point)


# ---- real ahead-of-time compiles ---------------------------------------------------------------------------
def _compile(problem: Problem, point: dict, arch: str) -> dict:
    from moetune.kernels.triton.aot import aot_spec

    target = resolve_target(arch)
    return prep.assess(
        prep.compile_spec(aot_spec(problem, point), target.capability), target.limits, point["num_warps"]
    )


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_aot_compile_reads_resources(arch):
    target = resolve_target(arch)
    for op in lower(SMALL, 64, "cuda"):
        point = spaces.default_point(op.problem, target)
        got = _compile(op.problem, point, arch)
        assert "error" not in got, got
        assert got["shared"] > 0 and got["regs"] > 0 and got["seconds"] > 0, (op.name, got)
        assert got["feasible"] and got["blocks_per_sm"] >= 1, (op.name, got)


def test_the_tensor_core_instruction_is_recorded_per_arch():
    """bf16 GEMM tiles of 64 rows use Hopper's wgmma on sm_90 and mma.sync on sm_80; 16-row tiles (decode) stay on
    mma.sync everywhere (a warpgroup MMA needs 64 rows)."""
    problem = lower(MoEConfig.preset("qwen3-30b-a3b", dtype="bfloat16"), 4096, "cuda").op("experts.gemm1")
    big = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
    small = dict(big, BLOCK_M=16)
    assert _compile(problem, big, "sm_90")["mma"] == "wgmma"
    assert _compile(problem, big, "sm_80")["mma"] == "mma"
    assert _compile(problem, small, "sm_90")["mma"] == "mma"
    assert prep.mma_kind("fma.rn.f32 %f1, %f2, %f3, %f4;") == "fma"


def test_shared_memory_over_sm89_is_pruned_there_only():
    # 3 stages of a 16 x 128 activation tile and two 128 x 128 bf16 weight tiles: ~200 KiB on sm_90 (which
    # buffers num_stages tiles), over sm_89's 99 KiB on any count; the static space lets it through
    problem = lower(MoEConfig.preset("qwen3-30b-a3b"), 1, "cuda").op("experts.gemm1")
    point = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    assert spaces.static_space(problem).is_feasible(point)
    on_89, on_90 = _compile(problem, point, "sm_89"), _compile(problem, point, "sm_90")
    assert not on_89["feasible"] and on_89["reason"] == "shared memory", on_89
    assert on_89["shared"] > GPU_LIMITS["sm_89"].smem_per_block
    assert (
        on_90["feasible"] and GPU_LIMITS["sm_89"].smem_per_block < on_90["shared"] <= GPU_LIMITS["sm_90"].smem_per_block
    )


def test_assess_judges_each_resource():
    limits = GPU_LIMITS["sm_90"]
    ok = {"shared": 32 * 1024, "regs": 128, "spill_bytes": 0}
    assert prep.assess(ok, limits, 4)["feasible"]
    assert prep.assess({**ok, "shared": 300 * 1024}, limits, 4)["reason"] == "shared memory"
    assert prep.assess({**ok, "spill_bytes": 8}, limits, 4)["reason"] == "spills"
    assert prep.assess({**ok, "regs": 255}, limits, 32)["reason"] == "registers"  # 255 x 1024 threads > 64K
    assert prep.assess({"error": "PTXASError: boom"}, limits, 4)["reason"] == "compile error"
    assert prep.assess(ok, limits, 4)["blocks_per_sm"] == 4  # 64K registers / (128 regs x 128 threads)


# ---- prepare runs with a fake compiler (fast) ---------------------------------------------------------------
def _fake_compile(calls: list):
    """shared = the A + U*B tile bytes per stage x stages; spills for the widest route tiles."""

    def compile_spec(spec, capability):
        calls.append(spec.key())
        c = spec.constexprs
        if "BLOCK_N" in c:
            tiles = 2 if c.get("GATED") else 1
            shared = spec.num_stages * (c["BLOCK_M"] + tiles * c["BLOCK_N"]) * c["BLOCK_K"] * 2
        else:
            shared = 1024
        spill = 64 if c.get("BLOCK_T") == 64 and spec.num_warps == 2 else 0
        mma = "wgmma" if c.get("BLOCK_M", 0) >= 64 else "mma"
        return {"shared": shared, "regs": 96, "spill_bytes": spill, "mma": mma, "seconds": 0.01}

    return compile_spec


def test_prepare_counts_caches_and_feeds_the_space(monkeypatch):
    calls: list = []
    monkeypatch.setattr(prep, "compile_spec", _fake_compile(calls))
    target = resolve_target("sm_89")
    report = prep.prepare(SMALL, target, m=[1, 256], jobs=1)
    rows = {r.op: r for r in report.ops}
    assert set(rows) == {"route", "align", "experts.gemm1", "experts.gemm2"}
    g1 = rows["experts.gemm1"]
    assert g1.problems == 2  # BM 16 at T=1, 32 at T=256
    assert g1.grid == 2 * len(list(spaces.static_space(lower(SMALL, 1, "cuda").op("experts.gemm1")).grid()))
    assert g1.candidates + sum(g1.static_pruned.values()) == g1.grid
    assert g1.kernels < g1.candidates  # GROUP_M and the M buckets share compiles
    assert g1.feasible + sum(g1.pruned.values()) == g1.candidates
    assert g1.pruned.get("shared memory", 0) > 0  # over sm_89's 99 KiB
    assert rows["route"].pruned.get("spills", 0) > 0
    assert len(calls) == sum(r.compiled for r in report.ops) == len(set(calls))
    assert sum(g1.mma.values()) == g1.feasible and set(g1.mma) <= {"wgmma", "mma"}

    again = prep.prepare(SMALL, target, m=[1, 256], jobs=1)  # everything from the cache now
    assert len(calls) == sum(r.compiled for r in report.ops)
    assert all(r.compiled == 0 and r.cached == r.kernels for r in again.ops)
    assert [(r.feasible, r.pruned) for r in again.ops] == [(r.feasible, r.pruned) for r in report.ops]

    # the space on that arch refuses the prepared infeasible points; its default point avoids them
    problem = lower(SMALL, 1, "cuda").op("experts.gemm1")
    big = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    assert any(v.startswith("aot:") for v in spaces.space(problem, target).violations(big))
    assert spaces.space(problem, resolve_target("sm_90")).is_feasible(big)  # not prepared for sm_90: unknown
    assert spaces.space(problem, resolve_target("cpu")).is_feasible(big)
    route = lower(SMALL, 1, "cuda").op("route")
    spilling = {"BLOCK_T": 64, "logits": "fused", "BLOCK_K": 64, "num_warps": 2, "num_stages": 2}
    assert not spaces.space(route, target).is_feasible(spilling)
    assert spaces.space(route, target).is_feasible(spaces.default_point(route, target))


def test_prepare_refuses_too_many_kernels(monkeypatch):
    monkeypatch.setattr(prep, "compile_spec", _fake_compile([]))
    with pytest.raises(ValueError, match="exceed max_kernels=10"):
        prep.prepare(SMALL, resolve_target("sm_90"), m=[1], jobs=1, max_kernels=10)
    with pytest.raises(ValueError, match="CUDA architecture"):
        prep.prepare(SMALL, resolve_target("cpu"), m=[1], jobs=1)


def test_prepare_cli_summary(monkeypatch):
    monkeypatch.setattr(prep, "compile_spec", _fake_compile([]))
    args = ["tune", "--model", "qwen3-30b-a3b", "--m", "1", "--target", "sm_80", "--prepare", "--jobs", "1"]
    data = json.loads(runner.invoke(app, [*args, "--json"]).output)
    assert data["arch"] == "sm_80" and data["target"] == "cuda -arch=sm_80" and data["m"] == [1]
    ops = {row["op"]: row for row in data["ops"]}
    assert set(ops) == {"route", "align", "experts.gemm1", "experts.gemm2"}
    for row in ops.values():
        assert row["candidates"] == row["feasible"] + sum(row["pruned"].values()) > 0
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    for text in ("moetune prepare", "experts.gemm2", "feasible", "cached"):
        assert text in table.output


def test_prepare_cli_bad_input_exits_2():
    small = ["tune", "--model", "olmoe-1b-7b"]
    cases = [
        ([*small, "--prepare"], "--prepare compiles for a GPU architecture: give --target sm_80|sm_86|sm_89|sm_90"),
        ([*small, "--prepare", "--target", "sm_75"], "unknown CUDA architecture 'sm_75'"),
    ]
    if not cuda_gpus():
        cases.append(([*small, "--target", "sm_90"], "use --prepare to compile for it ahead"))
    for argv, message in cases:
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, (argv, result.output)


def test_decode_gemm2_takes_block_k_256_and_a_relaxed_atomic_combine(monkeypatch):
    """Mixtral's gemm2 at T=1 reduces over I = 14336: BLOCK_K = 256 is in the space and compiles for sm_90, and
    the atomic combine's additions are relaxed reductions (no acq_rel fences: only the final sum is read)."""
    seen: list[str] = []
    real = prep.mma_kind
    monkeypatch.setattr(prep, "mma_kind", lambda ptx: seen.append(ptx) or real(ptx))
    problem = lower(MoEConfig.preset("mixtral-8x7b", dtype="bfloat16"), 1, "cuda").op("experts.gemm2")
    point = {**spaces.default_point(problem, resolve_target("sm_90")), "BLOCK_K": 256, "combine": "atomic"}
    assert spaces.static_space(problem).is_feasible(point)
    got = _compile(problem, point, "sm_90")
    assert got["feasible"], got
    adds = re.findall(r"(?:atom|red)\.global\.[\w.]*add[\w.]*", seen[-1])
    assert adds and all(".relaxed." in a for a in adds), adds
