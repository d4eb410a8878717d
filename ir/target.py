"""Hardware targets: the host CPU (through TVM's LLVM backend) and CUDA GPUs, detected and resolved.

A target is plain data: `Target.name` is the string the kernel database keys on (`llvm -mcpu=<cpu>` for the
host, `cuda -arch=sm_XY` for a GPU) and `Target.tvm` is the dict TVM 0.27 wants (string targets are gone).
"cpu" always means the *detected* host CPU: a kernel built for a newer mcpu than the host (say znver4 on a
znver3 host) compiles fine and then dies with SIGILL.

GPU targets: `sm_80`, `sm_86`, `sm_89`, `sm_90` (or `cuda -arch=sm_XY`) name an architecture explicitly and need
no GPU (that is how `moetune tune --target sm_90 --prepare` compiles for a GPU on a CPU machine); `cuda` means
the first detected GPU, named by architecture and device: `cuda -arch=sm_90 -device=nvidia-h100-80gb-hbm3`. Two
GPUs of one architecture (an H100 and an H200) have different bandwidths and tune to different winners, so
winners are stored under the device's name; a lookup falls back to the architecture's records
(`Target.lookup_names`). `GPU_LIMITS` holds the per-architecture resources the ahead-of-time feasibility checks
use (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

GPU_INTERPRET = "MOETUNE_GPU_INTERPRET"  # see Target.torch_device
INTERPRETER_DEVICE = "triton-interpreter"

# ISA features worth showing: the vector extensions the CPU schedules' vector widths depend on.
_FEATURE_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "neon", "sve", "dotprod", "i8mm", "bf16")


@cache
def host_cpu() -> dict[str, Any]:
    """The host CPU as TVM's LLVM backend sees it."""
    from tvm.target import Target, codegen

    mcpu = codegen.llvm_get_system_cpu()
    target = Target({"kind": "llvm", "mcpu": mcpu})
    listed = sorted(str(f) for f in codegen.llvm_get_cpu_features(target) if str(f).startswith(_FEATURE_PREFIXES))
    cpuinfo = _read_cpuinfo()
    features, off = split_os_enabled(listed, cpuinfo)
    return {
        "kind": "cpu",
        "name": _cpu_model_name(cpuinfo) or platform.processor() or mcpu,
        "target": f"llvm -mcpu={mcpu}",
        "tvm_target": {"kind": "llvm", "mcpu": mcpu},
        "triple": str(codegen.llvm_get_system_triple()),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "features": features,
        "not_enabled": off,
    }


# /proc/cpuinfo's names for LLVM features whose names differ by more than punctuation (AArch64 'Features').
_CPUINFO_ALIASES = {"asimd": "neon", "asimddp": "dotprod"}


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def split_os_enabled(features: list[str], cpuinfo: str) -> tuple[list[str], list[str]]:
    """LLVM's features of the host's mcpu -> (those the kernel reports enabled, those it does not).

    LLVM lists what the CPU *model* has: a hypervisor may hide some (seen: `-mcpu=emeraldrapids` under KVM with
    AMX absent from CPUID and XCR0), and an instruction the OS has not enabled faults. /proc/cpuinfo's `flags`
    (x86) or `Features` (AArch64) line is what this machine runs; names compare without punctuation
    (`sse4.1` / `sse4_1`, `amx-tile` / `amx_tile`). Without that line nothing is filtered."""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith(("flags", "Features"))), None)
    if line is None:
        return list(features), []
    enabled = {_bare(_CPUINFO_ALIASES.get(f, f)) for f in line.split(":", 1)[1].split()}
    return [f for f in features if _bare(f) in enabled], [f for f in features if _bare(f) not in enabled]


def _bare(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _cpu_model_name(cpuinfo: str) -> str | None:
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("model name")), None)
    return line.split(":", 1)[1].strip() if line else None


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
                "target": f"cuda -arch={arch} -device={device_slug(p.name)}",
                "arch": arch,
                "compute_capability": f"{p.major}.{p.minor}",
                "sm_count": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1),
            }
        )
    return gpus


