"""Ahead-of-time facts about Triton kernels: which kernel an op's point launches, and the prepared verdicts.

aot_spec(problem, point)  the AotSpec (common.py) of the kernel that does an op's work: what `triton.compile`
                          needs to build it for a GPU architecture without a GPU (autotune/tuning/prepare.py).
verdict(problem, point, target)
                          the prepared compile result of that kernel for the target's architecture, or None:
                          `moetune tune --target sm_XY --prepare` writes them to <cache root>/triton_prepare.json,
                          keyed by the kernel source hash (with the Triton version), the architecture and the
                          kernel's identity.
Importing this module plugs `verdict` into the Triton search space (schedules/triton.py's `aot` constraint):
the space sits below the kernels in the flow, so it is handed the verdicts instead of importing them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from moetune.ir.program import Problem
from moetune.ir.target import Target
from moetune.kernels.cache import cache_root
from moetune.kernels.triton import align_kernel, gemm_kernels, route_kernel
from moetune.kernels.triton.common import AotSpec, kernel_source_hash
from moetune.schedules import triton as spaces


def aot_spec(problem: Problem, point: dict) -> AotSpec:
    """The AotSpec of the kernel that does an op's work at a point."""
    dtype = problem.dtype if problem.op != "align" else "float32"
    if problem.op == "route":
        return route_kernel.aot(problem, point, dtype)
    if problem.op == "align":
        return align_kernel.aot(problem, point, dtype)
    if problem.gemm == "gemm1":  # gemm1, qgemm1: one kernel (constexpr QUANT)
        return gemm_kernels.aot_gemm1(problem, point, dtype)
    if problem.gemm == "gemm2":
        return gemm_kernels.aot_gemm2(problem, point, dtype)
    raise ValueError(f"no Triton kernel for op {problem.op!r}")


CACHE_FILE = "triton_prepare.json"
SCHEMA = 2  # 2: results carry `mma`
_MEMO: dict[str, tuple[float, dict[str, Any]]] = {}


def cache_path() -> Path:
    return cache_root() / CACHE_FILE


def load_results(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("results", {}) if isinstance(data, dict) and data.get("schema") == SCHEMA else {}


def _cached(path: Path) -> dict[str, Any]:
    """The cache file's results, re-read when the file changes."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    hit = _MEMO.get(str(path))
    if hit is None or hit[0] != mtime:
        hit = _MEMO[str(path)] = (mtime, load_results(path))
    return hit[1]


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Merge into the file (another prepare may have written meanwhile); temp file + rename: never half a file."""
    merged = {**load_results(path), **results}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"schema": SCHEMA, "results": merged}, f, sort_keys=True)
    os.replace(tmp, path)


def result_key(spec: AotSpec, arch: str) -> str:
    return f"{kernel_source_hash()}|{arch}|{spec.key()}"


def verdict(problem: Problem, point: dict[str, Any], target: Target) -> dict[str, Any] | None:
    """The prepared compile result of a point on a CUDA target, or None if it was never compiled."""
    results = _cached(cache_path())
    if not results:
        return None
    return results.get(result_key(aot_spec(problem, point), target.arch))


spaces.set_verdict_source(verdict)
