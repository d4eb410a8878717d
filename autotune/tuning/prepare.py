"""Prepare a GPU architecture on a machine without that GPU: compile every Triton candidate ahead of time.

`moetune tune --target sm_90 --prepare` lowers the model for CUDA (ir.lower(..., target_kind="cuda")) at each
M bucket, takes every point of each op's Triton space that passes the static constraints (schedules/triton.py),
and compiles the kernel each distinct point launches (kernels/triton/aot.py: aot_spec) with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", <cc>, 32))`: Triton's own pipeline and the ptxas it
ships, no driver needed. From each compile it reads

  shared memory   the kernel's metadata (what Triton's launcher requests and checks against the device)
  registers,      the ptxas log (`-v`: "Used N registers", "N bytes spill stores / loads"); when the log is
  spills          missing, cuobjdump --dump-resource-usage of the cubin (REG, LOCAL)

and judges the point for the architecture (kernels/target.GPU_LIMITS):
  shared memory   over the per-block limit (sm_80 163 KiB, sm_86 / sm_89 99 KiB, sm_90 227 KiB), or no block
                  fits an SM's shared memory
  spills          any spill store or load: local-memory traffic inside the GEMM loop
  registers       registers x threads beyond the SM's 64K registers: not one block fits an SM
  compile error   Triton or ptxas refused it
It also records which matrix instruction the PTX uses (`mma`): wgmma (Hopper's warpgroup MMA), mma (mma.sync,
Ampere's tensor cores, also on Hopper), or fma (no tensor cores: CUDA-core FMAs), so the summary says how many
feasible points reach the tensor cores. Triton uses wgmma on sm_90 only for tiles of at least 64 rows.
The results go into a JSON cache (kernels/triton/aot.py: <cache root>/triton_prepare.json; the cubins
into Triton's cache format beside it, folder triton/) keyed by
the Triton kernel source hash (kernels/triton/common.py: kernel_source_hash, which includes the Triton version),
the architecture and the compiled kernel's identity (AotSpec.key: types, constexprs, warps, stages, hints). A
later tuning run on the GPU reads them through the `aot` constraint of the Triton space, so it measures only
feasible points, and a second prepare compiles only what changed.

Bound on the work: per op the grid is fixed (gemm1 1152 points, gemm2 2304, route 162, align 20), the static
constraints remove most of it, and points that differ only in launch-time parameters (GROUP_M) share one
compile, as do the M buckets (BM is a runtime argument of the kernels). `max_kernels` (default 2000) refuses a
run that would compile more, with a message, rather than running for hours.
Compiles run in a pool of spawned processes (`jobs`, default: the usable cores; 1 compiles in this process),
with progress events.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from moetune.ir.program import Problem, lower
from moetune.ir.target import GpuLimits, Target
from moetune.kernels.triton.aot import aot_spec, cache_path, load_results, result_key, save_results
from moetune.kernels.triton.common import kernel_source_hash
from moetune.model.config import MoEConfig

REASONS = ("shared memory", "spills", "registers", "compile error")


# ---- one compile (runs in a worker process) -------------------------------------------------------------
def _ptxas_numbers(log: str) -> dict[str, int] | None:
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    stack = max((int(v) for v in re.findall(r"(\d+) bytes stack frame", log)), default=0)
    return {"regs": int(regs.group(1)), "spill_bytes": spill, "stack_bytes": stack}


def _cuobjdump_numbers(cubin: bytes) -> dict[str, int]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return {"regs": int(regs.group(1)) if regs else 0, "spill_bytes": int(local.group(1)) if local else 0}


def mma_kind(ptx: str) -> str:
    """The matrix instruction a kernel's PTX uses: wgmma, mma (mma.sync) or fma (none)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else "fma"


