"""The kernel database: tuned winners keyed by (target, op signature, dtype, M bucket) + versions.

records.py  the key, the record, the abstract KernelDB, MemoryKernelDB, JSON export/import
versions.py which versions a record must carry to be used here (per backend: current_versions, is_current)
sql.py      SQLKernelDB (SQLAlchemy: an SQLite file by default, any URL such as PostgreSQL)
key.py      kernel_key / layer_keys: the one constructor of a key, used by the tuner, the runtime and the workers

The tuner writes it (moetune.autotune), the runtime reads it (moetune.model): it sits with the kernels, below
both. Opening it needs neither Optuna nor TVM.
"""

from __future__ import annotations

import os
from pathlib import Path

from moetune.kernels.cache import cache_root
from moetune.kernels.db.key import kernel_key, layer_keys
from moetune.kernels.db.records import (
    SCHEMA_VERSION,
    KernelDB,
    KernelDBError,
    KernelKey,
    KernelRecord,
    Lookup,
    MemoryKernelDB,
)
from moetune.kernels.db.versions import current_versions, is_current

__all__ = [
    "SCHEMA_VERSION",
    "KernelDB",
    "KernelDBError",
    "KernelKey",
    "KernelRecord",
    "Lookup",
    "MemoryKernelDB",
    "current_versions",
    "default_db_path",
    "is_current",
    "kernel_key",
    "layer_keys",
    "open_db",
]


def default_db_path() -> Path | str:
    """$MOETUNE_DB (a path, or an SQLAlchemy URL returned as the string) else kernels.db in the cache root
    ($MOETUNE_CACHE_DIR or ~/.cache/moetune)."""
    env = os.environ.get("MOETUNE_DB", "").strip()
    if env:
        return env if "://" in env else Path(env).expanduser()
    return cache_root() / "kernels.db"


def open_db(url_or_path: str | Path | None = None, create: bool = True) -> KernelDB:
    """None -> the default; "memory"/":memory:" -> MemoryKernelDB; "x://..." -> SQLAlchemy URL; else an SQLite file.

    An SQLite file that does not exist is created only with `create` (readers pass False: looking never
    creates), and its folder only at the default location (a mistyped --db path is an error, not a new tree)."""
    where = default_db_path() if url_or_path is None else url_or_path
    if isinstance(where, str) and where.strip() in ("memory", ":memory:"):
        return MemoryKernelDB()
    from moetune.kernels.db.sql import SQLKernelDB

    return SQLKernelDB(where, create=create, make_folder=url_or_path is None)
