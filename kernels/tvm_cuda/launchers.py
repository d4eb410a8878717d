"""The `tvm_cuda` backend: TVM-scheduled CUDA kernels of gemm1 and gemm2, compiled to cubins, launched by CuPy.

Legend: T tokens, H hidden, I intermediate, E experts, K top-k, BM rows per block, NB blocks, U = 2 for gated
experts else 1.

Build (needs TVM and nvcc, no GPU): schedules/tvm_cuda.py applies a point to ir/tvm_ir.py's CUDA IR, TVM emits
CUDA C (`inspect_source()` of the module's CUDA import), `_guard_empty` makes each thread block of an empty
block (bexp = -1) skip its reduction, and `nvcc -cubin -arch=sm_XY` compiles it here, with `-Xptxas -v` giving
each kernel's registers, spills and shared memory. Next to the cubin goes a JSON file with what a launch needs
(kernel names, argument order and dtypes, grid as a function of NB / T, block, dynamic shared memory) plus the
ptxas numbers. Cache: <cache root>/tvm_cuda (kernels/cache.py's BuildCache), files named by
sha256(problem signature, point, target, TVM version, kernel source hash), written atomically.
Run (needs CuPy and a GPU, no TVM when the cache holds the entry): kernels/tvm_cuda/cupy_launch.py.

Weights are passed as they are ((E, U*I, H) and (E, H, I): no packing); like the Triton backend, no launcher
reads a device value, so it takes an align output with empty trailing blocks (kernels/ops.py) as it is.
Which backend, why a new name: "tvm" is the CPU backend (LLVM, packed panels, a TVM runtime at run time); this
one has another space, layout and runtime, so it is its own registry entry, preferred after triton on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch

from moetune.ir.program import Problem
from moetune.ir.target import Target
from moetune.kernels.cache import BuildCache, source_hash
from moetune.kernels.ops import Aligned
from moetune.kernels.ops import check_tensor as _check
from moetune.kernels.registry import KernelConfig, register_backend, register_impl
from moetune.kernels.tvm_cuda import cupy_launch
from moetune.schedules import tvm_cuda

register_backend("tvm_cuda", space=tvm_cuda.space, default=tvm_cuda.default_point)
_TARGETS = ("cuda",)
_KERNEL_SOURCES = (
    "ir/tvm_ir.py",
    "schedules/tvm_cuda.py",
    "kernels/tvm_cuda/launchers.py",
    "kernels/tvm_cuda/cupy_launch.py",
)
_C_DTYPES = {"half": "float16", "nv_bfloat16": "bfloat16", "float": "float32", "int": "int32"}
_KERNEL_RE = re.compile(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(([^)]*)\) \{')
_CACHE = BuildCache("tvm_cuda", (".cubin", ".json"))  # a JSON file always has its cubin


@cache
def kernel_source_hash() -> str:
    """sha256 (16 hex) over the files that decide what a TVM CUDA kernel computes and how it is scheduled."""
    return source_hash(*_KERNEL_SOURCES)


def _tvm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apache-tvm")
    except PackageNotFoundError:
        import tvm

        return tvm.__version__


def cache_dir() -> Path:
    return _CACHE.folder()


def cache_key(problem: Problem, point: dict[str, Any], target: Target) -> str:
    blob = {"sig": problem.signature, "point": point, "target": f"cuda -arch={target.arch}", "tvm": _tvm_version()}
    blob["src"] = kernel_source_hash()
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def _guard_empty(source: str, rows_per_block: int) -> str:
    """Prefix the main kernel's reduction loop (its first top-level `for`) with `if (bexp[block] >= 0)`.

    The block of blockIdx.x is blockIdx.x / (BM/BMT); the condition is uniform over a thread block, so the
    __syncthreads inside the loop stay legal, and the accumulators are zeroed before it, so an empty block's
    epilogue sees zeros. A rewrite of the emitted source because TVM 0.27's Python API exposes no TIR
    statement mutator and s_tir has no primitive that adds a condition."""
    match = _KERNEL_RE.search(source)
    if match is None or "inv_ptr" in match.group(3) or "bexp_ptr" not in match.group(3):
        raise RuntimeError("TVM CUDA source: no main kernel with a bexp argument")
    loop = re.compile(r"^  for \(int \w+ = 0;", re.M).search(source, match.end())
    if loop is None:
        raise RuntimeError("TVM CUDA source: no reduction loop in the main kernel")
    block = "((int)blockIdx.x)" if rows_per_block == 1 else f"(((int)blockIdx.x) / {rows_per_block})"
    return f"{source[: loop.start()]}  if (bexp_ptr[{block}] >= 0)\n{source[loop.start() :]}"


def _kernels(source: str) -> list[dict[str, Any]]:
    """Each __global__ kernel's name, launch bound and arguments (name, dtype, pointer), in source order."""
    found = []
    for bound, name, params in _KERNEL_RE.findall(source):
        args = []
        for param in params.split(","):
            ctype, _, pname = param.strip().rpartition(" ")
            ctype = ctype.replace("__restrict__", "").strip()
            pointer = ctype.endswith("*")
            args.append(
                {"name": pname.removesuffix("_ptr"), "dtype": _C_DTYPES[ctype.rstrip("* ")], "pointer": pointer}
            )
        found.append({"name": name, "launch_bound": int(bound), "args": args})
    return found


