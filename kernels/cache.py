"""The caches every backend shares: where they live, how a compiled kernel is cached, how derived weights are memoised.

cache_root()   $MOETUNE_CACHE_DIR, else ~/.cache/moetune: the one root of the kernel DB's default file, the
               compiled kernels (tvm/, tvm_cuda/), the Triton prepare results and the tuner's study journal.
source_hash()  sha256 over source files named relative to the moetune folders ("kernels/tvm_cpu/build.py"):
               a compiled kernel's key includes it, so editing the code that decides a kernel invalidates it.
BuildCache     memory -> disk -> compile -> atomic rename, for one kind of compiled artifact (a TVM .so, a
               cubin + its launch JSON): a second process loads instead of compiling; a crash never leaves
               half a file (each file goes to a temp name in the same folder, then os.replace).
TensorMemo     values derived from weights (packed panels, an fp32 copy, weights in moetune's layout),
               memoised on the tensors' identity and version counter: an in-place update (load_state_dict,
               mul_) bumps `_version` and misses; freeing the owner drops its entries.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
import weakref
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch


def cache_root() -> Path:
    """$MOETUNE_CACHE_DIR, else ~/.cache/moetune (read at each call: tests and workers set it late)."""
    root = os.environ.get("MOETUNE_CACHE_DIR", "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "moetune"


def writable_cache_root() -> Path:
    """cache_root(), created if missing and checked writable. A tuner whose every build would fail to be saved
    must stop before it measures anything (it once stored the torch baseline as the winner and exited 0)."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise ValueError(
            f"the cache directory {root} is not usable ({exc.strerror or exc}); "
            "set MOETUNE_CACHE_DIR to a writable directory"
        ) from None
    return root


def source_hash(*files: str, salt: str = "") -> str:
    """sha256 (16 hex) over `files`, each "<folder>/<path>" inside one of moetune's folders (ir, kernels, ...)."""
    digest = hashlib.sha256(salt.encode())
    for rel in files:
        folder, _, rest = rel.partition("/")
        package = importlib.import_module(f"moetune.{folder}")
        digest.update(Path(package.__path__[0], rest).read_bytes())
    return digest.hexdigest()[:16]


class BuildCache:
    """Compiled artifacts of one kind under cache_root()/<name>, each entry one file per suffix, named by key."""

    def __init__(self, name: str, suffixes: tuple[str, ...]):
        self.name, self.suffixes = name, suffixes
        self.memory: dict[str, Any] = {}

    def folder(self) -> Path:
        return cache_root() / self.name

    def get(self, key: str, load: Callable[[list[Path]], Any], write: Callable[[list[Path]], None]) -> Any:
        """The loaded entry `key`: from memory, else `load(paths)` of the files on disk, else `write(temp paths)`
        (compile), renamed into place in suffix order (a cubin before its JSON: the JSON never exists without
        it), then loaded. An entry that fails to load is rebuilt."""
        if key in self.memory:
            return self.memory[key]
        folder = self.folder()
        paths = [folder / f"{key}{suffix}" for suffix in self.suffixes]
        value = None
        if all(p.exists() for p in paths):
            try:
                value = load(paths)
            except Exception:  # a truncated or foreign file: rebuild it
                value = None
        if value is None:
            folder.mkdir(parents=True, exist_ok=True)
            temps = []
            try:
                for suffix in self.suffixes:
                    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=folder)
                    os.close(fd)
                    temps.append(Path(tmp))
                write(temps)
                for tmp, path in zip(temps, paths, strict=True):
                    os.replace(tmp, path)
            finally:
                for tmp in temps:
                    tmp.unlink(missing_ok=True)
            value = load(paths)
        self.memory[key] = value
        return value


def _identity(t: torch.Tensor) -> tuple:
    # a PackedWeight or QuantizedWeight (kernels/packed.py, quant.py) has no storage of its own: its buffer's counts
    storage = getattr(t, "packed", None) if hasattr(t, "packed") else getattr(t, "codes", t)
    return (storage.data_ptr(), storage._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class TensorMemo:
    """make() memoised on `tensors` (identity + version), per owner (the first tensor's base) and group.

    An owner keeps at most `per_group` values per group (least recently used dropped): a packed copy of a weight
    per panel width, say, where each is a full copy of the weight. Views share their base's version counter,
    so a fresh view (weight.unsqueeze(0)) hits the memo of its base."""

    def __init__(self, per_group: int = 1):
        self.per_group = per_group
        self.entries: dict[tuple, tuple[weakref.ref, Any]] = {}
        self._groups: dict[tuple, list[tuple]] = {}

    def get(
        self, tensors: Sequence[torch.Tensor], make: Callable[[], Any], group: Hashable = None, variant: Hashable = None
    ) -> Any:
        first = tensors[0]
        owner = first._base if first._base is not None else first
        slot = (id(owner), group)
        key = (tuple(_identity(t) for t in tensors), group, variant)
        recent = self._groups.setdefault(slot, [])
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is owner:
            if key in recent:
                recent.remove(key)
            recent.append(key)
            return hit[1]
        while len(recent) >= self.per_group:
            self.entries.pop(recent.pop(0), None)
        value = make()
        self.entries[key] = (weakref.ref(owner), value)
        recent.append(key)
        weakref.finalize(owner, self._forget, key, slot)
        return value

    def _forget(self, key: tuple, slot: tuple) -> None:
        """An owner was freed: drop its value and its group list."""
        self.entries.pop(key, None)
        self._groups.pop(slot, None)
