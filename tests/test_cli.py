"""The `moetune` CLI: help, targets (table and --json), presets, exit code 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moetune.autotune.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "targets" in result.output and "presets" in result.output


def _commands(group, path=()):
    """Every command path of the typer app (sub-groups included)."""
    for name, cmd in getattr(group, "commands", {}).items():
        yield (*path, name)
        yield from _commands(cmd, (*path, name))


def test_every_command_help_renders():
    """--help of every command renders (rich markup in a help text, e.g. "[/X]", would crash it)."""
    import typer

    paths = list(_commands(typer.main.get_command(app)))
    assert ("study", "grid") in paths and ("tune",) in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output, result.exception)
        assert "Usage" in result.output


def test_targets_json_describes_the_host_cpu():
    result = runner.invoke(app, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    cpu = [t for t in found if t["kind"] == "cpu"]
    assert len(cpu) == 1
    assert cpu[0]["target"].startswith("llvm -mcpu=") and cpu[0]["tvm_target"]["kind"] == "llvm"
    assert cpu[0]["cores"] >= 1 and isinstance(cpu[0]["features"], list)
    import torch

    assert len([t for t in found if t["kind"] == "cuda"]) == torch.cuda.device_count()


def test_targets_table():
    result = runner.invoke(app, ["targets"])
    assert result.exit_code == 0 and "llvm -mcpu=" in result.output


def test_presets_json():
    result = runner.invoke(app, ["presets", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["qwen3-30b-a3b"]["num_experts"] == 128 and rows["qwen3-30b-a3b"]["top_k"] == 8


def test_console_script_and_bad_option_exit_2():
    """Through the installed console script: an unknown option is exit code 2."""
    script = Path(sys.executable).with_name("moetune")
    assert script.exists(), "the moetune console script is not installed next to the interpreter"
    bad = subprocess.run([str(script), "targets", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "No such option" in bad.stderr


def test_bench_smoke_writes_csv_rows(tmp_path):
    out = tmp_path / "bench.csv"
    result = runner.invoke(
        app,
        [
            "bench",
            "-p",
            "olmoe-1b-7b",
            "--tokens",
            "1,5",
            "--shrink",
            "32",
            "--repeat",
            "2",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {(r["tokens"], r["provider"]) for r in rows} == {
        (t, p) for t in (1, 5) for p in ("reference", "torch", "tvm", "tuned")
    }
    assert all(r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["gflops"] > 0 for r in rows)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("machine,preset,dtype,tokens,provider") and len(lines) == 1 + len(rows)


def test_bench_bad_input_exits_2():
    for args, message in [
        (["bench", "--tokens", "1,x"], "--tokens must be comma-separated integers"),
        (["bench", "--tokens", "0"], "--tokens must be integers >= 1"),
        (["bench", "-p", "qwen9"], "unknown preset 'qwen9'"),
        (["bench", "--model", "qwen9"], "unknown preset 'qwen9'"),  # tune's name for the same flag
        (["bench", "--providers", "reference,gpu"], "unknown provider(s) gpu"),
        (["bench", "--dtype", "int8"], "dtype must be one of"),
        (["bench", "-p", "qwen3-30b-a3b", "--quant", "fp8"], "quant must be one of none, int8, int4"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, (args, result.output)  # no table header before it


def test_tune_bad_input_exits_2(tmp_path):
    corrupt = tmp_path / "bad.db"
    corrupt.write_bytes(b"not a database at all" * 10)
    small = ["--model", "olmoe-1b-7b", "--dtype", "float32"]
    huge = tmp_path / "huge.json"  # H = I = 131072, E = 1024: hundreds of TB of weights
    huge.write_text(
        '{"model_type": "mixtral", "hidden_size": 131072, "intermediate_size": 131072, "num_local_experts": 1024,'
        ' "num_experts_per_tok": 2, "hidden_act": "silu", "torch_dtype": "float32"}'
    )
    for args, message in [
        (["tune"], "give exactly one of --model PRESET or --hf-config PATH"),
        (["tune", "--model", "qwen9"], "unknown preset 'qwen9'"),
        (["tune", "--preset", "qwen9"], "unknown preset 'qwen9'"),  # bench's name for the same flag
        (["tune", "--hf-config", str(tmp_path / "missing.json")], "no HF config at"),
        ([*small, "--sampler", "bayes"], "unknown sampler 'bayes'"),
        ([*small, "--time-budget", "ten minutes"], "--time-budget must look like"),
        ([*small, "--m", "1,a"], "--m must be comma-separated integers"),
        ([*small, "--quant", "fp8", "--db", str(tmp_path / "k.db")], "quant must be one of none, int8, int4"),
        ([*small, "--quant", "int4", "--quant-group", "48", "--db", str(tmp_path / "k.db")], "one of 32, 64, 128"),
        ([*small, "--quant-group", "64", "--db", str(tmp_path / "k.db")], "--quant-group needs --quant"),
        ([*small, "--db", str(corrupt)], "is not an SQLite file"),
        ([*small, "--ops", "experts.gemm9", "--db", str(tmp_path / "k.db")], "no op of the program matches"),
        ([*small, "--m", "1000000000", "--db", str(tmp_path / "k.db")], "GiB of memory"),
        ([*small, "--m", "99999999999999999999", "--db", str(tmp_path / "k.db")], "GiB of memory"),
        (["--hf-config", str(huge), "--db", str(tmp_path / "k.db")], "GiB of memory"),
    ]:
        argv = args if args[0] == "tune" else ["tune", *args]
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert message in result.output, (argv, result.output)
        assert len(result.output.strip().splitlines()) == 1, (argv, result.output)  # no table header before it
    assert corrupt.read_bytes() == b"not a database at all" * 10  # refused, untouched
    assert not (tmp_path / "k.db").exists()  # every refusal came before the DB was created


def test_parse_duration():
    from moetune.autotune.cli.tune import parse_duration

    assert parse_duration("600") == 600 and parse_duration("10m") == 600 and parse_duration("1h30m") == 5400
    assert parse_duration(None) is None


@pytest.mark.parametrize("cache", ["/proc/moetune-cache", "FILE"], ids=["unwritable", "a-file"])
def test_tune_with_an_unusable_cache_dir_fails_and_stores_nothing(tmp_path, monkeypatch, cache):
    """Every build would fail to save: the tune stops before measuring, exit 2, and the DB is not even created
    (it once stored the torch baseline as the winner and exited 0)."""
    if cache == "FILE":
        cache = tmp_path / "plain-file"
        cache.write_text("not a directory")
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(cache))
    db = tmp_path / "k.db"
    argv = ["tune", "--model", "olmoe-1b-7b", "--dtype", "float32", "--m", "1", "--trials", "2", "--db", str(db)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert f"the cache directory {cache} is not usable" in result.output
    assert not db.exists()


def test_bad_target_is_refused_before_anything_is_written(tmp_path):
    db = tmp_path / "k.db"
    for target in ("llvm -mcpu=bogus", "llvm -mcpu=znver3 && echo pwned"):
        result = runner.invoke(app, ["tune", "--model", "olmoe-1b-7b", "--target", target, "--db", str(db)])
        assert result.exit_code == 2 and not db.exists(), result.output


def test_bench_writes_no_file_unless_asked(tmp_path, monkeypatch):
    """A bench run prints; it appends CSV rows only with --save (or --out): never into a checkout by surprise."""
    monkeypatch.chdir(tmp_path)
    args = [
        "bench",
        "-p",
        "olmoe-1b-7b",
        "--tokens",
        "1",
        "--shrink",
        "32",
        "--repeat",
        "2",
        "--providers",
        "reference",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == [] and "appended" not in result.output
    result = runner.invoke(app, [*args, "--save"])
    assert result.exit_code == 0 and len(list(tmp_path.glob("results/*/layer_bench_v2.csv"))) == 1, result.output


def test_an_unusable_storage_path_is_a_one_line_error(tmp_path):
    db = tmp_path / "k.db"
    for storage, needle in [
        ("/proc/nope/s.journal", "cannot use /proc/nope/s.journal as the Optuna study journal"),
        (str(tmp_path), "is a directory"),
    ]:
        argv = ["tune", "--model", "olmoe-1b-7b", "--m", "1", "--storage", storage, "--db", str(db)]
        result = runner.invoke(app, argv)
        assert result.exit_code == 2 and needle in result.output, result.output
        assert not db.exists()


def test_tune_in_a_log_prints_plain_progress_lines_and_no_nan(tmp_path):
    """Output that is not a terminal (a log, CI) gets a line as each study starts and ends, then the table."""
    argv = ["tune", "--model", "olmoe-1b-7b", "--shrink", "32", "--m", "1", "--trials", "2", "--ops", "experts.gemm1"]
    argv += ["--db", str(tmp_path / "k.db"), "--storage", str(tmp_path / "s.journal")]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "tuning M=1 experts.gemm1 ..."
    assert lines[1].startswith("M=1 experts.gemm1: tuned, ") and " trials, " in lines[1]
    assert "nan" not in result.output and "moetune tune" in result.output  # the final table, with its title
