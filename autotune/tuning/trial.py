"""One trial as data: the Task a worker process evaluates and the Result it answers (JSON lines on the wire).

The parent side (worker.py) sends Tasks; the child side (evaluate.py) runs them. Both import this module and
neither imports the other at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Task:
    cfg: dict[str, Any]  # MoEConfig.to_dict()
    m_tokens: int  # T of the program (its M bucket)
    op: str  # program op name, e.g. "experts.gemm1"
    backend: str
    params: dict[str, Any]
    target: str = "cpu"
    repeat: int = 10
    warmup: int = 2
    cutoff_ms: float | None = None  # stop timing early once the median is over this (autotune/measure.py)
    max_seconds: float = 4.0  # timed calls stop once this much time went into them (at least 3 calls)
    seed: int = 0
    imports: tuple[str, ...] = ()  # extra modules to import first (tests register faulty backends this way)


@dataclass
class Result:
    ok: bool
    error: str | None = None
    p20_ms: float = float("nan")
    p50_ms: float = float("nan")
    p80_ms: float = float("nan")
    max_rel_err: float = float("nan")
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