def _ptxas(stderr: str) -> dict[str, dict[str, int]]:
    """registers / spill bytes / static shared memory per kernel, from `nvcc -Xptxas -v`."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            out[name] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "static_smem": 0}
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[name]["spill_stores"], out[name]["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[name]["registers"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            out[name]["static_smem"] = int(m.group(1)) if m else 0
    return out


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    return found or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def emit_source(problem: Problem, point: dict[str, Any], target: Target) -> str:
    """The CUDA C of (problem, point) for the target's architecture, empty-block guard included."""
    import tvm

    lib = tvm.compile(tvm_cuda.scheduled_module(problem, point, target), target=tvm.target.Target(target.tvm))
    cuda = [m for m in lib.mod.imports if m.kind == "cuda"]
    if len(cuda) != 1:
        raise RuntimeError(f"expected one CUDA module from TVM, got {[m.kind for m in lib.mod.imports]}")
    return _guard_empty(cuda[0].inspect_source(), problem["BM"] // point["BMT"])


def compile_cubin(problem: Problem, point: dict[str, Any], target: Target, out: Path) -> dict[str, Any]:
    """Emit, compile with nvcc into `out` (a .cubin) and return the launch metadata (no cache)."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("nvcc not found: the TVM CUDA backend compiles its kernels with nvcc")
    source = emit_source(problem, point, target)
    kernels = _kernels(source)
    plan = {k["role"]: k for k in tvm_cuda.launches(problem, point)}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.cu")
        src.write_text(source)
        cmd = [compiler, "-cubin", f"-arch={target.arch}", "-O3", "-Xptxas", "-v", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    ptxas = _ptxas(proc.stderr)
    for kernel in kernels:
        role = "combine" if any(a["name"] == "inv" for a in kernel["args"]) else "main"
        kernel.update(plan[role], dynamic_smem=0, **ptxas.get(kernel["name"], {}))
        threads = kernel["block"][0] * kernel["block"][1] * kernel["block"][2]
        if threads != kernel["launch_bound"]:
            raise RuntimeError(
                f"{kernel['name']}: block {kernel['block']} != __launch_bounds__ {kernel['launch_bound']}"
            )
    order = {"main": 0, "combine": 1}
    kernels.sort(key=lambda k: order[k["role"]])
    return {
        "problem": problem.signature,
        "point": point,
        "target": target.name,
        "arch": target.arch,
        "tvm": _tvm_version(),
        "source_hash": kernel_source_hash(),
        "cubin_bytes": out.stat().st_size,
        "kernels": kernels,
    }


def build(problem: Problem, point: dict[str, Any], target: Target) -> tuple[str, dict[str, Any]]:
    """(cubin path, launch metadata) of (problem, point, target): memory, else disk, else compiled and saved."""

    def load(paths: list[Path]) -> tuple[str, dict[str, Any]]:
        return str(paths[0]), json.loads(paths[1].read_text())

    def write(paths: list[Path]) -> None:
        meta = compile_cubin(problem, point, target, paths[0])
        paths[1].write_text(json.dumps(meta, indent=1, sort_keys=True))

    return _CACHE.get(cache_key(problem, point, target), load, write)


def _run(problem: Problem, config: KernelConfig, target: Target, tensors: dict, sizes: dict) -> None:
    cubin, meta = build(problem, config.as_dict(), target)
    for kernel in meta["kernels"]:
        cupy_launch.launch(cubin, kernel, tensors, sizes)


@register_impl("gemm1", "tvm_cuda", targets=_TARGETS)
def gemm1(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    x: torch.Tensor,
    al: Aligned,
    gate_up_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
) -> torch.Tensor:
    h, i, e, bm = problem["H"], problem["I"], problem["E"], problem["BM"]
    u = 2 if problem["gated"] else 1
    _check("gate_up_proj", gate_up_proj, (e, u * i, h), x.dtype)
    _check("aligned rows", al.sorted_token, (al.num_blocks, bm))
    out = torch.empty(al.num_blocks, bm, i, dtype=x.dtype, device=x.device)  # (NB, BM, I)
    tensors = {
        "x": x.contiguous(),  # (T, H)
        "tok": al.sorted_token.contiguous(),  # (NB, BM) i32
        "wt": al.sorted_weight.contiguous(),  # (NB, BM) f32
        "bexp": al.block_expert.contiguous(),  # (NB,) i32, -1: empty block
        "w": gate_up_proj.contiguous(),  # (E, U*I, H)
        "A": out,
    }
    if problem["bias"]:
        tensors["bias"] = gate_up_bias.contiguous()  # (E, U*I)
    _run(problem, config, target, tensors, {"NB": al.num_blocks, "T": x.shape[0]})
    return out


@register_impl("gemm2", "tvm_cuda", targets=_TARGETS)
def gemm2(
    problem: Problem,
    config: KernelConfig,
    target: Target,
    act: torch.Tensor,
    al: Aligned,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    h, i, e, bm = problem["H"], problem["I"], problem["E"], problem["BM"]
    _check("down_proj", down_proj, (e, h, i), act.dtype)
    _check("act", act, (al.num_blocks, bm, i), act.dtype)
    t = al.inverse.shape[0]
    tensors = {
        "act": act.contiguous(),  # (NB, BM, I)
        "wt": al.sorted_weight.contiguous(),  # (NB, BM) f32
        "bexp": al.block_expert.contiguous(),  # (NB,) i32
        "inv": al.inverse.contiguous(),  # (T, K) i32: padded position of each slot
        "w": down_proj.contiguous(),  # (E, H, I)
        "Z": torch.empty(al.num_blocks, bm, h, dtype=torch.float32, device=act.device),  # scratch
        "O": torch.empty(t, h, dtype=act.dtype, device=act.device),  # (T, H)
    }
    if problem["bias"]:
        tensors["bias"] = down_bias.contiguous()  # (E, H)
    _run(problem, config, target, tensors, {"NB": al.num_blocks, "T": t})
    return tensors["O"]
