"""The tuner's search loop (autotune/tuning/search.py `explore`) and the narrowed space it samples from.

A fake space with a coupling constraint and a unary one (a choice no feasible point uses), and a counting
`measure`, check the budget rules without building anything: only measurements count, infeasible proposals
and repeats are never measured, and a space smaller than the budget is measured exactly once per point.
"""

from __future__ import annotations

import optuna
import pytest

from moetune.autotune.tuning.samplers import SAMPLERS, make_sampler
from moetune.autotune.tuning.search import TrialFailed, explore, measured
from moetune.schedules.space import Constraint, Param, SearchSpace

SPACE = SearchSpace(
    "fake",
    params=(Param("x", (1, 2, 3, 4, 5, 6)), Param("y", (1, 2, 4, 8)), Param("c", ("a", "b"))),
    constraints=(
        Constraint("x_divides_12", "x divides 12 (5 never does)", lambda p: 12 % p["x"] == 0),
        Constraint("budget", "x * y <= 16", lambda p: p["x"] * p["y"] <= 16),
    ),
)


def _value(p) -> float:
    return 1.0 + abs(p["x"] - 3) + abs(p["y"] - 4) / 4 + (0.5 if p["c"] == "b" else 0.0)


def test_narrowed_drops_choices_no_feasible_point_uses():
    narrow = SPACE.narrowed()
    assert dict((p.name, p.choices) for p in narrow.params) == {
        "x": (1, 2, 3, 4, 6),
        "y": (1, 2, 4, 8),
        "c": ("a", "b"),
    }
    assert list(narrow.points()) == list(SPACE.points())  # the same feasible points, in the same order
    assert narrow.constraints == SPACE.constraints
    nothing = SearchSpace("none", (Param("x", (1, 2)),), (Constraint("never", "never", lambda p: False),))
    assert nothing.narrowed() == nothing  # nothing feasible: kept whole, so violations can still be reported
    assert SearchSpace("align").narrowed() == SearchSpace("align")


def _study(sampler: str, space: SearchSpace, seed: int = 0) -> optuna.Study:
    return optuna.create_study(direction="minimize", sampler=make_sampler(sampler, space, seed))


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "grid"])
def test_budget_counts_measurements_only(sampler):
    space = SPACE.narrowed()
    calls = []

    def measure(trial, point):
        calls.append(point)
        return _value(point)

    study = _study(sampler, space, seed=1)
    explore(study, space, measure, trials=10)
    spent = measured(study.trials)
    assert len(calls) == len(spent) == 10
    assert all(space.is_feasible(p) for p in calls)  # nothing infeasible was ever measured
    assert len({tuple(sorted(p.items())) for p in calls}) == 10  # and nothing twice
    for t in study.trials:  # every unmeasured proposal is accounted for: pruned, or a repeat with its value
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.user_attrs["pruned"]
        elif "repeat_of" in t.user_attrs:
            assert t.value == study.trials[t.user_attrs["repeat_of"]].value


def test_space_smaller_than_budget_is_measured_once_per_point():
    space = SPACE.narrowed()
    feasible = list(space.points())
    calls = []

    def measure(trial, point):
        calls.append(point)
        return _value(point)

    study = _study("random", space)
    explore(study, space, measure, trials=len(feasible) + 20)
    assert sorted(map(str, calls)) == sorted(map(str, feasible))
    assert study.best_value == min(_value(p) for p in feasible)


def test_failed_points_count_and_are_not_retried():
    space = SPACE.narrowed()
    calls = []

    def measure(trial, point):
        calls.append(point)
        if point["c"] == "b":
            raise TrialFailed("injected")
        return _value(point)

    study = _study("tpe", space)
    explore(study, space, measure, trials=12)
    spent = measured(study.trials)
    assert len(spent) == len(calls) == 12
    assert any(t.state == optuna.trial.TrialState.FAIL for t in spent)
    assert len({str(p) for p in calls}) == 12


def test_patience_and_proposal_cap_stop_the_study():
    space = SPACE.narrowed()
    study = _study("random", space)
    explore(study, space, lambda trial, p: 1.0, trials=30, patience=3)  # a flat objective: never a new best
    assert len(measured(study.trials)) == 4  # the first, then 3 without improvement
    one = SearchSpace("one", (Param("x", (1, 2)),), (Constraint("one", "x is 1", lambda p: p["x"] == 1),))
    study = _study("random", one)
    explore(study, one, lambda trial, p: 1.0, trials=5)
    assert len(measured(study.trials)) == 1  # the single feasible point, then stopped (not 50 proposals)
