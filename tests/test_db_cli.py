"""`moetune db ...` through typer's CliRunner: ls/show/export/import/prune, --json, exit code 2 on bad input."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from moetune.autotune.cli.db import db_app
from moetune.kernels.db import KernelKey, KernelRecord, current_versions, open_db

# Mounted the way cli.py mounts it.
app = typer.Typer()
app.add_typer(db_app, name="db")
runner = CliRunner()

OP = "gemm2[H=64,I=32,E=8,K=2,BM=1,bias=0,w_out=1]:float32"


POINT = {"nt": 16, "mt": 1, "kt": 4, "order": "panels_outer", "par": "fused"}  # feasible for this OP on znver3


def make(m: int, p50: float, versions: dict[str, str], target: str = "llvm -mcpu=znver3") -> KernelRecord:
    backend, config = ("tvm", POINT) if target.startswith("llvm") else ("torch", {})
    return KernelRecord(
        KernelKey(target, OP, "float32", m), versions, backend, config, p50 * 0.9, p50, p50 * 1.1, 2.0, 32
    )


@pytest.fixture
def db_path(tmp_path):
    """A database with two current records and one stale record."""
    path = tmp_path / "kernels.db"
    now = current_versions()
    with open_db(path) as db:
        db.put(make(1, 0.5, now))
        db.put(make(16, 1.0, now, target="cuda -arch=sm_90"))
        db.put(make(16, 0.25, {**now, "tvm": "0.1.0"}))
    return path


def invoke(*args: str):
    return runner.invoke(app, ["db", *args])


def assert_fails(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not result.stdout.strip(), result.stdout  # nothing before the error: no empty table header


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert all(c in result.output for c in ("ls", "show", "export", "import", "prune"))


def test_ls_table_and_json(db_path):
    result = invoke("ls", "--db", str(db_path))
    assert result.exit_code == 0, result.output
    assert "gemm2" in result.output and "stale" in result.output and "4.00x" in result.output

    rows = json.loads(invoke("ls", "--db", str(db_path), "--json").output)
    assert len(rows) == 3 and sum(r["stale"] for r in rows) == 1
    assert {"id", "target", "op", "m_bucket", "p50_ms", "baseline_p50_ms", "speedup", "versions"} <= rows[0].keys()
    only = json.loads(invoke("ls", "--db", str(db_path), "--json", "--target", "cuda -arch=sm_90").output)
    assert [r["m_bucket"] for r in only] == [16]
    assert json.loads(invoke("ls", "--db", str(db_path), "--json", "--op", "gemm1").output) == []


def test_ls_empty_database(tmp_path):
    open_db(tmp_path / "new.db").close()
    result = invoke("ls", "--db", str(tmp_path / "new.db"))
    assert result.exit_code == 0 and "no records" in result.output


def test_show_by_short_id(db_path):
    rows = json.loads(invoke("ls", "--db", str(db_path), "--json").output)
    stale = next(r for r in rows if r["stale"])
    result = invoke("show", stale["id"], "--db", str(db_path), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["id"] == stale["id"] and shown["stale"] and shown["versions"]["tvm"] == "0.1.0"
    table = invoke("show", stale["id"], "--db", str(db_path))
    assert table.exit_code == 0 and "panels_outer" in table.output and "stale" in table.output


def test_show_unknown_key(db_path):
    assert_fails(invoke("show", "ffffffff", "--db", str(db_path)), "no record with id 'ffffffff'")


def test_export_then_import_into_another_db(db_path, tmp_path):
    out = tmp_path / "export.json"
    result = invoke("export", str(out), "--db", str(db_path))
    assert result.exit_code == 0 and "exported 3 records" in result.output
    assert json.loads(out.read_text())["schema"] == 1
    other = tmp_path / "other.db"
    result = invoke("import", str(out), "--db", str(other))
    assert result.exit_code == 0 and "imported 3 records" in result.output
    with open_db(db_path) as a, open_db(other) as b:
        assert a.records() == b.records()
    assert "imported 0 records" in invoke("import", str(out), "--db", str(other)).output


def test_import_bad_file(db_path, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": 1, "records": [{"target": "x"}]}')
    assert_fails(invoke("import", str(bad), "--db", str(db_path)), "record 0: record is missing field(s)")
    assert_fails(invoke("import", str(tmp_path / "missing.json"), "--db", str(db_path)), "cannot read")
    with open_db(db_path) as db:
        assert len(db.records()) == 3


def test_prune_stale_then_all(db_path):
    result = invoke("prune", "--db", str(db_path))
    assert result.exit_code == 0 and "deleted 1 stale records" in result.output
    assert_fails(invoke("prune", "--all", "--db", str(db_path)), "--yes")
    with open_db(db_path) as db:
        assert len(db.records()) == 2
    result = invoke("prune", "--all", "--yes", "--db", str(db_path))
    assert result.exit_code == 0 and "deleted 2 records" in result.output
    with open_db(db_path) as db:
        assert db.records() == []


@pytest.mark.parametrize("command", [["ls"], ["show", "abcd"], ["export", "EXPORT"], ["prune"]])
def test_corrupted_db_is_exit_2(tmp_path, command):
    command = [str(tmp_path / "x.json") if c == "EXPORT" else c for c in command]
    path = tmp_path / "kernels.db"
    path.write_bytes(b"\x00garbage" * 512)
    before = path.read_bytes()
    assert_fails(invoke(*command, "--db", str(path)), "is not an SQLite file")
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"backend": "../../etc/passwd"}, "unknown backend '../../etc/passwd'"),
        ({"config": {**POINT, "nt": 100000}}, "nt=100000 not in"),
        ({"config": {**POINT, "mt": 2}}, "mt_divides_bm"),
        ({"target": "llvm -mcpu=bogus"}, "LLVM does not know the CPU 'bogus'"),
        ({"target": "llvm -mcpu=znver3; rm -rf ~"}, "bad CPU target"),
        ({"target": "tpu-v5"}, "unknown target 'tpu-v5'"),
        ({"target": "cuda -arch=sm_90"}, "backend tvm does not run on cuda targets"),
        ({"op": "gemm2[H=64]:float32"}, "gemm2 needs dims"),
        ({"op": "rm -rf /"}, "not an op signature"),
        ({"dtype": "bfloat16"}, "dtype 'bfloat16' is not the op's 'float32'"),
    ],
    ids=["backend", "nt", "mt", "cpu", "shell", "target", "kind", "dims", "op", "dtype"],
)
def test_import_refuses_records_nothing_can_run(db_path, tmp_path, change, needle):
    """A record that could not run here (with a lower p50 it would replace the real winner) refuses the whole
    file, naming the record, and the database stays byte-identical."""
    good = make(1, 0.5, current_versions()).to_dict()
    hostile = {**good, "m_bucket": 2, "p50_ms": 0.001, **change}
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps({"schema": 1, "records": [good, hostile]}))
    before = db_path.read_bytes()
    assert_fails(invoke("import", str(path), "--db", str(db_path)), "record 1")
    assert needle in invoke("import", str(path), "--db", str(db_path)).stderr
    assert db_path.read_bytes() == before


def test_reading_never_creates_and_a_missing_folder_is_an_error(tmp_path):
    missing = tmp_path / "nope.db"
    for command in ("ls", "export"):
        args = [command, str(tmp_path / "out.json")] if command == "export" else [command]
        assert_fails(invoke(*args, "--db", str(missing)), f"no kernel database at {missing}")
    assert not missing.exists()
    export = tmp_path / "e.json"
    export.write_text('{"schema": 1, "records": []}')
    deep = tmp_path / "no" / "such" / "k.db"
    assert_fails(invoke("import", str(export), "--db", str(deep)), "its folder")
    assert not (tmp_path / "no").exists()
    assert invoke("import", str(export), "--db", str(missing)).exit_code == 0 and missing.exists()


def test_ls_names_the_model_and_keeps_ops_short(tmp_path):
    from moetune.ir.program import lower
    from moetune.model import MoEConfig

    problem = lower(MoEConfig.preset("qwen3-30b-a3b"), 16).op("experts.gemm2")
    path = tmp_path / "k.db"
    with open_db(path) as db:
        db.put(
            KernelRecord(
                KernelKey("llvm -mcpu=znver3", problem.signature, "float32", 16),
                current_versions(),
                "torch",
                {},
                0.9,
                1.0,
                1.1,
                2.0,
                8,
            )
        )
    result = invoke("ls", "--db", str(path))
    assert result.exit_code == 0, result.output
    assert "qwen3-30b-a3b" in result.output and "gemm2 H=2048 I=768 E=128 K=8 BM=" in result.output
    assert "w_out" not in result.output  # the full signature is `db show`'s
