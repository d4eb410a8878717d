"""The kernel database: the winner of each tuning study, keyed so that a stale winner is never used.

Key = (target, op signature, dtype, M bucket) + versions (moetune, tvm, triton, torch, kernel source hash; per
backend: only those that decide its kernels, see current_versions).
One row per key: `put` keeps the better record (lower p50) inside one transaction, so concurrent tuners
racing on one key leave exactly the fastest. `lookup` answers with the exact M bucket, else the nearest
tuned bucket on a log scale (same target, op, dtype and versions), else a miss; records whose versions
differ from the current ones are reported as stale and never used.

Storage sits behind the small abstract `KernelDB` (optuna's BaseStorage style): `MemoryKernelDB` (tests,
packaging) and `SQLKernelDB` (sql.py; SQLAlchemy: an SQLite file by default, any URL such as PostgreSQL for many
workers). The SQL schema is versioned by a `meta` table; a file that is not a moetune database of this
version is refused with a one-line `KernelDBError` and left untouched. JSON export/import moves records
between databases.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moetune.kernels.db.versions import currency

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"


class KernelDBError(ValueError):
    """A user-facing, one-line problem with a kernel database, a record or an export file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def utc_now() -> str:
    """The current time as ISO-8601 UTC (the default `created_at`)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise KernelDBError(f"{name} must be a non-empty string, got {_short_repr(value)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KernelDBError(f"{name} must be an integer >= {minimum}, got {_short_repr(value)}")


@dataclass(frozen=True)
class KernelKey:
    target: str  # e.g. "llvm -mcpu=znver3"
    op: str  # Problem signature, e.g. "gemm1[H=2048,...]:float32"
    dtype: str
    m_bucket: int  # ir.program.m_bucket(T)

    def __post_init__(self) -> None:
        for name in ("target", "op", "dtype"):
            _check_name(name, getattr(self, name))
        _check_int("m_bucket", self.m_bucket, 1)


_TIMINGS = ("p20_ms", "p50_ms", "p80_ms", "baseline_p50_ms")
_FIELDS = ("target", "op", "dtype", "m_bucket", "versions", "backend", "config", *_TIMINGS, "trials", "created_at")


@dataclass(frozen=True)
class KernelRecord:
    """One tuned winner. Validated (and config/versions normalized to plain JSON) on construction."""

    key: KernelKey
    versions: dict[str, str]  # {"moetune", "tvm", "triton", "torch", "source"}; see current_versions()
    backend: str  # "tvm" | "torch" | ...
    config: dict[str, Any]  # the schedule point
    p20_ms: float
    p50_ms: float
    p80_ms: float
    baseline_p50_ms: float  # the torch backend, measured in the same run
    trials: int  # trials the study spent
    created_at: str = field(default_factory=utc_now)  # ISO-8601 UTC

    def __post_init__(self) -> None:
        if not isinstance(self.key, KernelKey):
            raise KernelDBError(f"key must be a KernelKey, got {_short_repr(self.key)}")
        versions = self.versions
        if not isinstance(versions, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in versions.items()
        ):
            raise KernelDBError(f"versions must be a mapping of strings to strings, got {_short_repr(versions)}")
        _check_name("backend", self.backend)
        if not isinstance(self.config, dict):
            raise KernelDBError(f"config must be a JSON object, got {_short_repr(self.config)}")
        try:
            # A JSON round trip, so that a record equals itself after the database (tuples become lists).
            config = json.loads(_canonical(self.config))
        except (TypeError, ValueError) as exc:
            raise KernelDBError(f"config is not JSON-serializable: {exc}") from None
        for name in _TIMINGS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise KernelDBError(f"{name} must be a finite number >= 0, got {_short_repr(value)}")
            object.__setattr__(self, name, float(value))
        _check_int("trials", self.trials, 0)
        try:
            # Python 3.10's fromisoformat does not take the "Z" suffix that time.strftime writers use.
            datetime.fromisoformat(
                self.created_at[:-1] + "+00:00" if self.created_at.endswith("Z") else self.created_at
            )
        except (AttributeError, TypeError, ValueError):
            raise KernelDBError(f"created_at must be an ISO-8601 time, got {_short_repr(self.created_at)}") from None
        object.__setattr__(self, "versions", dict(sorted(versions.items())))
        object.__setattr__(self, "config", config)

    @property
    def digest(self) -> str:
        """sha256 of the unique key (key + versions); its first 8 hex chars are the id `moetune db ls` prints."""
        k = self.key
        return hashlib.sha256(_canonical([k.target, k.op, k.dtype, k.m_bucket, self.versions]).encode()).hexdigest()

    @property
    def short_id(self) -> str:
        return self.digest[:8]

    @property
    def speedup(self) -> float:
        """baseline p50 / p50: how much faster than torch in the same run."""
        return self.baseline_p50_ms / self.p50_ms if self.p50_ms > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        k = self.key
        return {
            "target": k.target,
            "op": k.op,
            "dtype": k.dtype,
            "m_bucket": k.m_bucket,
            "versions": dict(self.versions),
            "backend": self.backend,
            "config": json.loads(_canonical(self.config)),
            **{name: getattr(self, name) for name in _TIMINGS},
            "trials": self.trials,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Any) -> KernelRecord:
        if not isinstance(data, dict):
            raise KernelDBError(f"a record must be a JSON object, got {_short_repr(data)}")
        missing = [f for f in _FIELDS if f not in data]
        unknown = sorted(set(data) - set(_FIELDS))
        if missing:
            raise KernelDBError(f"record is missing field(s): {', '.join(missing)}")
        if unknown:
            raise KernelDBError(f"record has unknown field(s): {', '.join(map(str, unknown))}")
        key = KernelKey(data["target"], data["op"], data["dtype"], data["m_bucket"])
        return cls(key, **{f: data[f] for f in _FIELDS[4:]})


@dataclass(frozen=True)
class Lookup:
    record: KernelRecord | None
    kind: str  # "exact" | "nearest" | "miss"
    stale: tuple[KernelRecord, ...]  # same (target, op, dtype) but other versions: never used, reported


def _read_envelope(path: Path) -> list[KernelRecord]:
    """Parse and validate a whole export file, so that a bad one imports nothing."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise KernelDBError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise KernelDBError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "schema" not in data or not isinstance(data.get("records"), list):
        raise KernelDBError(f'{path} is not a kernel database export (want {{"schema": 1, "records": [...]}})')
    if data["schema"] != SCHEMA_VERSION:
        raise KernelDBError(
            f"{path} has schema version {data['schema']!r}; this moetune reads version {SCHEMA_VERSION}"
        )
    records = []
    for i, item in enumerate(data["records"]):
        try:
            records.append(KernelRecord.from_dict(item))
        except KernelDBError as exc:
            raise KernelDBError(f"{path}: record {i}: {exc}") from None
    return records


