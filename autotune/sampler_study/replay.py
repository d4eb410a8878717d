"""Search-efficiency study: how many trials each of the tuner's samplers needs on the CPU schedule space.

Data flow:
  1. measure_grid(problem)  every feasible point of the op's space measured through the tuner's own trial path,
     `passes` times, with drift controls -> GridTable; one CSV per problem (search_study_grid.py, re-exported
     here with the problem and table types).
  2. simulate(table, sampler, trials, seed)  an Optuna study with the tuner's sampler (samplers.make_sampler),
     the tuner's parameter encoding (samplers.suggest) and its pruning of infeasible points, whose objective is
     a lookup of the MEASURED p50 in the table: cheap, and every sampler sees exactly the same (noisy) values.
     It runs through the tuner's own `search.explore`: the narrowed space, infeasible proposals pruned and
     repeats answered from the study, neither counted; a failed point is a measured trial. The samplers do not
     know the budget, so the first 8/16/32 trials of a 64-trial run are the 8/16/32-trial runs.
  3. run_study(...)  per problem and sampler: trials until the best found is within 5% of the grid's best
     (median over seeds), and best-found / grid-best at each budget (median over seeds); tables and the plot are
     in search_study_report.py.

Problems are named "PRESET[/SHRINK]:OP:M", e.g. "qwen3-30b-a3b/4:gemm1:256" (H and I divided by SHRINK so a
whole grid is measurable in minutes on a small CPU).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from moetune.autotune.sampler_study.grid import (
    GRID_FIELDS,
    GridPoint,
    GridTable,
    StudyProblem,
    load_grid,
    measure_grid,
    save_grid,
)
from moetune.schedules.space import Point

__all__ = [
    "BUDGETS",
    "DEFAULT_PROBLEMS",
    "GRID_FIELDS",
    "SAMPLERS",
    "WITHIN",
    "GridPoint",
    "GridTable",
    "StudyProblem",
    "load_grid",
    "measure_grid",
    "run_study",
    "save_grid",
    "simulate",
    "targets",
    "trials_to_within",
]

# Three decode-like problems (BM=1) and three prefill-like ones (BM=8), gemm1 and gemm2 each: qwen3 (128 narrow
# experts) at M=16 and M=256, Mixtral (8 wide experts) at M=64 and M=1; shrunk so that the six grids (528 points)
# measure in well under an hour on a busy 2-core VM.
DEFAULT_PROBLEMS = (
    "qwen3-30b-a3b/4:gemm1:16",
    "qwen3-30b-a3b/4:gemm2:16",
    "qwen3-30b-a3b/8:gemm1:256",
    "qwen3-30b-a3b/8:gemm2:256",
    "mixtral-8x7b/16:gemm1:64",
    "mixtral-8x7b/16:gemm2:1",
)
SAMPLERS = ("tpe", "cmaes", "gp", "random")
BUDGETS = (8, 16, 32, 64)
WITHIN = 0.05  # "found": best-so-far within 5% of the grid's best


# ---- 2. samplers against the measured table ---------------------------------------------------------------------
def simulate(table: GridTable, sampler: str, trials: int, seed: int, states: list[str] | None = None) -> list[float]:
    """Best p50 found after each measured trial (inf until the first completed one) of one seeded Optuna study
    run by the tuner's own `search.explore` on the tuner's narrowed space, with a table lookup for the measurement.

    The trace has `trials` entries; a study that stopped early (every feasible point measured, or the proposal
    cap) keeps its final best. `states`, if given, receives each proposal's fate: COMPLETE / FAIL (measured),
    PRUNED (infeasible) or REPEAT (an already measured point)."""
    import optuna

    from moetune.autotune.tuning.samplers import make_sampler
    from moetune.autotune.tuning.search import TrialFailed, explore, measured

    space = table.space.narrowed()

    def lookup(trial: optuna.Trial, point: Point) -> float:
        found = table.lookup(point)
        if found is None or not found.ok:
            raise TrialFailed(found.error if found else f"point {point} was not measured")
        return found.p50_ms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-sampler and independent-sampling notices
        study = optuna.create_study(direction="minimize", sampler=make_sampler(sampler, space, seed))
        explore(study, space, lookup, trials)
    trace, best = [], math.inf
    for t in measured(study.trials):
        if t.state == optuna.trial.TrialState.COMPLETE:
            best = min(best, t.value)
        trace.append(best)
    if states is not None:
        states += ["REPEAT" if "repeat_of" in t.user_attrs else t.state.name for t in study.trials]
    return (trace + [best] * trials)[:trials]


def trials_to_within(trace: Sequence[float], target: float) -> int | None:
    """1-based trial at which the best-so-far first reaches `target` (None: never within the trace)."""
    return next((i + 1 for i, v in enumerate(trace) if v <= target), None)


def _median_or_none(values: list[int | None]) -> float | None:
    """Median where None means 'not reached' (larger than anything): None if the median is not reached."""
    ranked = sorted(values, key=lambda v: math.inf if v is None else v)
    n = len(ranked)
    mid = ranked[(n - 1) // 2], ranked[n // 2]
    if mid[1] is None:
        return None
    if mid[0] is None:  # cannot happen with sorting; kept for clarity
        return None
    return (mid[0] + mid[1]) / 2


def run_study(
    tables: Sequence[GridTable],
    samplers: Sequence[str] = SAMPLERS,
    budgets: Sequence[int] = BUDGETS,
    seeds: int = 5,
    on_run: Callable[[str, str, int], None] | None = None,
) -> dict[str, Any]:
    """Every sampler x seed on every table, up to max(budgets) trials. -> {"summary": [...], "traces": {...}}."""
    trials = max(budgets)
    summary, traces = [], {}
    for table in tables:
        best = table.best.p50_ms
        default = table.lookup(table.default)
        for sampler in samplers:
            runs, pruned = [], []
            for seed in range(seeds):
                states: list[str] = []
                runs.append(simulate(table, sampler, trials, seed, states))
                pruned.append((states.count("PRUNED") + states.count("REPEAT")) / len(states))
                if on_run:
                    on_run(table.name, sampler, seed)
            traces[f"{table.name}|{sampler}"] = runs
            reached = [trials_to_within(r, best * (1 + WITHIN)) for r in runs]
            med = _median_or_none(reached)
            feasible = len(table.points)
            summary.append(
                {
                    "problem": table.name,
                    "sampler": sampler,
                    "grid_points": feasible,
                    "grid_size": table.grid_size,
                    "grid_best_ms": best,
                    "default_ratio": default.p50_ms / best if default and default.ok else math.nan,
                    "drift": table.drift(),
                    "pass_spread": None if math.isnan(table.pass_spread()) else table.pass_spread(),
                    "trials_to_5pct": reached,
                    "median_trials_to_5pct": med,
                    "median_fraction_of_grid": med / feasible if med is not None else None,
                    "pruned_fraction": statistics.median(pruned),  # proposals not measured (infeasible, repeats)
                    "ratio_at": {b: statistics.median(r[b - 1] / best for r in runs) for b in budgets},
                }
            )
    return {"summary": summary, "traces": traces, "budgets": list(budgets), "seeds": seeds, "within": WITHIN}


def targets(summary: list[dict[str, Any]], budgets: Sequence[int] = BUDGETS) -> dict[str, dict[str, Any]]:
    """Per sampler: the median over problems of trials-to-5% / grid points (target <= 0.10), and at each budget
    the geometric mean over problems of its median best/grid-best ratio next to random search's."""
    by_sampler: dict[str, list[dict[str, Any]]] = {}
    for row in summary:
        by_sampler.setdefault(row["sampler"], []).append(row)
    out: dict[str, dict[str, Any]] = {}
    rand = {r["problem"]: r for r in by_sampler.get("random", [])}
    for sampler, rows in by_sampler.items():
        fractions = [r["median_fraction_of_grid"] for r in rows]
        med = _median_or_none([None if f is None else f for f in fractions])
        entry: dict[str, Any] = {"median_fraction_of_grid": med, "meets_10pct": med is not None and med <= 0.10}
        for b in budgets:
            mine = _geomean([r["ratio_at"][b] for r in rows])
            entry[f"geomean_ratio@{b}"] = mine
            if rand:
                theirs = _geomean([rand[r["problem"]]["ratio_at"][b] for r in rows])
                entry[f"random_geomean_ratio@{b}"] = theirs
                entry[f"problems_better_than_random@{b}"] = sum(
                    r["ratio_at"][b] < rand[r["problem"]]["ratio_at"][b] for r in rows
                )
                entry[f"problems_worse_than_random@{b}"] = sum(
                    r["ratio_at"][b] > rand[r["problem"]]["ratio_at"][b] for r in rows
                )
        out[sampler] = entry
    return out


def _geomean(values: Sequence[float]) -> float:
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    if len(finite) < len(values):
        return math.inf
    return math.exp(sum(math.log(v) for v in finite) / len(finite)) if finite else math.nan
