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
