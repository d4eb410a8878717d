"""Build a scheduled TVM op for a target, with an on-disk cache of compiled modules.

Key = sha256 of (problem signature, schedule point, target string, TVM version, kernel source hash), so a
second process loads the .so instead of recompiling, and any change to the IR or schedule code (which
changes the source hash) or to TVM invalidates the entry. Cache dir: $MOETUNE_CACHE_DIR/tvm, else
~/.cache/moetune/tvm. Entries are written to a temp file and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from moetune.ir.program import Problem
from moetune.kernels.target import Target

# TVM starts its thread pool on the first parallel call and reads this then; default to the usable cores.
if hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import tvm

_KERNEL_SOURCES = ("ir/tvm_ir.py", "ir/tvm_script.py", "schedules/cpu.py", "kernels/tvm_build.py")
_LOADED: dict[str, Any] = {}


@cache
def kernel_source_hash() -> str:
    """sha256 over the files that decide what a TVM kernel computes and how it is scheduled."""
    import moetune.ir
    import moetune.kernels
    import moetune.schedules

    roots = {"ir": moetune.ir, "kernels": moetune.kernels, "schedules": moetune.schedules}
    digest = hashlib.sha256()
    for rel in _KERNEL_SOURCES:
        folder, name = rel.split("/")
        digest.update(Path(roots[folder].__path__[0], name).read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("MOETUNE_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "moetune"
    return base / "tvm"


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
    from moetune.schedules import cpu

    return tvm.compile(cpu.scheduled_module(problem, point, target), target=tvm.target.Target(target.tvm))


def build(problem: Problem, point: dict[str, Any], target: Target):
    """The compiled module of (problem, point, target): from memory, else from disk, else compiled and saved."""
    key = cache_key(problem, point, target)
    if key in _LOADED:
        return _LOADED[key]
    path = cache_dir() / f"{key}.so"
    module = None
    if path.exists():
        try:
            module = tvm.runtime.load_module(str(path))
        except Exception:  # a truncated or foreign file: rebuild it
            module = None
    if module is None:
        lib = compile_op(problem, point, target)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            lib.export_library(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        module = tvm.runtime.load_module(str(path))
    _LOADED[key] = module
    return module
