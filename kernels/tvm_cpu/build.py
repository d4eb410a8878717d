"""Build a scheduled TVM op for a target, with an on-disk cache of compiled modules.

Key = sha256 of (problem signature, schedule point, target string, TVM version, kernel source hash), so a
second process loads the .so instead of recompiling, and any change to the IR or schedule code (which
changes the source hash) or to TVM invalidates the entry. Cache dir: <cache root>/tvm (kernels/cache.py: the
one build cache, written to a temp file and renamed, so a crash never leaves half a file).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from moetune.ir.program import Problem
from moetune.ir.target import Target
from moetune.kernels.cache import BuildCache, source_hash

# TVM starts its thread pool on the first parallel call and reads these then. Threads: the usable cores.
if hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
# Spin: after a parallel region TVM's workers busy-wait (300000 rounds by default) before they sleep. A torch op
# that runs next needs its own OpenMP thread on that core, and waited for the scheduler's tick: on the Zen4 host,
# 3 of 48 torch align calls right after a TVM kernel took 8.0 ms instead of 0.13 ms (the "238x" baselines of the
# tuner's report); with 1000 rounds 0 of 48, and the TVM kernels as fast (route 0.066 vs 0.065 ms; whole layer
# within the host's drift). results/amd-epyc-znver4-2c-x86_64/RESULTS.md.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")

import tvm

_KERNEL_SOURCES = (
    "ir/tvm_ir.py",
    "ir/tvm_script.py",
    "ir/tvm_vnni.py",
    "ir/tvm_bf16.py",
    "schedules/tvm_cpu.py",
    "kernels/tvm_cpu/build.py",
)
_CACHE = BuildCache("tvm", (".so",))


@cache
def kernel_source_hash() -> str:
    """sha256 over the files that decide what a TVM kernel computes and how it is scheduled."""
    return source_hash(*_KERNEL_SOURCES)


def cache_dir() -> Path:
    return _CACHE.folder()


def cache_key(problem: Problem, point: dict[str, Any], target: Target) -> str:
    blob = json.dumps(
        {
            "sig": problem.signature,
            "point": point,
            "target": target.name,
            "tvm": tvm.__version__,
            "src": kernel_source_hash(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def compile_op(problem: Problem, point: dict[str, Any], target: Target):
    """Schedule and compile (no cache): returns the tvm runtime Executable."""
    from moetune.schedules import tvm_cpu

    return tvm.compile(tvm_cpu.scheduled_module(problem, point, target), target=tvm.target.Target(target.tvm))


def build(problem: Problem, point: dict[str, Any], target: Target):
    """The compiled module of (problem, point, target): from memory, else from disk, else compiled and saved."""

    def write(paths: list[Path]) -> None:
        compile_op(problem, point, target).export_library(str(paths[0]))

    return _CACHE.get(cache_key(problem, point, target), lambda paths: tvm.runtime.load_module(str(paths[0])), write)