def device_slug(name: str) -> str:
    """A GPU's name as a target token: lower case, runs of other characters as '-' (NVIDIA H100 80GB HBM3 ->
    nvidia-h100-80gb-hbm3)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def detect_targets() -> list[dict[str, Any]]:
    return [host_cpu(), *cuda_gpus()]


@dataclass(frozen=True)
class GpuLimits:
    """Per-SM and per-block resources of one CUDA architecture."""

    smem_per_block: int  # bytes a block may use (opt-in maximum)
    smem_per_sm: int  # bytes
    regs_per_sm: int  # 32-bit registers
    max_threads_per_sm: int
    max_blocks_per_sm: int
    max_regs_per_thread: int = 255


KIB = 1024
GPU_LIMITS = {
    "sm_80": GpuLimits(163 * KIB, 164 * KIB, 65536, 2048, 32),  # A100
    "sm_86": GpuLimits(99 * KIB, 100 * KIB, 65536, 1536, 16),  # RTX 30xx, A10, A40
    "sm_89": GpuLimits(99 * KIB, 100 * KIB, 65536, 1536, 24),  # L4, L40, RTX 40xx
    "sm_90": GpuLimits(227 * KIB, 228 * KIB, 65536, 2048, 32),  # H100, H200
}


@dataclass(frozen=True)
class Target:
    kind: str  # "cpu" | "cuda"
    name: str  # the kernel DB's target string
    tvm: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return self.name

    @property
    def arch(self) -> str | None:
        """`sm_XY` of a CUDA target, None for a CPU."""
        found = re.search(r"-arch=(\S+)", self.name) if self.kind == "cuda" else None
        return found.group(1) if found else None

    @property
    def device(self) -> str | None:
        """The GPU's name (slug) when the target names one, else None."""
        found = re.search(r"-device=(\S+)", self.name) if self.kind == "cuda" else None
        return found.group(1) if found else None

    @property
    def lookup_names(self) -> tuple[str, ...]:
        """The kernel DB target strings to look winners up under, most specific first: a GPU device's own,
        then its architecture's (records tuned before devices were named, or on another GPU of the arch)."""
        if self.device is None:
            return (self.name,)
        return (self.name, f"cuda -arch={self.arch}")

    @property
    def torch_device(self) -> str:
        """The torch device this target's kernels run on and its inputs live on: "cuda" for a CUDA target, else
        "cpu". A CUDA target resolved with MOETUNE_GPU_INTERPRET=1 (and TRITON_INTERPRET=1) names the device
        `triton-interpreter` and runs on CPU tensors under Triton's interpreter: the GPU code path (planning, the
        tuning loop, bench setup) on a machine without a GPU, for tests and `make gpu-smoke DRY=1`. Its timings are
        the interpreter's and mean nothing; its DB records sit under that device name, which no GPU looks up."""
        return "cuda" if self.kind == "cuda" and self.device != INTERPRETER_DEVICE else "cpu"

    @property
    def capability(self) -> int | None:
        """The compute capability as Triton's GPUTarget wants it (sm_90 -> 90), None for a CPU."""
        return int(self.arch[3:]) if self.kind == "cuda" else None

    @property
    def limits(self) -> GpuLimits | None:
        return GPU_LIMITS.get(self.arch) if self.kind == "cuda" else None


def _cuda_target(arch: str, device: str | None = None) -> Target:
    if arch not in GPU_LIMITS:
        raise ValueError(f"unknown CUDA architecture {arch!r}; known: {', '.join(GPU_LIMITS)}")
    if os.environ.get(GPU_INTERPRET) == "1":  # read when the target is resolved (resolve_target caches)
        device = INTERPRETER_DEVICE
    name = f"cuda -arch={arch}" + (f" -device={device_slug(device)}" if device else "")
    return Target("cuda", name, {"kind": "cuda", "arch": arch})


def _llvm_target(spec: str) -> Target:
    """`llvm -mcpu=<cpu>` (this host's triple) or `llvm -mtriple=<triple> -mcpu=<cpu>` (another machine's, to compile
    for it without running: `-mtriple=aarch64-linux-gnu -mcpu=neoverse-n1`). The CPU name is checked against LLVM:
    an unknown one would silently compile for a generic CPU and be stored under the bogus name."""
    from tvm.target import codegen

    found = re.fullmatch(r"llvm(?: -mtriple=(?P<triple>[\w.-]+))? -mcpu=(?P<cpu>[\w.-]+)", spec)
    if not found:
        raise ValueError(f"bad CPU target {spec!r}; want 'llvm -mcpu=<cpu>' or 'llvm -mtriple=<triple> -mcpu=<cpu>'")
    cpu, triple = found.group("cpu"), found.group("triple")
    if not codegen.llvm_is_valid_cpu(cpu, triple or str(codegen.llvm_get_system_triple())):
        raise ValueError(f"LLVM does not know the CPU {cpu!r}" + (f" for {triple}" if triple else ""))
    if triple is None:
        return Target("cpu", f"llvm -mcpu={cpu}", {"kind": "llvm", "mcpu": cpu})
    return Target("cpu", f"llvm -mtriple={triple} -mcpu={cpu}", {"kind": "llvm", "mtriple": triple, "mcpu": cpu})


@cache
def resolve_target(spec: str | Target = "cpu") -> Target:
    """ "cpu" (the host), `llvm [-mtriple=...] -mcpu=...`, `sm_XY` / `cuda -arch=sm_XY` (no GPU needed) or "cuda"
    -> Target."""
    if isinstance(spec, Target):
        return spec
    if spec in ("cpu", "host", "llvm"):
        cpu = host_cpu()
        return Target("cpu", cpu["target"], cpu["tvm_target"])
    spec = spec.strip()
    if spec.startswith("llvm "):
        return _llvm_target(spec)
    if spec.startswith("cuda -arch="):
        found = re.fullmatch(r"cuda -arch=(\S+)(?: -device=(\S+))?", spec)
        if not found:
            raise ValueError(f"bad CUDA target {spec!r}; want 'cuda -arch=sm_XY' or 'cuda -arch=sm_XY -device=NAME'")
        return _cuda_target(found.group(1), found.group(2))
    if spec.startswith("sm_"):
        return _cuda_target(spec)
    if spec in ("cuda", "gpu"):
        gpus = cuda_gpus()
        if not gpus:
            raise ValueError(f"no CUDA GPU found for target 'cuda'; name an architecture: {', '.join(GPU_LIMITS)}")
        return _cuda_target(gpus[0]["arch"], gpus[0]["name"])
    raise ValueError(
        f"unknown target {spec!r}; use 'cpu', 'llvm -mcpu=<cpu>', 'cuda' or a CUDA architecture "
        f"({', '.join(GPU_LIMITS)})"
    )
