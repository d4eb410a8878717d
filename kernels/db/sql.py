"""The SQL backend of the kernel database (SQLAlchemy): an SQLite file by default, any URL otherwise.

Tables: `meta` (schema_version) and `kernels` (one row per key + versions, UNIQUE). See kernels/db/ for
the interface and the semantics (better-wins puts, nearest-M lookup, stale records).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from moetune.kernels.db.records import (
    _SQLITE_MAGIC,
    SCHEMA_VERSION,
    KernelDB,
    KernelDBError,
    KernelKey,
    KernelRecord,
    _canonical,
)
from moetune.kernels.db.versions import currency

# --- SQL ---------------------------------------------------------------------------------------------------

_SCHEMA = sa.MetaData()
_META_TABLE = sa.Table("meta", _SCHEMA, sa.Column("schema_version", sa.Integer, nullable=False))
_KEY_COLUMNS = ("target", "op", "dtype", "m_bucket", "versions_json")
_KERNELS = sa.Table(
    "kernels",
    _SCHEMA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("target", sa.String, nullable=False),
    sa.Column("op", sa.String, nullable=False),
    sa.Column("dtype", sa.String, nullable=False),
    sa.Column("m_bucket", sa.Integer, nullable=False),
    sa.Column("versions_json", sa.String, nullable=False),  # canonical: sorted keys, no spaces
    sa.Column("backend", sa.String, nullable=False),
    sa.Column("config_json", sa.String, nullable=False),
    sa.Column("p20", sa.Double, nullable=False),
    sa.Column("p50", sa.Double, nullable=False),
    sa.Column("p80", sa.Double, nullable=False),
    sa.Column("baseline_p50", sa.Double, nullable=False),
    sa.Column("trials", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String, nullable=False),
    sa.UniqueConstraint(*_KEY_COLUMNS, name="kernels_unique_key"),
)
_VALUE_COLUMNS = ("backend", "config_json", "p20", "p50", "p80", "baseline_p50", "trials", "created_at")


def _to_row(r: KernelRecord) -> dict[str, Any]:
    k = r.key
    return {
        "target": k.target,
        "op": k.op,
        "dtype": k.dtype,
        "m_bucket": k.m_bucket,
        "versions_json": _canonical(r.versions),
        "backend": r.backend,
        "config_json": _canonical(r.config),
        "p20": r.p20_ms,
        "p50": r.p50_ms,
        "p80": r.p80_ms,
        "baseline_p50": r.baseline_p50_ms,
        "trials": r.trials,
        "created_at": r.created_at,
    }


def _from_row(row: Any) -> KernelRecord:
    return KernelRecord(
        KernelKey(row.target, row.op, row.dtype, row.m_bucket),
        versions=json.loads(row.versions_json),
        backend=row.backend,
        config=json.loads(row.config_json),
        p20_ms=row.p20,
        p50_ms=row.p50,
        p80_ms=row.p80,
        baseline_p50_ms=row.baseline_p50,
        trials=row.trials,
        created_at=row.created_at,
    )


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error; its own text adds SQL and a link
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SQLKernelDB(KernelDB):
    """Records in SQL through SQLAlchemy: an SQLite file path, or any SQLAlchemy URL (`sqlite://` = in memory)."""

    def __init__(self, url_or_path: str | Path, create: bool = True, make_folder: bool = False) -> None:
        """`create`: a missing SQLite file may be created; `make_folder`: so may its missing folders."""
        self._create, self._make_folder = create, make_folder
        self._engine: sa.Engine | None = None
        self._lock: Any = contextlib.nullcontext()
        is_url = isinstance(url_or_path, str) and "://" in url_or_path
        if is_url:
            try:
                url = make_url(url_or_path)
            except Exception:  # the text may hold a password: do not echo it
                raise KernelDBError("kernel database URL could not be parsed (want dialect://user@host/db)") from None
            self.location = url.render_as_string(hide_password=True)
        else:
            path = Path(url_or_path).expanduser()
            url = URL.create("sqlite", database=str(path))
            self.location = str(path)
        self._password = url.password
        try:
            self._engine = self._create_engine(url)
            self._check_schema()
        except KernelDBError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise self._error(exc) from None

    def _error(self, exc: BaseException) -> KernelDBError:
        detail = _one_line(exc)
        if isinstance(exc, ImportError):
            detail = f"cannot load its database driver ({detail})"
        message = f"kernel database {self.location}: {detail}"
        if self._password:
            message = message.replace(str(self._password), "***")
        return KernelDBError(message)

    def _create_engine(self, url: URL) -> sa.Engine:
        if url.get_backend_name() != "sqlite":
            return sa.create_engine(url)
        database = url.database or ""
        if database in ("", ":memory:"):
            # One shared connection (each new one would be a new, empty database), serialized by a lock.
            self._lock = threading.RLock()
            engine = sa.create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            if not database.startswith("file:"):
                _check_sqlite_file(Path(database), self.location, self._create, self._make_folder)
            engine = sa.create_engine(url, connect_args={"timeout": 60})

        # pysqlite begins transactions lazily and only before writes; take the BEGIN over so that a write
        # transaction holds the write lock from its start (BEGIN IMMEDIATE): read-compare-write is atomic.
        @sa.event.listens_for(engine, "connect")
        def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("moetune_write") else "BEGIN")

        return engine

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[sa.Connection]:
        if self._engine is None:
            raise KernelDBError(f"kernel database {self.location} is closed")
        with self._lock:
            try:
                with self._engine.connect() as conn:
                    if write:
                        conn.execution_options(moetune_write=True)
                    with conn.begin():
                        yield conn
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                raise self._error(exc) from None

    def _check_schema(self) -> None:
        with self._transaction(write=False) as conn:
            ready = self._schema_ready(conn)
        if not ready:
            with self._transaction(write=True) as conn:
                if conn.dialect.name == "postgresql":  # serialise concurrent first-time schema creation
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7343001)"))
                if not self._schema_ready(conn):  # another process may have created it meanwhile
                    _SCHEMA.create_all(conn)
                    conn.execute(_META_TABLE.insert().values(schema_version=SCHEMA_VERSION))

    def _schema_ready(self, conn: sa.Connection) -> bool:
        """False for an empty database; True for ours at this version; KernelDBError for anything else."""
        tables = set(sa.inspect(conn).get_table_names())
        foreign = KernelDBError(
            f"{self.location} is not a moetune kernel database (tables: {', '.join(sorted(tables))})"
        )
        if not {"meta", "kernels"} & tables:
            # An SQLite file is ours alone; a server database may be shared (e.g. with optuna's tables).
            if tables and conn.dialect.name == "sqlite":
                raise foreign
            return False
        try:
            versions = conn.execute(sa.select(_META_TABLE.c.schema_version)).scalars().all()
        except sa.exc.DBAPIError:
            raise foreign from None
        if len(versions) != 1 or "kernels" not in tables:
            raise foreign
        if versions[0] != SCHEMA_VERSION:
            raise KernelDBError(
                f"kernel database {self.location} has schema version {versions[0]}; "
                f"this moetune reads version {SCHEMA_VERSION}"
            )
        return True

    def put(self, record: KernelRecord) -> bool:
        row = _to_row(record)
        with self._transaction(write=True) as conn:
            dialect = conn.dialect.name
            if dialect in ("sqlite", "postgresql"):
                insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
                stmt = insert(_KERNELS).values(**row)
                stmt = stmt.on_conflict_do_update(
                    index_elements=list(_KEY_COLUMNS),
                    set_={c: stmt.excluded[c] for c in _VALUE_COLUMNS},
                    where=stmt.excluded.p50 < _KERNELS.c.p50,
                )
                # RETURNING, not rowcount: psycopg 3 reports rowcount -1 for INSERT .. ON CONFLICT
                return conn.execute(stmt.returning(_KERNELS.c.id)).first() is not None
            # Any other dialect: read, compare and write under a row lock in this one transaction.
            where = sa.and_(*(_KERNELS.c[c] == row[c] for c in _KEY_COLUMNS))
            old = conn.execute(sa.select(_KERNELS.c.p50).where(where).with_for_update()).scalar()
            if old is None:
                conn.execute(_KERNELS.insert().values(**row))
                return True
            if record.p50_ms < old:
                conn.execute(_KERNELS.update().where(where).values(**{c: row[c] for c in _VALUE_COLUMNS}))
                return True
            return False

    def records(self, target: str | None = None, op: str | None = None, dtype: str | None = None) -> list[KernelRecord]:
        c = _KERNELS.c
        query = sa.select(_KERNELS).order_by(c.target, c.op, c.dtype, c.m_bucket, c.versions_json)
        for column, value in ((c.target, target), (c.op, op), (c.dtype, dtype)):
            if value is not None:
                query = query.where(column == value)
        with self._transaction(write=False) as conn:
            rows = conn.execute(query).all()
        try:
            return [_from_row(r) for r in rows]
        except (KernelDBError, ValueError) as exc:
            raise KernelDBError(f"kernel database {self.location} holds a malformed record: {exc}") from None

    def delete(self, record: KernelRecord) -> bool:
        row = _to_row(record)
        with self._transaction(write=True) as conn:
            where = sa.and_(*(_KERNELS.c[c] == row[c] for c in _KEY_COLUMNS))
            return conn.execute(_KERNELS.delete().where(where)).rowcount > 0

    def prune(self, versions: dict[str, str] | None = None, everything: bool = False) -> int:
        if everything:
            with self._transaction(write=True) as conn:
                return conn.execute(_KERNELS.delete()).rowcount
        current = currency(versions)  # per record: its backend decides which versions count
        stale = [_to_row(r) for r in self.records() if not current(r)]
        with self._transaction(write=True) as conn:
            for row in stale:
                where = sa.and_(*(_KERNELS.c[c] == row[c] for c in _KEY_COLUMNS))
                conn.execute(_KERNELS.delete().where(where))
        return len(stale)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _check_sqlite_file(path: Path, location: str, create: bool, make_folder: bool) -> None:
    """Refuse what is not an SQLite file before SQLite sees it; a new one only where allowed (SQLKernelDB)."""
    try:
        if path.is_dir():
            raise KernelDBError(f"kernel database {location} is a directory")
        if path.exists():
            with path.open("rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
            if head and head != _SQLITE_MAGIC:
                raise KernelDBError(f"kernel database {location} is not an SQLite file")
        elif not create:
            raise KernelDBError(f"no kernel database at {location} (`moetune tune` creates one)")
        elif make_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():
            raise KernelDBError(f"kernel database {location}: its folder {path.parent} does not exist")
    except OSError as exc:
        raise KernelDBError(f"kernel database {location}: {exc.strerror or exc}") from None
