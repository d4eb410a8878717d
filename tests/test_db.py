"""The kernel database: one conformance class run over every backend, plus file-safety and concurrency checks.

Backends: MemoryKernelDB, SQLKernelDB on an SQLite file, on an in-memory `sqlite://` URL, and on a real
PostgreSQL 15 database (tests/postgres.py).
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moetune.kernels.db import (
    SCHEMA_VERSION,
    KernelDB,
    KernelDBError,
    KernelKey,
    KernelRecord,
    MemoryKernelDB,
    default_db_path,
    open_db,
)
from moetune.kernels.db.sql import SQLKernelDB

V1 = {"moetune": "0.1.0", "tvm": "0.27.0", "triton": "3.4.0", "torch": "2.13.0", "source": "abcdef0123456789"}
V0 = {**V1, "tvm": "0.26.0"}  # an older TVM: records tuned with it are stale
OP = "gemm1[H=2048,I=768,E=128,BM=4,act=silu,alpha=1.702,limit=7.0,bias=0,w_in=0]:float32"


def make(m: int = 16, p50: float = 1.0, versions: dict | None = None, op: str = OP, **kw) -> KernelRecord:
    key = KernelKey(target=kw.pop("target", "llvm -mcpu=znver3"), op=op, dtype="float32", m_bucket=m)
    return KernelRecord(
        key=key,
        versions=dict(versions or V1),
        backend=kw.pop("backend", "tvm"),
        config=kw.pop("config", {"tile_n": 32, "vec": 8, "order": ("n", "k")}),
        p20_ms=p50 * 0.9,
        p50_ms=p50,
        p80_ms=p50 * 1.2,
        baseline_p50_ms=kw.pop("baseline", 2.0),
        trials=kw.pop("trials", 64),
        created_at="2026-05-09T07:35:25+00:00",
    )


@pytest.fixture(params=["memory", "sqlite-file", "sqlite-memory-url", "postgresql"])
def db(request, tmp_path) -> KernelDB:
    if request.param == "postgresql":  # a real PostgreSQL 15 cluster (tests/postgres.py), a fresh database
        handle = open_db(request.getfixturevalue("fresh_pg_url"))
        yield handle
        handle.close()
        return
    (tmp_path / "sub").mkdir()
    where = {"memory": "memory", "sqlite-file": str(tmp_path / "sub" / "kernels.db"), "sqlite-memory-url": "sqlite://"}
    handle = open_db(where[request.param])
    yield handle
    handle.close()


class TestKernelDBConformance:
    """Every KernelDB backend behaves the same."""

    def test_put_and_records(self, db):
        a, b = make(m=1), make(m=256, op=OP.replace("H=2048", "H=1024"))
        assert db.put(a) and db.put(b)
        assert db.records() == sorted([a, b], key=lambda r: (r.key.op, r.key.m_bucket))
        assert db.records(op=a.key.op) == [a]
        assert db.records(target="cuda -arch=sm_90") == []
        assert db.records(dtype="float32", target=a.key.target) == db.records()

    def test_record_round_trips_exactly(self, db):
        r = make(p50=0.123456789012345, config={"a": [1, 2], "b": {"c": 1.5}, "d": None})
        db.put(r)
        assert db.records() == [r]
        assert db.records()[0].config == {"a": [1, 2], "b": {"c": 1.5}, "d": None}

    def test_better_wins_and_one_row_per_key(self, db):
        assert db.put(make(p50=2.0))
        assert not db.put(make(p50=3.0)), "a worse record must never replace"
        assert not db.put(make(p50=2.0)), "a tie keeps the stored record"
        assert [r.p50_ms for r in db.records()] == [2.0]
        assert db.put(make(p50=1.0, backend="torch")), "a better record replaces"
        assert [(r.p50_ms, r.backend) for r in db.records()] == [(1.0, "torch")]

    def test_versions_are_part_of_the_key(self, db):
        assert db.put(make(p50=2.0)) and db.put(make(p50=5.0, versions=V0))
        assert sorted(r.p50_ms for r in db.records()) == [2.0, 5.0]

    def test_lookup_exact(self, db):
        db.put(make(m=16, p50=1.0))
        db.put(make(m=32, p50=2.0))
        found = db.lookup(make(m=16).key, V1)
        assert found.kind == "exact" and found.record == make(m=16, p50=1.0) and found.stale == ()

    @pytest.mark.parametrize(
        ("query", "want"),
        [
            (8, 1),  # |3 - 0| = 3 < |3 - 8| = 5
            (16, 256),  # |4 - 0| = 4 = |4 - 8|: a tie goes to the larger M
            (32, 256),
            (2, 1),
            (4096, 256),
        ],
    )
    def test_lookup_nearest_on_log_scale(self, db, query, want):
        db.put(make(m=1, p50=1.0))
        db.put(make(m=256, p50=9.0))
        found = db.lookup(make(m=query).key, V1)
        assert found.kind == "nearest" and found.record.key.m_bucket == want

    def test_lookup_miss(self, db):
        db.put(make(m=16, op=OP.replace("float32", "bfloat16")))
        found = db.lookup(make(m=16).key, V1)
        assert found == found.__class__(None, "miss", ())

    def test_stale_records_are_reported_never_used(self, db):
        old = make(m=16, p50=0.1, versions=V0)  # faster, exact M, but tuned with another TVM
        db.put(old)
        found = db.lookup(make(m=16).key, V1)
        assert found.kind == "miss" and found.record is None and found.stale == (old,)
        db.put(make(m=64, p50=1.0))
        found = db.lookup(make(m=16).key, V1)
        assert found.kind == "nearest" and found.record.versions == V1 and found.stale == (old,)

    def test_delete(self, db):
        r = make()
        db.put(r)
        assert db.delete(make(p50=99.0)), "delete goes by key + versions"
        assert not db.delete(r)
        assert db.records() == []

    def test_prune(self, db):
        db.put(make(m=1))
        db.put(make(m=2, versions=V0))
        db.put(make(m=4, versions={**V1, "source": "0000"}))
        assert db.prune(V1) == 2
        assert [r.key.m_bucket for r in db.records()] == [1]
        db.put(make(m=8))
        assert db.prune(V1, everything=True) == 2
        assert db.records() == []

    def test_export_import_round_trip(self, db, tmp_path):
        rows = [make(m=1, p50=1.0), make(m=16, p50=2.0, versions=V0), make(m=256, op=OP.replace("BM=4", "BM=8"))]
        for r in rows:
            db.put(r)
        path = tmp_path / "export.json"
        assert db.export_json(path) == 3
        data = json.loads(path.read_text())
        assert data["schema"] == SCHEMA_VERSION and len(data["records"]) == 3
        other = MemoryKernelDB()
        assert other.import_json(path, check=False) == 3  # storage only: checks in test_db_cli
        assert other.records() == db.records()
        assert db.import_json(path, check=False) == 0, "re-importing the same records stores nothing (better wins)"
        assert len(db.records()) == 3

    def test_import_merges_better_wins(self, db, tmp_path):
        db.put(make(m=1, p50=1.0))
        db.put(make(m=2, p50=1.0))
        src = MemoryKernelDB([make(m=1, p50=0.5), make(m=2, p50=3.0), make(m=4, p50=1.0)])
        src.export_json(tmp_path / "x.json")
        assert db.import_json(tmp_path / "x.json", check=False) == 2
        assert [(r.key.m_bucket, r.p50_ms) for r in db.records()] == [(1, 0.5), (2, 1.0), (4, 1.0)]

    @pytest.mark.parametrize(
        ("text", "needle"),
        [
            ("{not json", "not valid JSON"),
            ('[{"target": "x"}]', "not a kernel database export"),
            ('{"schema": 99, "records": []}', "schema version 99"),
            ("GOOD_THEN_BAD", "record 1: p50_ms"),  # the first record is fine: still nothing is imported
            ("GOOD_THEN_MISSING", "record 1: record is missing field(s): trials"),
        ],
    )
    def test_import_bad_file_imports_nothing(self, db, tmp_path, text, needle):
        good = make(m=1).to_dict()
        if text == "GOOD_THEN_BAD":
            text = json.dumps({"schema": 1, "records": [good, {**good, "m_bucket": 2, "p50_ms": "fast"}]})
        elif text == "GOOD_THEN_MISSING":
            bad = {k: v for k, v in good.items() if k != "trials"}
            text = json.dumps({"schema": 1, "records": [good, bad]})
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(KernelDBError) as info:
            db.import_json(path)
        assert needle in str(info.value) and "\n" not in str(info.value)
        assert db.records() == []

    def test_concurrent_puts_keep_the_minimum(self, db):
        rng = random.Random(0)
        values = [[rng.uniform(0.5, 5.0) for _ in range(15)] for _ in range(6)]

        def worker(p50s):
            for p in p50s:
                db.put(make(p50=p))

        threads = [threading.Thread(target=worker, args=(v,)) for v in values]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.p50_ms for r in db.records()] == [min(min(v) for v in values)]


# --- records and files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"m_bucket": 0}, "m_bucket"),
        ({"m_bucket": True}, "m_bucket"),
        ({"p50_ms": float("nan")}, "p50_ms"),
        ({"baseline_p50_ms": -1.0}, "baseline_p50_ms"),
        ({"versions": {"tvm": 27}}, "versions"),
        ({"config": [1, 2]}, "config"),
        ({"trials": 1.5}, "trials"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"op": ""}, "op"),
        ({"p50": 1.0}, "unknown field(s): p50"),
    ],
)
def test_from_dict_names_the_bad_field(change, field):
    with pytest.raises(KernelDBError, match=re.escape(field)):
        KernelRecord.from_dict({**make().to_dict(), **change})


def test_to_dict_from_dict_and_ids():
    r = make()
    assert KernelRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert len(r.short_id) == 8 and r.digest.startswith(r.short_id)
    assert make(p50=7.0).short_id == r.short_id, "the id names the key, not the timing"
    assert make(versions=V0).short_id != r.short_id
    assert r.speedup == pytest.approx(2.0)
    zulu = KernelRecord.from_dict({**r.to_dict(), "created_at": "2026-05-09T07:35:25Z"})  # time.strftime style
    assert zulu.created_at == "2026-05-09T07:35:25Z"


def test_sqlite_file_persists_and_find(tmp_path):
    path = tmp_path / "k.db"
    with SQLKernelDB(path) as db:
        db.put(make(m=1))
        db.put(make(m=2))
    with open_db(str(path)) as db:
        assert [r.key.m_bucket for r in db.records()] == [1, 2]
        r = db.records()[1]
        assert db.find(r.short_id) == r and db.find(r.digest.upper()) == r
        with pytest.raises(KernelDBError, match="no record with id"):
            db.find("zzzz")


def test_open_db_dispatch(tmp_path, monkeypatch):
    assert isinstance(open_db("memory"), MemoryKernelDB) and isinstance(open_db(":memory:"), MemoryKernelDB)
    with pytest.raises(KernelDBError, match=r"its folder .* does not exist"):  # only the default's folder is made
        open_db(f"sqlite:///{tmp_path}/u/x.db")
    (tmp_path / "u").mkdir()
    url_db = open_db(f"sqlite:///{tmp_path}/u/x.db")
    assert isinstance(url_db, SQLKernelDB) and (tmp_path / "u" / "x.db").exists()
    url_db.close()
    monkeypatch.setenv("MOETUNE_DB", str(tmp_path / "env.db"))
    assert default_db_path() == tmp_path / "env.db"
    open_db().close()
    assert (tmp_path / "env.db").exists()
    monkeypatch.setenv("MOETUNE_DB", "sqlite://")
    assert default_db_path() == "sqlite://"
    monkeypatch.delenv("MOETUNE_DB")
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path / "cache"))  # the one cache root holds the default DB
    assert default_db_path() == tmp_path / "cache" / "kernels.db"
    monkeypatch.delenv("MOETUNE_CACHE_DIR")
    assert default_db_path() == Path.home() / ".cache" / "moetune" / "kernels.db"


def _assert_refused(path: Path, *needles: str) -> str:
    before = path.read_bytes()
    with pytest.raises(KernelDBError) as info:
        open_db(path)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert path.read_bytes() == before, "a refused file must be left untouched"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no journal or side file either"
    return message


@pytest.mark.parametrize("head", [b"", b"SQLite format 3\x00"], ids=["random-bytes", "sqlite-header-then-garbage"])
def test_corrupted_file_is_refused_untouched(tmp_path, head):
    path = tmp_path / "kernels.db"
    path.write_bytes(head + random.Random(1).randbytes(8192))
    _assert_refused(path, str(path))


def test_other_schema_version_is_refused_untouched(tmp_path):
    path = tmp_path / "kernels.db"
    with SQLKernelDB(path) as db:
        db.put(make())
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET schema_version = 99")
    conn.close()
    message = _assert_refused(path)
    assert message == f"kernel database {path} has schema version 99; this moetune reads version 1"


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users VALUES (1, 'a')",
        "CREATE TABLE meta (key TEXT, value TEXT); INSERT INTO meta VALUES ('x', 'y')",
    ],
    ids=["other-tables", "other-meta-table"],
)
def test_foreign_sqlite_db_is_refused_untouched(tmp_path, ddl):
    path = tmp_path / "kernels.db"
    conn = sqlite3.connect(path)
    conn.executescript(ddl)
    conn.commit()
    conn.close()
    _assert_refused(path, "not a moetune kernel database")


def test_password_is_masked_in_errors():
    with pytest.raises(KernelDBError) as info:
        open_db("postgresql://user:secret@127.0.0.1:1/x")
    message = str(info.value)
    assert "secret" not in message and "user:***@127.0.0.1" in message and "\n" not in message


_PUTTER = """
import random, sys
from moetune.kernels.db import KernelKey, KernelRecord, open_db
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
db = open_db(path)
best = float("inf")
for _ in range(20):
    p = rng.uniform(0.5, 5.0)
    best = min(best, p)
    key = KernelKey("llvm -mcpu=znver3", "gemm1[H=8]:float32", "float32", 16)
    db.put(KernelRecord(key, {"tvm": "0.27"}, "tvm", {"seed": seed}, p, p, p, 2.0, 1))