class KernelDB(ABC):
    """Abstract kernel database. Subclasses store records; lookup, export/import and prune are shared."""

    location: str = "?"  # for messages (a path, a password-masked URL, or "memory")

    @abstractmethod
    def put(self, record: KernelRecord) -> bool:
        """Store `record` unless a record with the same key and versions is at least as fast (atomic).

        Returns True if `record` was stored (new key, or strictly lower p50 than the stored one).
        """

    @abstractmethod
    def records(self, target: str | None = None, op: str | None = None, dtype: str | None = None) -> list[KernelRecord]:
        """All records, optionally filtered by exact target / op / dtype, in a stable order."""

    @abstractmethod
    def delete(self, record: KernelRecord) -> bool:
        """Delete the row with `record`'s key and versions; True if there was one."""

    def close(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        pass

    def __enter__(self) -> KernelDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, key: KernelKey, versions: dict[str, str] | None = None) -> Lookup:
        """Exact key and current versions (`is_current`, or exactly `versions` when given), else the nearest tuned
        M bucket (|log2 m - log2 m'|, ties -> larger M)."""
        rows = self.records(key.target, key.op, key.dtype)
        current = currency(versions)
        usable = [r for r in rows if current(r)]
        stale = tuple(r for r in rows if not current(r))
        for r in usable:
            if r.key.m_bucket == key.m_bucket:
                return Lookup(r, "exact", stale)
        if usable:
            want = math.log2(key.m_bucket)
            best = min(usable, key=lambda r: (abs(math.log2(r.key.m_bucket) - want), -r.key.m_bucket))
            return Lookup(best, "nearest", stale)
        return Lookup(None, "miss", stale)

    def find(self, id_prefix: str) -> KernelRecord:
        """The one record whose digest starts with `id_prefix` (the short id `moetune db ls` prints)."""
        prefix = id_prefix.strip().lower()
        matches = [r for r in self.records() if prefix and r.digest.startswith(prefix)]
        if not matches:
            raise KernelDBError(f"no record with id {id_prefix!r} in {self.location} (see `moetune db ls`)")
        if len(matches) > 1:
            raise KernelDBError(f"id {id_prefix!r} is ambiguous in {self.location}: {len(matches)} records match")
        return matches[0]

    def export_json(self, path: str | Path) -> int:
        """Write every record to `path` as {"schema": 1, "records": [...]} (atomically); returns the count."""
        path = Path(path)
        rows = [r.to_dict() for r in self.records()]
        text = json.dumps({"schema": SCHEMA_VERSION, "records": rows}, indent=1, sort_keys=True)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise KernelDBError(f"cannot write {path}: {exc.strerror or exc}") from None
        return len(rows)

    def import_json(self, path: str | Path, check: bool = True) -> int:
        """Merge an export into this database (better wins); returns how many records were stored.

        With `check` every record is checked first (kernels/db/checks.py): one that could not run here refuses
        the whole file, naming the record, before anything is written."""
        from moetune.kernels.db.checks import record_problem

        records = _read_envelope(Path(path))
        for i, record in enumerate(records):
            problem = record_problem(record) if check else None
            if problem is not None:
                raise KernelDBError(f"{path}: record {i} ({record.key.op[:60]}, {record.key.target[:40]}): {problem}")
        return sum(self.put(r) for r in records)

    def prune(self, versions: dict[str, str] | None = None, everything: bool = False) -> int:
        """Delete stale records (not `is_current`, or not exactly `versions` when given), or all of them; returns
        how many went."""
        current = currency(versions)
        return sum(self.delete(r) for r in self.records() if everything or not current(r))


