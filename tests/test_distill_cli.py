"""`moetune distill` end to end on a tiny random BERT teacher: distil, package, load, run; bad input exits 2."""

from __future__ import annotations

import json

import pytest
from test_distill import tiny_teacher_dir  # noqa: F401  (fixture)
from typer.testing import CliRunner

from moetune.autotune.cli import app
from moetune.model import load
from moetune.model.distill.text import is_available

runner = CliRunner()
pytestmark = pytest.mark.skipif(not is_available(), reason="Debian package `fortunes` not installed")


def _fails(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not result.stdout.strip(), result.stdout  # nothing before the error: no progress bar, no table header


@pytest.mark.slow
def test_distill_packages_a_student_that_loads_and_encodes(tiny_teacher_dir, tmp_path):  # noqa: F811
    out, results = tmp_path / "student", tmp_path / "results"
    args = [
        "distill",
        "--teacher",
        str(tiny_teacher_dir),
        "-e",
        "4",
        "-k",
        "1",
        "--steps",
        "2",
        "--eval-texts",
        "16",
        "--bench-texts",
        "32",
    ]
    result = runner.invoke(
        app, [*args, "--tune-trials", "1", "--out", str(out), "--results", str(results), "--db", str(tmp_path / "k.db"),
              "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0 < report["ffn_flops_ratio"] < 1 and report["speed"]["p50_ms"]["student_tuned"] > 0
    assert report["shared"] == 12  # the default: 64 // 6 = 10, rounded up so that E=4 divides the rest
    assert 0 <= report["heldout"]["retrieval_at10"] <= 1 and report["heldout"]["cosine_p05"] <= 1
    assert (results / "distill.csv").read_text().count("\n") == 2  # header + one row
    student = load(out)
    emb = student.encode(["Knowledge is power.", "Better late than never."])
    assert emb.shape == (2, 32) and abs(float(emb[0].norm()) - 1) < 1e-4
    from moetune.model.runtime.tuned import TunedMoE

    assert sum(isinstance(m, TunedMoE) for m in student.modules()) == 2  # both FFNs on moetune's kernels

    ran = runner.invoke(app, ["run", str(out), "Knowledge is power.", "--json"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout)["dim"] == 32


def test_distill_bad_input(tiny_teacher_dir, tmp_path):  # noqa: F811
    _fails(runner.invoke(app, ["distill", "-e", "2", "-k", "3", "--out", str(tmp_path / "o")]), "--top-k (3)")
    _fails(runner.invoke(app, ["distill", "--teacher", str(tmp_path), "--out", str(tmp_path / "o")]), str(tmp_path))
    tiny = ["distill", "--teacher", str(tiny_teacher_dir), "-k", "1", "--out", str(tmp_path / "o")]
    _fails(runner.invoke(app, [*tiny, "-e", "5", "--shared", "0"]), "E=5")
    _fails(runner.invoke(app, [*tiny, "-e", "4", "--shared", "64"]), "shared")
    _fails(
        runner.invoke(app, [*tiny, "-e", "4", "--shared", "0", "--quant", "int4"]), "must divide intermediate_size (16)"
    )
    _fails(runner.invoke(app, [*tiny, "-e", "2", "--shared", "0", "--quant", "fp8"]), "quant must be one of")
    _fails(runner.invoke(app, [*tiny, "-e", "2", "--quant-group", "64"]), "--quant-group needs --quant")
