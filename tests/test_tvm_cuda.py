"""The TVM CUDA backend on a CPU machine: TVM codegen -> nvcc cubin for sm_XX, and the launch metadata.

Legend: H hidden, I intermediate, E experts, K top-k, BM rows per block, NB blocks.

No GPU here: each case emits CUDA C for gemm1 / gemm2 (fp16 and bf16, gated and not, biases, w_in / w_out),
compiles it with nvcc into a cubin, and checks that what the JSON next to it says is complete and consistent:
kernel names present in the cubin, block sizes within 1024 threads and equal to __launch_bounds__, static shared
memory from ptxas equal to the schedule's accounting and within the architecture's limit, no spills, every
argument named and typed, the grid a function of NB (and T for gemm2's combine). Running the kernels is
tests/test_gpu.py's job (marked gpu).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moetune.ir.program import Problem
from moetune.ir.target import resolve_target
from moetune.kernels.registry import backends_for, default_config
from moetune.kernels.tvm_cuda import cupy_launch
from moetune.schedules import tvm_cuda as tvm_cuda_schedules

tvm_cuda = pytest.importorskip("moetune.kernels.tvm_cuda.launchers")
pytestmark = pytest.mark.skipif(tvm_cuda.nvcc() is None, reason="needs nvcc")


def _gemm1(dtype, gated, bias=False, w_in=False, bm=16, h=256, i=128, act="silu"):
    return Problem.make(
        "gemm1", dtype, H=h, I=i, E=8, BM=bm, gated=gated, act=act, alpha=0.0, limit=0.0, bias=bias, w_in=w_in
    )


def _gemm2(dtype, bias=False, bm=16, h=256, i=128):
    return Problem.make("gemm2", dtype, H=h, I=i, E=8, K=2, BM=bm, bias=bias, w_out=True)


CASES = [
    ("sm_90", _gemm1("bfloat16", True, bias=True), None),  # gated + bias, default point
    ("sm_80", _gemm1("float16", False, w_in=True, act="gelu"), None),  # non-gated, w_in
    ("sm_90", _gemm1("bfloat16", True, bm=64), {"BMT": 32, "BN": 32, "TM": 2, "TN": 2, "BK": 16, "VEC": 2}),
    ("sm_90", _gemm2("bfloat16", bias=True), None),
    ("sm_89", _gemm2("float16", bm=32, i=96), {"BMT": 16, "BN": 64, "TM": 2, "TN": 4, "BK": 32, "VEC": 4}),
]


@pytest.mark.parametrize(("arch", "problem", "point"), CASES, ids=lambda v: str(v)[:40] if v is not None else "default")
def test_cubin_and_launch_metadata(arch, problem, point):
    target = resolve_target(arch)
    point = point or tvm_cuda_schedules.default_point(problem, target)
    assert tvm_cuda_schedules.space(problem, target).is_feasible(point)
    cubin, meta = tvm_cuda.build(problem, point, target)
    data = Path(cubin).read_bytes()
    assert data[:4] == b"\x7fELF" and meta["cubin_bytes"] == len(data)
    assert json.loads(Path(cubin).with_suffix(".json").read_text()) == meta  # the stored copy
    assert (meta["arch"], meta["problem"], meta["point"]) == (arch, problem.signature, point)
    roles = [k["role"] for k in meta["kernels"]]
    assert roles == (["main"] if problem.op == "gemm1" else ["main", "combine"])
    limits = target.limits
    sizes = {"NB": 7, "T": 5}
    for kernel in meta["kernels"]:
        assert kernel["name"].encode() + b"\x00" in data  # the symbol is in the cubin's string table
        threads = kernel["block"][0] * kernel["block"][1] * kernel["block"][2]
        assert threads == kernel["launch_bound"] <= 1024
        assert 0 < kernel["registers"] <= 255 and kernel["spill_stores"] == 0
        assert kernel["static_smem"] + kernel["dynamic_smem"] <= min(
            limits.smem_per_block, tvm_cuda_schedules.STATIC_SMEM
        )
        assert all(a["name"] and a["dtype"] in cupy_launch.TORCH_DTYPES for a in kernel["args"])
        assert {a["name"] for a in kernel["args"] if not a["pointer"]} <= set(sizes)
        assert all(v >= 1 for v in cupy_launch.grid_of(kernel, sizes))
    main = meta["kernels"][0]
    assert main["static_smem"] == tvm_cuda_schedules.smem_bytes(
        problem, point
    )  # ptxas agrees with the space's accounting
    n = problem["I"] if problem.op == "gemm1" else problem["H"]
    assert cupy_launch.grid_of(main, sizes) == (7 * problem["BM"] // point["BMT"], n // point["BN"], 1)
    assert {"bexp", "w"} <= {a["name"] for a in main["args"]}
    if shutil.which("cuobjdump"):
        listing = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        assert main["name"] in listing


def test_empty_blocks_are_guarded_in_the_source():
    """Every thread block of an empty block (bexp = -1) skips the reduction: the guard wraps its loop."""
    problem, target = _gemm1("bfloat16", True, bm=32), resolve_target("sm_90")
    point = {"BMT": 16, "BN": 64, "TM": 4, "TN": 2, "BK": 32, "VEC": 4}
    source = tvm_cuda.emit_source(problem, point, target)
    guard = source.index("if (bexp_ptr[(((int)blockIdx.x) / 2)] >= 0)")
    assert source.index("__syncthreads", guard) > guard  # the shared-memory loop is inside
    assert "max(bexp_ptr[" in source  # weights of an empty block are read at a clamped expert, never at -1


def test_second_build_is_a_cache_hit(tmp_path, monkeypatch):
    problem, target = _gemm2("float16"), resolve_target("sm_90")
    point = tvm_cuda_schedules.default_point(problem, target)
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tvm_cuda._CACHE, "memory", {})
    first = tvm_cuda.build(problem, point, target)
    monkeypatch.setattr(tvm_cuda._CACHE, "memory", {})
    monkeypatch.setattr(tvm_cuda, "compile_cubin", lambda *a: pytest.fail("recompiled"))
    assert tvm_cuda.build(problem, point, target) == first


def test_registry_and_spaces():
    target = resolve_target("sm_90")
    assert backends_for("gemm1", "cuda")[:2] == ["triton", "tvm_cuda"]
    assert "tvm_cuda" not in backends_for("gemm1", "cpu")
    assert backends_for("align", "cuda", ("tvm_cuda",)) == []  # GEMMs only
    for problem in (_gemm1("bfloat16", True), _gemm1("float16", False, bm=128), _gemm2("bfloat16", bm=32)):
        config = default_config(problem, "tvm_cuda", target)
        assert tvm_cuda_schedules.space(problem, target).is_feasible(config.as_dict())
        assert len(list(tvm_cuda_schedules.space(problem, target).points())) > 10
