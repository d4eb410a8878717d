"""Scratch buffers that CPU launchers reuse from call to call, one per name, dtype and thread.

Why: a fresh torch.empty of more than a few MB comes from the OS (glibc serves it with mmap), so every call
page-faults the whole buffer in again as the kernel writes it. Measured on the 2-vCPU AMD EPYC Zen4 host (KVM):
writing a fresh 60 MB buffer took 36 ms, a reused one 4.8 ms; gemm2's per-slot scratch is that size for the
distilled MiniLM student at 6,500 tokens (T*K*H fp32), and the fault cost was most of that op's time.

Only buffers that never leave a launcher live here (a kernel's accumulators and scratch, not its outputs): the
next call of the same launcher on the same thread overwrites them. A buffer larger than MAX_BYTES is not kept
(a one-off long prefill should not pin its scratch for the life of the process); release() drops them all.
"""

from __future__ import annotations

import math
import threading

import torch

MAX_BYTES = 256 << 20  # a kept buffer's largest size; larger requests get a fresh tensor every call
_LOCAL = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor of `shape` and `dtype`, backed by this thread's buffer `name` (grown as needed).

    Its contents are garbage, and it is overwritten by the next scratch(name, ...) call on this thread."""
    n = math.prod(shape)
    if n * dtype.itemsize > MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    pool: dict[tuple[str, torch.dtype], torch.Tensor] = _LOCAL.__dict__.setdefault("pool", {})
    buf = pool.get((name, dtype))
    if buf is None or buf.numel() < n:
        buf = pool[(name, dtype)] = torch.empty(max(n, 1), dtype=dtype)
    return buf[:n].view(shape)


def release() -> int:
    """Drop this thread's scratch buffers; returns the bytes released."""
    pool = _LOCAL.__dict__.pop("pool", {})
    return sum(b.numel() * b.element_size() for b in pool.values())
