"""The `moetune` CLI: help, targets (table and --json), presets, exit code 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
        (["bench", "--providers", "reference,gpu"], "unknown provider(s) gpu"),
        (["bench", "--dtype", "int8"], "dtype must be one of"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_tune_bad_input_exits_2(tmp_path):
    corrupt = tmp_path / "bad.db"
    corrupt.write_bytes(b"not a database at all" * 10)
    small = ["--model", "olmoe-1b-7b", "--dtype", "float32"]
    for args, message in [
        (["tune"], "give exactly one of --model PRESET or --hf-config PATH"),
        (["tune", "--model", "qwen9"], "unknown preset 'qwen9'"),
        (["tune", "--hf-config", str(tmp_path / "missing.json")], "no HF config at"),
        ([*small, "--sampler", "bayes"], "unknown sampler 'bayes'"),
        ([*small, "--time-budget", "ten minutes"], "--time-budget must look like"),
        ([*small, "--m", "1,a"], "--m must be comma-separated integers"),
        ([*small, "--db", str(corrupt)], "is not an SQLite file"),
        ([*small, "--ops", "experts.gemm9", "--db", str(tmp_path / "k.db")], "no op of the program matches"),
    ]:
        argv = args if args[0] == "tune" else ["tune", *args]
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert message in result.output, (argv, result.output)
    assert corrupt.read_bytes() == b"not a database at all" * 10  # refused, untouched


def test_parse_duration():
    from moetune.autotune.cli.tune import parse_duration

    assert parse_duration("600") == 600 and parse_duration("10m") == 600 and parse_duration("1h30m") == 5400
    assert parse_duration(None) is None
