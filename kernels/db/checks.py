"""Checking a record someone else wrote (an imported export file) before it may replace a tuned winner.

A record is runnable here only if its target is a real one (LLVM knows the CPU, or a known CUDA arch), its
backend is registered for that target's kind, its op signature names a canonical Problem whose dtype is the
record's, and its config is a feasible point of that backend's space for the problem on the target. A record
that fails any check would shadow a real winner (better p50 wins) with something nothing can run.
"""

from __future__ import annotations

from typing import Any

from moetune.ir.program import Problem
from moetune.ir.target import resolve_target
from moetune.kernels.registry import BACKEND_TARGETS, backend_info


def record_problem(record: Any) -> str | None:
    """Why a KernelRecord (records.py, which calls this) cannot run here (one line), or None when it can."""
    key = record.key
    try:
        target = resolve_target(key.target)
    except ValueError as exc:
        return f"target: {exc}"
    if record.backend not in BACKEND_TARGETS:
        return f"unknown backend {record.backend[:40]!r}; known: {', '.join(BACKEND_TARGETS)}"
    if target.kind not in BACKEND_TARGETS[record.backend]:
        return f"backend {record.backend} does not run on {target.kind} targets"
    try:
        problem = Problem.from_signature(key.op)
    except ValueError as exc:
        return f"op: {exc}"
    if problem.dtype != key.dtype:
        return f"dtype {key.dtype!r} is not the op's {problem.dtype!r}"
    try:
        space = backend_info(record.backend).space(problem, target)
    except ImportError as exc:  # e.g. the tvm backend on a host without TVM: cannot be checked, so not taken
        return f"backend {record.backend} cannot be checked here ({exc})"
    violations = space.violations(record.config)
    if violations:
        return f"config {record.config} is not a feasible point: {'; '.join(violations)}"
    return None
