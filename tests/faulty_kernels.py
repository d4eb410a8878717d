"""Imported by the tuning worker in tests/test_tune.py (never by the test process itself: importing it
re-registers the tvm gemm1 launcher for the whole process). Wraps the tvm gemm1 launcher so that some schedule
points fail in each way a real candidate can (not a test module: pytest does not collect it).

  kt == 2                          raises while "building"
  kt == 8                          segfaults the worker
  kt == 1 and order blocks_outer   hangs
  mt == 2 (otherwise healthy)      returns numbers 1% off
  mt == 3                          raises a sticky CUDA error (as torch reports an illegal memory access)
"""

from __future__ import annotations

import os
import signal
import time

from moetune.kernels.registry import register_impl
from moetune.kernels.tvm_cpu import launchers as tvm_cpu_launchers

_real = tvm_cpu_launchers.gemm1


@register_impl("gemm1", "tvm")
def faulty_gemm1(problem, config, target, *args):
    p = config.as_dict()
    if p["kt"] == 2:
        raise RuntimeError("injected build failure")
    if p["mt"] == 3:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if p["kt"] == 8:
        os.kill(os.getpid(), signal.SIGSEGV)
    if p["kt"] == 1 and p["order"] == "blocks_outer":
        time.sleep(3600)
    out = _real(problem, config, target, *args)
    return out * 1.01 if p["mt"] == 2 else out
