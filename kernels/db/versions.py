"""Which versions a kernel record must carry to be used here (kernels/db/records.py keys records by them)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
from collections.abc import Callable
from typing import Any

# What decides a backend's kernels besides moetune and torch: its compiler package and its kernel sources.
_BACKEND_PACKAGE = {"tvm": "tvm", "tvm_cuda": "tvm", "triton": "triton"}
_BACKEND_SOURCES = {
    "tvm": "moetune.kernels.tvm_cpu.build",
    "triton": "moetune.kernels.triton.common",
    "tvm_cuda": "moetune.kernels.tvm_cuda.launchers",
}


@functools.cache
def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def dist(*names: str) -> str:
        for name in names:
            with contextlib.suppress(PackageNotFoundError):
                return version(name)
        return "none"

    return {
        "moetune": dist("moetune"),
        "tvm": dist("apache-tvm", "tvm"),
        "triton": dist("triton"),
        "torch": dist("torch"),
    }


def _source_hash(backend: str) -> str:
    """A backend's kernel source hash, "none" where its module cannot be imported here (no TVM, no Triton)."""
    try:
        return importlib.import_module(_BACKEND_SOURCES[backend]).kernel_source_hash()
    except ImportError:
        return "none"


def current_versions(backend: str | None = None) -> dict[str, str]:
    """The versions a record must carry to be used here: package versions (importlib.metadata) and kernel sources.

    With `backend`, only what decides that backend's kernels is compared (moetune, torch, its compiler package,
    its own kernel sources); the others are "*": a change to the Triton kernels, or a TVM upgrade, leaves the
    other backends' winners in use. The tuner stores records this way. Without, every backend's (one hash over
    all kernel sources: what a package manifest and `moetune db` report); a record carrying exactly these is
    current too."""
    versions = dict(_package_versions())
    if backend is None:
        return {**versions, "source": kernel_sources_hash()}
    for package in ("tvm", "triton"):
        if _BACKEND_PACKAGE.get(backend) != package:
            versions[package] = "*"
    return {**versions, "source": _source_hash(backend) if backend in _BACKEND_SOURCES else "*"}


def is_current(record: Any) -> bool:
    """Whether `record` may be used here: its backend's versions (or all versions) are the current ones."""
    return record.versions in (current_versions(record.backend), current_versions())


def kernel_sources_hash() -> str:
    """One hash over every backend's kernel sources (TVM CPU, Triton, TVM CUDA). A backend that cannot be
    imported here (no TVM, no Triton) counts as "none"."""
    parts = [f"{name}={_source_hash(name)}" for name in ("tvm", "triton", "tvm_cuda")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def currency(versions: dict[str, str] | None) -> Callable[[Any], bool]:
    """is_current, or equality with an explicit versions mapping."""
    if versions is None:
        return is_current
    versions = dict(sorted(versions.items()))
    return lambda r: r.versions == versions
