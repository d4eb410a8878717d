"""Hardware targets this machine can tune for: the host CPU (through TVM's LLVM backend) and CUDA GPUs.

A target is described by plain data (a dict) so the CLI can print it and the kernel database can key on
its `target` string: `llvm -mcpu=<cpu>` for the host, `cuda -arch=sm_XY` for a GPU.
"""

from __future__ import annotations

import os
import platform
from typing import Any

# ISA features worth showing: the vector extensions the CPU schedules' vector widths depend on.
_FEATURE_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "neon", "sve", "dotprod", "i8mm", "bf16")


def host_cpu() -> dict[str, Any]:
    """The host CPU as TVM's LLVM backend sees it."""
    from tvm.target import Target, codegen

    mcpu = codegen.llvm_get_system_cpu()
    target = Target({"kind": "llvm", "mcpu": mcpu})
    features = sorted(f for f in codegen.llvm_get_cpu_features(target) if str(f).startswith(_FEATURE_PREFIXES))
    return {
        "kind": "cpu",
        "name": _cpu_model_name() or platform.processor() or mcpu,
        "target": f"llvm -mcpu={mcpu}",
        "tvm_target": {"kind": "llvm", "mcpu": mcpu},
        "triple": str(codegen.llvm_get_system_triple()),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "features": [str(f) for f in features],
    }


def _cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def cuda_gpus() -> list[dict[str, Any]]:
    """Every CUDA GPU torch can see (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        arch = f"sm_{p.major}{p.minor}"
        gpus.append(
            {
                "kind": "cuda",
                "name": p.name,
                "index": index,
                "target": f"cuda -arch={arch}",
                "arch": arch,
                "compute_capability": f"{p.major}.{p.minor}",
                "sm_count": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1),
            }
        )
    return gpus


def detect_targets() -> list[dict[str, Any]]:
    return [host_cpu(), *cuda_gpus()]
