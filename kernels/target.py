"""Hardware targets: the host CPU (through TVM's LLVM backend) and CUDA GPUs, detected and resolved.

A target is plain data: `Target.name` is the string the kernel database keys on (`llvm -mcpu=<cpu>` for the
host, `cuda -arch=sm_XY` for a GPU) and `Target.tvm` is the dict TVM 0.27 wants (string targets are gone).
"cpu" always means the *detected* host CPU: a kernel built for a newer mcpu than the host (say znver4 on a
znver3 host) compiles fine and then dies with SIGILL.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from functools import cache
from typing import Any

# ISA features worth showing: the vector extensions the CPU schedules' vector widths depend on.
_FEATURE_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "neon", "sve", "dotprod", "i8mm", "bf16")


@cache
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


@dataclass(frozen=True)
class Target:
    kind: str  # "cpu" | "cuda"
    name: str  # the kernel DB's target string
    tvm: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return self.name


@cache
def resolve_target(spec: str | Target = "cpu") -> Target:
    """ "cpu" (the host) or an explicit `llvm -mcpu=...` string -> Target."""
    if isinstance(spec, Target):
        return spec
    if spec in ("cpu", "host", "llvm"):
        cpu = host_cpu()
        return Target("cpu", cpu["target"], cpu["tvm_target"])
    if spec.startswith("llvm -mcpu="):
        mcpu = spec.split("=", 1)[1].strip()
        return Target("cpu", f"llvm -mcpu={mcpu}", {"kind": "llvm", "mcpu": mcpu})
    raise ValueError(
        f"unknown target {spec!r}; use 'cpu' or 'llvm -mcpu=<cpu>' (GPU targets come with the CUDA backends)"
    )
