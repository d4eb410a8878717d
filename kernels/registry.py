"""Backend registry: one launcher signature per op, whatever the backend (Liger's ImplInfo / register_impl).

A backend module registers its launcher for an op with `@register_impl(op, backend)`; callers pick one with
`get_impl(op, backend)` and never branch on the backend name themselves. Every launcher of an op has the
signature documented in kernels/ops.py and takes its tile config as a frozen `KernelConfig`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BACKENDS = ("tvm", "torch", "triton", "tvm_cuda")  # every backend
# Preference order per target kind, when nothing else is said: the compiled backend first, torch as the fallback.
# tvm_cuda: TVM-scheduled CUDA-core kernels (cubins launched by CuPy); triton's tensor-core GEMMs come first on CUDA.
PREFERENCE = {"cpu": ("tvm", "torch", "triton", "tvm_cuda"), "cuda": ("triton", "tvm_cuda", "torch", "tvm")}
# The target kinds each backend can run on, known before its module is imported: choosing backends for a GPU
# never imports the CPU TVM backend (a deployed GPU model needs no TVM; the tvm backend cannot even import without).
BACKEND_TARGETS = {"tvm": ("cpu",), "torch": ("cpu", "cuda"), "triton": ("cuda",), "tvm_cuda": ("cuda",)}
# The Python packages a backend needs to build and launch its kernels (the GPU image has Triton and CuPy, no TVM:
# there the tuner leaves tvm_cuda out instead of failing each of its trials).
BACKEND_PACKAGES = {"tvm": ("tvm",), "torch": (), "triton": ("triton",), "tvm_cuda": ("tvm", "cupy")}
# Modules that register implementations when imported (kept lazy: importing TVM takes seconds).
_BACKEND_MODULES = {
    "torch": "moetune.kernels.torch.launchers",
    "tvm": "moetune.kernels.tvm_cpu.launchers",
    "triton": "moetune.kernels.triton.launchers",
    "tvm_cuda": "moetune.kernels.tvm_cuda.launchers",
}


@dataclass(frozen=True)
class KernelConfig:
    """A backend plus one point of its schedule space (sorted, hashable, JSON-able)."""

    backend: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, backend: str, params: dict[str, Any] | None = None) -> KernelConfig:
        return cls(backend, tuple(sorted((params or {}).items())))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def __getitem__(self, name: str) -> Any:
        return self.as_dict()[name]

    def to_json(self) -> str:
        return json.dumps({"backend": self.backend, "params": self.as_dict()}, sort_keys=True)


@dataclass(frozen=True)
class ImplInfo:
    op: str
    backend: str
    fn: Callable[..., Any]
    targets: tuple[str, ...]  # target kinds it runs on: "cpu", "cuda"


@dataclass(frozen=True)
class BackendInfo:
    """A backend's schedule space and default point per (problem, target)."""

    name: str
    space: Callable[[Any, Any], Any]  # (Problem, Target) -> schedules.space.SearchSpace
    default: Callable[[Any, Any], dict[str, Any]]  # (Problem, Target) -> point


_REGISTRY: dict[tuple[str, str], ImplInfo] = {}
_BACKEND_INFO: dict[str, BackendInfo] = {}


def register_backend(name: str, space: Callable[[Any, Any], Any], default: Callable[[Any, Any], dict]) -> None:
    _BACKEND_INFO[name] = BackendInfo(name, space, default)


def backend_info(name: str) -> BackendInfo:
    _load(name)
    return _BACKEND_INFO[name]


def default_config(problem: Any, backend: str, target: Any) -> KernelConfig:
    """The backend's default (untuned) config for a problem on a target."""
    return KernelConfig.of(backend, backend_info(backend).default(problem, target))


def register_impl(op: str, backend: str, targets: tuple[str, ...] = ("cpu",)):
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[(op, backend)] = ImplInfo(op, backend, fn, targets)
        return fn

    return wrap


def missing_packages(backend: str) -> list[str]:
    """The packages of BACKEND_PACKAGES[backend] this Python cannot import (found without importing them)."""

    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    return [name for name in BACKEND_PACKAGES.get(backend, ()) if not found(name)]


def _load(backend: str) -> None:
    if backend not in _BACKEND_MODULES:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(_BACKEND_MODULES)}")
    importlib.import_module(_BACKEND_MODULES[backend])


def get_impl(op: str, backend: str) -> ImplInfo:
    _load(backend)
    try:
        return _REGISTRY[(op, backend)]
    except KeyError:
        raise ValueError(f"backend {backend!r} has no implementation of op {op!r}") from None


def backends_for(op: str, target_kind: str, allowed: tuple[str, ...] = BACKENDS) -> list[str]:
    """The allowed backends that implement `op` on a target kind, in the target kind's preference order."""
    order = PREFERENCE.get(target_kind, BACKENDS)
    found = []
    for backend in sorted(allowed, key=lambda b: order.index(b) if b in order else len(order)):
        if target_kind not in BACKEND_TARGETS.get(backend, (target_kind,)):
            continue
        _load(backend)
        info = _REGISTRY.get((op, backend))
        if info is not None and target_kind in info.targets:
            found.append(backend)
    return found
