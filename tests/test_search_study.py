"""The search-efficiency study: samplers replayed on a measured table, its statistics, and the grid's real path.

Most tests use a small fake table (a known objective over a space with a constraint and a failing point), so
they check the bookkeeping without timing anything; one runs the CLI end to end on a tiny real problem.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
from typer.testing import CliRunner

from moetune.autotune.cli import app
from moetune.autotune.sampler_study.replay import (
    SAMPLERS,
    GridPoint,
    GridTable,
    StudyProblem,
    _median_or_none,
    load_grid,
    run_study,
    save_grid,
    simulate,
    targets,
    trials_to_within,
)
from moetune.autotune.sampler_study.report import markdown
from moetune.schedules.space import Constraint, Param, SearchSpace

SPACE = SearchSpace(
    "fake",
    params=(Param("x", tuple(range(8))), Param("y", tuple(range(8))), Param("c", ("a", "b"))),
    constraints=(Constraint("sum", "x + y <= 10", lambda p: p["x"] + p["y"] <= 10),),
)
FAILING = {"x": 0, "y": 0, "c": "a"}  # a point that "did not build"


def _objective(p) -> float:
    return 1.0 + 0.1 * (p["x"] - 5) ** 2 + 0.1 * (p["y"] - 2) ** 2 + (0.5 if p["c"] == "b" else 0.0)


def fake_table() -> GridTable:
    points = [
        GridPoint(p, False, math.nan, error="build failed") if p == FAILING else GridPoint(p, True, _objective(p))
        for p in SPACE.points()
    ]
    return GridTable("fake", SPACE, points, default={"x": 0, "y": 7, "c": "b"}, controls=[2.0, 2.2, 2.1])


def test_table_best_size_and_drift():
    table = fake_table()
    assert table.best.point == {"x": 5, "y": 2, "c": "a"} and table.best.p50_ms == 1.0
    assert table.grid_size == 8 * 8 * 2 and len(table.points) < table.grid_size  # the constraint removes some
    assert table.drift() == pytest.approx(1.1)
    assert math.isnan(table.pass_spread())  # one pass: no spread to report
    assert table.lookup({"c": "a", "y": 2, "x": 5}).p50_ms == 1.0  # key order does not matter


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_simulate_traces_are_best_so_far_of_table_values(sampler):
    table = fake_table()
    trace = simulate(table, sampler, trials=20, seed=3)
    assert len(trace) == 20
    assert all(b <= a for a, b in itertools.pairwise(trace))  # never gets worse
    values = {p.p50_ms for p in table.points if p.ok}
    assert all(v in values for v in trace if math.isfinite(v))  # only measured values, nothing invented
    assert trace == simulate(table, sampler, trials=20, seed=3)  # seeded: reproducible


def test_within_and_median_with_censoring():
    assert trials_to_within([math.inf, 3.0, 1.04, 1.0], 1.05) == 3
    assert trials_to_within([3.0, 2.0], 1.05) is None
    assert _median_or_none([4, 2, None]) == 4
    assert _median_or_none([4, None, None]) is None
    assert _median_or_none([1, 3]) == 2


def test_run_study_summary_and_targets():
    result = run_study([fake_table()], samplers=("tpe", "random"), budgets=(4, 16, 64), seeds=3)
    rows = {r["sampler"]: r for r in result["summary"]}
    for r in rows.values():
        assert r["grid_points"] == len(fake_table().points) and r["grid_best_ms"] == 1.0
        assert r["default_ratio"] == pytest.approx(_objective({"x": 0, "y": 7, "c": "b"}))
        assert r["ratio_at"][4] >= r["ratio_at"][16] >= r["ratio_at"][64] >= 1.0
        assert len(r["trials_to_5pct"]) == 3
        assert 0.0 < r["pruned_fraction"] < 1.0  # x + y > 10 is infeasible: some trials are pruned
    t = targets(result["summary"], (4, 16, 64))
    assert set(t) == {"tpe", "random"}
    assert t["random"]["geomean_ratio@64"] == pytest.approx(t["random"]["random_geomean_ratio@64"])
    text = markdown(result)
    assert "| fake |" in text and "tpe" in text and "random" in text


def test_grid_csv_round_trip(tmp_path):
    table = fake_table()
    path = tmp_path / "grid.csv"
    save_grid(table, path, {"machine": "m"})
    back = load_grid(path, SPACE, table.default)
    assert [p.point for p in back.points] == [p.point for p in table.points]
    assert [p.ok for p in back.points] == [p.ok for p in table.points]
    assert back.best.p50_ms == table.best.p50_ms and back.controls == table.controls


def test_problem_names_parse_and_validate():
    p = StudyProblem.parse("mixtral-8x7b/8:gemm2:64")
    assert (p.preset, p.shrink, p.op, p.m) == ("mixtral-8x7b", 8, "experts.gemm2", 64)
    assert p.name == "mixtral-8x7b/8:gemm2:64" and p.config().hidden_size == 4096 // 8
    assert p.problem().op == "gemm2"
    for bad in ("mixtral-8x7b:gemm2", "nope:gemm1:16", "qwen3-30b-a3b:gemm9:16"):
        with pytest.raises(ValueError, match="PRESET"):
            StudyProblem.parse(bad)


def test_study_cli_end_to_end_on_a_tiny_real_grid(tmp_path):
    pytest.importorskip("matplotlib")
    runner = CliRunner()
    spec = "qwen3-30b-a3b/64:gemm2:1"  # H=32, I=12, BM=1: a small grid, each point a fraction of a ms
    res = runner.invoke(app, ["study", "grid", "--problem", spec, "--out", str(tmp_path), "--repeat", "3"])
    assert res.exit_code == 0, res.output
    grid = next(tmp_path.glob("grid_*.csv"))
    table = load_grid(grid)
    assert len(table.points) == len(list(table.space.points())) and table.best.ok
    assert len(table.controls) >= 2
    # resuming measures nothing new
    lines = grid.read_text().count("\n")
    assert runner.invoke(app, ["study", "grid", "--problem", spec, "--out", str(tmp_path)]).exit_code == 0
    assert grid.read_text().count("\n") == lines
    args = ["study", "run", "--dir", str(tmp_path), "--seeds", "2", "--budgets", "4,8", "--samplers", "tpe,random"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert {r["sampler"] for r in out["summary"]} == {"tpe", "random"} and set(out["targets"]) == {"tpe", "random"}
    assert (tmp_path / "search_efficiency.png").stat().st_size > 0 and (tmp_path / "study.md").exists()
    bad = runner.invoke(app, ["study", "run", "--dir", str(tmp_path), "--samplers", "anneal"])
    assert bad.exit_code == 2 and "--samplers" in bad.output