print(repr(best))
"""


def test_concurrent_processes_keep_the_minimum(tmp_path):
    """Four processes race on one key of a fresh SQLite file (schema creation included)."""
    path = tmp_path / "race.db"
    procs = [
        subprocess.Popen([sys.executable, "-c", _PUTTER, str(path), str(seed)], stdout=subprocess.PIPE, text=True)
        for seed in range(4)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    with open_db(path) as db:
        rows = db.records()
    assert len(rows) == 1 and rows[0].p50_ms == min(float(o) for o in outs)


def test_a_backend_record_goes_stale_only_with_its_own_versions(monkeypatch):
    """A record stores the versions that decide its backend's kernels: editing the Triton kernels (or upgrading
    Triton) leaves the CPU's tvm winners in use, and makes the triton winners stale."""
    from moetune.kernels.db import versions as v

    cpu = make(1, 1.0, v.current_versions("tvm"))
    gpu = make(16, 1.0, v.current_versions("triton"), backend="triton", target="cuda -arch=sm_90")
    db = MemoryKernelDB([cpu, gpu])
    assert cpu.versions["triton"] == "*" and gpu.versions["tvm"] == "*" and v.is_current(cpu) and v.is_current(gpu)
    assert v.is_current(make(1, 1.0, v.current_versions()))  # a record with every version current is current too
    real = v._source_hash
    monkeypatch.setattr(v, "_source_hash", lambda backend: "edited" if backend == "triton" else real(backend))
    assert v.is_current(cpu) and not v.is_current(gpu)
    assert db.lookup(cpu.key).kind == "exact" and db.lookup(gpu.key).kind == "miss"
    assert db.prune() == 1 and db.records() == [cpu]