def _unique(record: KernelRecord) -> tuple[KernelKey, str]:
    return record.key, _canonical(record.versions)


class MemoryKernelDB(KernelDB):
    """A dict of records (tests, packaged models); thread-safe, not persistent."""

    location = "memory"

    def __init__(self, records: list[KernelRecord] | None = None) -> None:
        self._rows: dict[tuple[KernelKey, str], KernelRecord] = {}
        self._lock = threading.Lock()
        for r in records or ():
            self.put(r)

    def put(self, record: KernelRecord) -> bool:
        with self._lock:
            old = self._rows.get(_unique(record))
            if old is not None and old.p50_ms <= record.p50_ms:
                return False
            self._rows[_unique(record)] = record
            return True

    def records(self, target: str | None = None, op: str | None = None, dtype: str | None = None) -> list[KernelRecord]:
        with self._lock:
            rows = list(self._rows.values())
        rows = [r for r in rows if _matches(r, target, op, dtype)]
        return sorted(rows, key=lambda r: (r.key.target, r.key.op, r.key.dtype, r.key.m_bucket, _unique(r)[1]))

    def delete(self, record: KernelRecord) -> bool:
        with self._lock:
            return self._rows.pop(_unique(record), None) is not None


def _matches(r: KernelRecord, target: str | None, op: str | None, dtype: str | None) -> bool:
    return (
        (target is None or r.key.target == target)
        and (op is None or r.key.op == op)
        and (dtype is None or r.key.dtype == dtype)
    )
