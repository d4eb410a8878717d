"""What every Triton kernel module shares: picking compiled vs interpreted kernels, and ahead-of-time specs.

Interpreter. On CUDA tensors a kernel runs compiled (`@triton.jit`). On CPU tensors it runs under Triton's
interpreter (numpy; fp32 and fp16, no bf16 tl.dot), which is how the CPU CI checks the kernels. Triton reads
`TRITON_INTERPRET=1` when `@triton.jit` decorates a function, its own library functions (tl.zeros, tl.sigmoid,
tl.cumsum, ...) included, so the flag must be set before triton is first imported in the process; it cannot be
switched on later for one call. Without it a launch on CPU tensors is a clear error (`runnable`). The tests run
the interpreter checks in a worker process started with the flag (tests/test_triton.py), and keep the main
process free to compile ahead of time (which needs the real `JITFunction`s).

Ahead of time. `AotSpec` is one kernel with its signature (argument name -> Triton type), constexprs, launch
options and divisibility hints: what `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` needs to
build the kernel for an architecture without a GPU (autotune/tuning/prepare.py). Each kernel module builds its specs
from the same (problem, point) as its launcher, so the prepared kernel is the one the launcher runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
import triton
from triton import knobs

from moetune.kernels.cache import source_hash

TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_KERNEL_FILES = (
    "kernels/triton/common.py",
    "kernels/triton/route_kernel.py",
    "kernels/triton/align_kernel.py",
    "kernels/triton/gemm_kernels.py",
    "kernels/triton/quant_tiles.py",
)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def runnable(kernel, device: torch.device):
    """The kernel, checked to be launchable on `device`: compiled on CUDA, interpreted on the CPU."""
    if device.type == "cuda" or (device.type == "cpu" and knobs.runtime.interpret):
        return kernel
    raise RuntimeError(
        f"Triton kernels run on {device.type} tensors only under Triton's interpreter: set TRITON_INTERPRET=1 "
        "before triton is first imported (tests do it in a worker process: tests/test_triton.py)"
    )


@cache
def kernel_source_hash() -> str:
    """sha256 (16 hex) over the Triton kernel sources: the key of prepared compile results."""
    return source_hash(*_KERNEL_FILES, salt=triton.__version__)


@dataclass(frozen=True)
class AotSpec:
    """One kernel as `triton.compile` wants it for an ahead-of-time build."""

    kernel: Any  # the JITFunction
    signature: dict[str, str]  # every argument: "*bf16", "i32", "fp32", ... or "constexpr"
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    aligned: tuple[str, ...] = field(default=())  # arguments known to be multiples of 16 (pointers: 16-byte aligned)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> str:
        """Identifies the compiled binary (kernel source, types, constexprs, launch options, hints)."""
        parts = [
            self.name,
            ",".join(f"{k}:{v}" for k, v in self.signature.items() if v != "constexpr"),
            ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items())),
            f"w{self.num_warps}s{self.num_stages}",
            ",".join(sorted(self.aligned)),
        ]
        return "|".join(parts)


def aot_spec(
    kernel,
    types: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int,
    num_stages: int,
    multiples_of_16: dict[str, int] | None = None,
) -> AotSpec:
    """Build an AotSpec: `types` gives each pointer ("*bf16") and float ("fp32") argument; the other runtime
    arguments are i32. `multiples_of_16` maps integer arguments to a representative value: those divisible by
    16 get Triton's divisibility hint, as the JIT would specialise them; pointers are always 16-byte aligned."""
    signature, aligned = {}, []
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            continue
        ty = types.get(p.name, "i32")
        signature[p.name] = ty
        value = (multiples_of_16 or {}).get(p.name)
        if ty.startswith("*") or (value is not None and value % 16 == 0):
            aligned.append(p.name)
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{kernel.fn.__name__}: constexprs missing: {', '.join(missing)}")
    return AotSpec(kernel, signature, dict(constexprs), num_warps, num_stages, tuple(aligned))