def compile_spec(spec, capability: int) -> dict[str, Any]:
    """Compile one AotSpec for a compute capability -> shared, regs, spill_bytes, seconds (or error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    started = time.monotonic()
    gpu = GPUTarget("cuda", capability, 32)
    backend = triton.compiler.make_backend(gpu)
    options = backend.parse_options(
        {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True}
    )
    names = list(spec.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    src = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    log = io.StringIO()
    # always_compile: ptxas runs (and prints its -v log) even when Triton's cache has the kernel. The cubins
    # go to Triton's cache under moetune's cache dir (unless TRITON_CACHE_DIR says otherwise): a GPU host with
    # the same Triton version that points TRITON_CACHE_DIR there loads them instead of compiling.
    with knobs.nvidia.scope(), knobs.compilation.scope(), knobs.cache.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        if "TRITON_CACHE_DIR" not in os.environ:
            knobs.cache.dir = str(cache_path().parent / "triton")
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=gpu, options=options.__dict__)
        except Exception as exc:  # a refused point is a result, not a failed run
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            return {"error": f"{type(exc).__name__}: {first[:200]}", "seconds": time.monotonic() - started}
    numbers = _ptxas_numbers(log.getvalue()) or _cuobjdump_numbers(compiled.asm["cubin"])
    mma = mma_kind(compiled.asm["ptx"])
    return {"shared": int(compiled.metadata.shared), **numbers, "mma": mma, "seconds": time.monotonic() - started}


def assess(raw: dict[str, Any], limits: GpuLimits, num_warps: int) -> dict[str, Any]:
    """A compile result judged for an architecture: feasible, reason, blocks_per_sm."""
    out = dict(raw)
    if "error" in raw:
        return {**out, "feasible": False, "reason": "compile error", "blocks_per_sm": 0}
    if raw["shared"] > limits.smem_per_block:
        return {**out, "feasible": False, "reason": "shared memory", "blocks_per_sm": 0}
    if raw["spill_bytes"] > 0:
        return {**out, "feasible": False, "reason": "spills", "blocks_per_sm": None}
    threads = 32 * num_warps
    regs_per_warp = -(-max(raw["regs"], 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = limits.regs_per_sm // (regs_per_warp * num_warps)
    by_smem = limits.smem_per_sm // (raw["shared"] + 1024) if raw["shared"] else limits.max_blocks_per_sm
    blocks = min(by_regs, by_smem, limits.max_threads_per_sm // threads, limits.max_blocks_per_sm)
    if by_regs < 1:
        return {**out, "feasible": False, "reason": "registers", "blocks_per_sm": 0}
    if blocks < 1:
        return {**out, "feasible": False, "reason": "shared memory", "blocks_per_sm": 0}
    return {**out, "feasible": True, "reason": None, "blocks_per_sm": blocks}


def _compile_task(problem: Problem, point: dict[str, Any], capability: int) -> dict[str, Any]:
    return compile_spec(aot_spec(problem, point), capability)


def _compile_all(todo: dict[str, tuple], capability: int, jobs: int):
    """Yield (key, raw result) as compiles finish: in a pool of spawned processes, or in this one (jobs=1)."""
    if jobs == 1 or len(todo) <= 1:
        for key, (problem, point, _) in todo.items():
            yield key, _compile_task(problem, point, capability)
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(_compile_task, problem, point, capability): key for key, (problem, point, _) in todo.items()
        }
        for future in as_completed(futures):
            try:
                raw = future.result()
            except Exception as exc:  # a crashed worker: that point is a compile error, the run goes on
                raw = {"error": f"{type(exc).__name__}: {exc}"[:200], "seconds": 0.0}
            yield futures[future], raw


# ---- a whole prepare run --------------------------------------------------------------------------------
@dataclass
class OpPrepare:
    """Per program op (over all M buckets): points and the kernels compiled for them."""

    op: str
    problems: int = 0
    grid: int = 0  # points of the full grids
    static_pruned: dict[str, int] = field(default_factory=dict)  # first violated static constraint -> points
    candidates: int = 0  # points passing the static constraints
    kernels: int = 0  # distinct kernels those points launch
    compiled: int = 0  # compiled now
    cached: int = 0  # found in the cache
    feasible: int = 0  # candidate points
    pruned: dict[str, int] = field(default_factory=dict)  # reason -> candidate points
    mma: dict[str, int] = field(default_factory=dict)  # matrix instruction -> feasible points
    seconds: float = 0.0  # compile time summed over workers


@dataclass
class PrepareReport:
    model: str
    target: str
    arch: str
    dtype: str
    m: list[int]
    ops: list[OpPrepare] = field(default_factory=list)
    seconds: float = 0.0
    cache: str = ""
    kernel_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _jobs(jobs: int | None) -> int:
    if jobs:
        return jobs
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(
    cfg: MoEConfig,
    target: Target,
    m: list[int] | tuple[int, ...] = (1, 16, 256),
    jobs: int | None = None,
    force: bool = False,
    max_kernels: int = 2000,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> PrepareReport:
    """Compile every statically feasible Triton point of each op of `cfg` for `target`'s architecture."""
    from triton import knobs

    from moetune.schedules.triton import static_space

    if target.kind != "cuda" or target.limits is None:
        raise ValueError(f"prepare compiles for a CUDA architecture; got target {target}")
    if knobs.runtime.interpret:
        raise ValueError("prepare compiles real kernels: unset TRITON_INTERPRET")
    emit = on_event or (lambda event: None)
    started = time.monotonic()
    path = cache_path()
    cache = load_results(path)
    buckets = sorted({int(v) for v in m})
    report = PrepareReport(cfg.name or "custom", target.name, target.arch, cfg.dtype, buckets, cache=str(path))
    report.kernel_source = kernel_source_hash()

    # points per op: (op name) -> {(signature, point json) -> key}; keys -> (problem, point) to compile
    rows: dict[str, OpPrepare] = {}
    points: dict[str, dict[tuple[str, str], str]] = {}
    todo: dict[str, tuple[Problem, dict[str, Any], int]] = {}
    seen_problems: set[tuple[str, str]] = set()
    for bucket in buckets:
        for op in lower(cfg, bucket, target_kind="cuda"):
            if (op.name, op.problem.signature) in seen_problems:
                continue
            seen_problems.add((op.name, op.problem.signature))
            row = rows.setdefault(op.name, OpPrepare(op.name))
            row.problems += 1
            space = static_space(op.problem)
            pruned = Counter()
            for point in space.grid():
                row.grid += 1
                bad = [c.name for c in space.constraints if not c.check(point)]
                if bad:
                    pruned[bad[0]] += 1
                    continue
                key = result_key(aot_spec(op.problem, point), target.arch)
                points.setdefault(op.name, {})[(op.problem.signature, json.dumps(point, sort_keys=True))] = key
                if key not in todo and (force or key not in cache):
                    todo[key] = (op.problem, point, point.get("num_warps", 4))
            for name, count in pruned.items():
                row.static_pruned[name] = row.static_pruned.get(name, 0) + count
    if len(todo) > max_kernels:
        raise ValueError(
            f"{len(todo)} kernels to compile exceed max_kernels={max_kernels}; prepare fewer M buckets or raise it"
        )
    emit({"kind": "start", "kernels": len(todo), "jobs": _jobs(jobs)})
    fresh: dict[str, dict[str, Any]] = {}
    for done, (key, raw) in enumerate(_compile_all(todo, target.capability, _jobs(jobs)), 1):
        fresh[key] = assess(raw, target.limits, todo[key][2])
        emit({"kind": "compiled", "done": done, "total": len(todo), "key": key, **fresh[key]})
    if fresh:
        save_results(path, fresh)
    results = {**cache, **fresh}
    for name, row in rows.items():
        keys = points.get(name, {})
        row.candidates = len(keys)
        distinct = set(keys.values())
        row.kernels = len(distinct)
        row.compiled = len(distinct & fresh.keys())
        row.cached = row.kernels - row.compiled
        row.seconds = sum(fresh[k].get("seconds", 0.0) for k in distinct & fresh.keys())
        reasons, mma = Counter(), Counter()
        for key in keys.values():
            r = results[key]
            if r["feasible"]:
                row.feasible += 1
                mma[r.get("mma", "?")] += 1
            else:
                reasons[r["reason"]] += 1
        row.pruned = {reason: reasons[reason] for reason in REASONS if reasons[reason]}
        row.mma = dict(mma.most_common())
    report.ops = list(rows.values())
    report.seconds = time.monotonic() - started
    emit({"kind": "end", "report": report})
    return report


def summary_rows(report: PrepareReport) -> list[list[str]]:
    """Table rows: op, problems, grid, static pruned, candidates, kernels (compiled / cached), feasible, pruned,
    the feasible points per matrix instruction, seconds."""
    out = []
    for r in report.ops:
        static = sum(r.static_pruned.values())
        why = ", ".join(f"{k} {v}" for k, v in r.pruned.items()) or "-"
        out.append(
            [
                r.op,
                str(r.problems),
                str(r.grid),
                str(static),
                str(r.candidates),
                f"{r.kernels} ({r.compiled} new, {r.cached} cached)",
                str(r.feasible),
                why,
                ", ".join(f"{k} {v}" for k, v in r.mma.items()) or "-",
                f"{r.seconds:.0f}" if not math.isnan(r.seconds) else "-",
            ]
        )
    return out
