"""Timing: warm-up, then many timed calls on rotating inputs; report p20 / p50 / p80.

CPU kernels are synchronous, so a perf_counter around each call times the kernel itself (a GPU path would
synchronise or use events). Inputs rotate through several random sets so caches do not flatter a provider
that reads the same few bytes every call; never zeros.
"""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    n: int


def quantiles_ms(samples_s: Sequence[float]) -> Timing:
    ms = sorted(s * 1e3 for s in samples_s)
    if len(ms) == 1:
        return Timing(ms[0], ms[0], ms[0], 1)
    q = statistics.quantiles(ms, n=10, method="inclusive")  # deciles: q[1] = p20, q[4] = p50, q[7] = p80
    return Timing(q[1], q[4], q[7], len(ms))


def measure(
    fn: Callable[[Any], Any], inputs: Sequence[Any], warmup: int = 2, repeat: int = 10, max_seconds: float = 20.0
) -> Timing:
    """Time fn(inputs[i % len(inputs)]) `repeat` times after `warmup` calls (fewer if max_seconds runs out)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for i in range(repeat):
        start = time.perf_counter()
        fn(inputs[i % len(inputs)])
        samples.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(samples) >= 3:
            break
    return quantiles_ms(samples)


def machine_name() -> str:
    """A stable folder name for results/: CPU model and core count (GPU runs add the GPU name)."""
    from moetune.kernels.target import host_cpu

    cpu = host_cpu()
    slug = re.sub(r"[^a-z0-9]+", "-", cpu["name"].lower()).strip("-")
    return f"{slug}-{cpu['cores']}c-{platform.machine()}"
