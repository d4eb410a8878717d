"""Search-efficiency study: how many trials each of the tuner's samplers needs on the CPU schedule space.

Data flow:
  1. measure_grid(problem)  every feasible point of the op's SearchSpace (schedules/cpu.py) goes through the
     tuner's own trial path: a Task to the isolated worker (autotune/worker.py -> evaluate.py: build, verify
     against the reference on fresh inputs and edge cases, time p20/p50/p80 on rotating inputs), `passes`
     times, each pass in its own seeded random order; a point's value is its fastest pass (contention only
     slows a kernel down). The default point is re-measured every `control_every` points ("control" rows) so
     the table says how much the machine drifted. -> GridTable; one CSV per problem, appended as it goes.
  2. simulate(table, sampler, trials, seed)  an Optuna study with the tuner's sampler (search.make_sampler),
     the tuner's parameter encoding (search.suggest) and its pruning of infeasible points, whose objective is
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

import csv
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetune.model.config import MoEConfig
from moetune.schedules.space import Point, SearchSpace

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


@dataclass(frozen=True)
class StudyProblem:
    preset: str
    shrink: int
    op: str  # program op, "experts.gemm1" | "experts.gemm2"
    m: int  # M bucket (tokens)
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str) -> StudyProblem:
        try:
            model, op, m = text.split(":")
            preset, _, shrink = model.partition("/")
            problem = cls(preset, int(shrink or 1), f"experts.{op}" if "." not in op else op, int(m))
            problem.problem()  # validates the preset, op and M
            return problem
        except (ValueError, KeyError) as exc:
            msg = f"a study problem looks like PRESET[/SHRINK]:gemm1|gemm2:M, got {text!r} ({exc})"
            raise ValueError(msg) from None

    @property
    def name(self) -> str:
        shrink = f"/{self.shrink}" if self.shrink > 1 else ""
        return f"{self.preset}{shrink}:{self.op.split('.')[-1]}:{self.m}"

    @property
    def slug(self) -> str:
        return self.name.replace("/", "_s").replace(":", "_")

    def config(self) -> MoEConfig:
        return MoEConfig.preset(self.preset, dtype=self.dtype).shrunk(self.shrink)

    def problem(self):
        from moetune.ir.program import lower

        return lower(self.config(), self.m).op(self.op)


@dataclass
class GridPoint:
    point: Point
    ok: bool
    p50_ms: float  # in a loaded table: the minimum over the passes that measured it
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    error: str = ""
    seconds: float = 0.0
    passes: list[float] = field(default_factory=list)  # p50 of each pass, in pass order


@dataclass
class GridTable:
    """The measured objective of one problem: every feasible point of its space (plus drift controls)."""

    name: str
    space: SearchSpace
    points: list[GridPoint]
    default: Point = field(default_factory=dict)
    controls: list[float] = field(default_factory=list)  # p50 of the default point, re-measured in order
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self._index = {_key(p.point): p for p in self.points}

    def lookup(self, point: Point) -> GridPoint | None:
        return self._index.get(_key(point))

    @property
    def best(self) -> GridPoint:
        return min((p for p in self.points if p.ok), key=lambda p: p.p50_ms)

    @property
    def grid_size(self) -> int:
        """Points of the full product (feasible or not): what a sampler draws from."""
        return math.prod(len(p.choices) for p in self.space.params)

    def pass_spread(self) -> float:
        """Median over points of max/min of their passes' p50 (1.0 = the passes agree; nan: a single pass)."""
        spreads = [max(p.passes) / min(p.passes) for p in self.points if p.ok and len(p.passes) > 1]
        return statistics.median(spreads) if spreads else math.nan

    def drift(self) -> float:
        """max / min of the control measurements (1.0 = no drift seen)."""
        good = [c for c in self.controls if c > 0]
        return max(good) / min(good) if len(good) > 1 else 1.0


def _key(point: Point) -> str:
    return json.dumps(point, sort_keys=True)


# ---- 1. the measured grid -----------------------------------------------------------------------------------------
def measure_grid(
    problem: StudyProblem,
    path: Path,
    meta: dict[str, Any],
    passes: int = 2,
    target: str = "cpu",
    repeat: int = 10,
    control_every: int = 20,
    timeout: float = 120.0,
    on_point: Callable[[int, int, GridPoint], None] | None = None,
) -> GridTable:
    """Build, verify and time every feasible point of `problem`'s space through the tuner's worker, `passes`
    times, each pass in its own seeded random order (so the machine's drift is not aligned with any parameter).

    Each measurement is appended to the CSV at `path` at once, so a killed run resumes where it stopped."""
    import random

    from moetune.autotune.worker import Task, Worker
    from moetune.kernels.registry import backend_info
    from moetune.kernels.target import resolve_target

    tgt = resolve_target(target)
    prob = problem.problem()
    space = backend_info("tvm").space(prob, tgt)
    default = backend_info("tvm").default(prob, tgt)
    done = _measured(path)
    todo = []
    for index in range(1, passes + 1):
        order = list(space.points())
        random.Random(index).shuffle(order)
        todo += [(index, p) for p in order if (index, _key(p)) not in done]
    cfg = problem.config().to_dict()
    worker = Worker()

    def run(point: Point) -> GridPoint:
        res = worker.run(Task(cfg, problem.m, problem.op, "tvm", point, target=tgt.name, repeat=repeat), timeout)
        return GridPoint(point, res.ok, res.p50_ms, res.p20_ms, res.p80_ms, res.error or "", res.seconds)

    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or not path.stat().st_size
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*GRID_FIELDS, *meta, "timestamp"])
        if new:
            writer.writeheader()

        def write(kind: str, pass_: int, p: GridPoint) -> None:
            row = {**_grid_row(problem.name, kind, p), "pass": pass_, **meta, "timestamp": time.strftime("%FT%T")}
            writer.writerow(row)
            f.flush()

        try:
            for index, (pass_, point) in enumerate(todo):
                if index % control_every == 0:
                    write("control", pass_, run(default))
                measured = run(point)
                write("grid", pass_, measured)
                if on_point:
                    on_point(len(done) + index + 1, len(done) + len(todo), measured)
            if todo:
                write("control", todo[-1][0], run(default))
        finally:
            worker.close()
    return load_grid(path, space, default)


def _measured(path: Path) -> set[tuple[int, str]]:
    if not path.exists():
        return set()
    with path.open(newline="") as f:
        return {(int(r.get("pass") or 1), r["point"]) for r in csv.DictReader(f) if r["kind"] == "grid"}


GRID_FIELDS = ("problem", "kind", "point", "ok", "p20_ms", "p50_ms", "p80_ms", "seconds", "error", "pass")


def _grid_row(name: str, kind: str, p: GridPoint) -> dict[str, Any]:
    return {
        "problem": name,
        "kind": kind,
        "point": _key(p.point),
        "ok": int(p.ok),
        "p20_ms": round(p.p20_ms, 5),
        "p50_ms": round(p.p50_ms, 5),
        "p80_ms": round(p.p80_ms, 5),
        "seconds": round(p.seconds, 3),
        "error": p.error,
        "pass": 1,
    }


def save_grid(table: GridTable, path: Path, meta: dict[str, Any]) -> None:
    """A whole table as one CSV (the format measure_grid appends to): grid rows, then the controls."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*GRID_FIELDS, *meta])
        writer.writeheader()
        for p in table.points:
            writer.writerow({**_grid_row(table.name, "grid", p), **meta})
        for c in table.controls:
            writer.writerow({**_grid_row(table.name, "control", GridPoint(table.default, True, c)), **meta})


def load_grid(path: Path, space: SearchSpace | None = None, default: Point | None = None) -> GridTable:
    """A saved grid; the space is rebuilt from the problem name (or given, for tables not made from a preset)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows and space is None:
        raise ValueError(f"{path}: empty grid table")
    name = rows[0]["problem"] if rows else path.stem
    if space is None:
        from moetune.kernels.registry import backend_info
        from moetune.kernels.target import resolve_target

        tgt, prob = resolve_target(rows[0].get("target", "cpu")), StudyProblem.parse(name).problem()
        space, default = backend_info("tvm").space(prob, tgt), backend_info("tvm").default(prob, tgt)
    points: dict[str, GridPoint] = {}
    controls = []
    for r in rows:
        if r["kind"] != "grid":
            controls.append(float(r["p50_ms"]))
            continue
        p50, ok = float(r["p50_ms"]), r["ok"] == "1"
        p = points.setdefault(r["point"], GridPoint(json.loads(r["point"]), ok, math.inf))
        p.seconds += float(r["seconds"])
        if not ok:  # a point that failed in any pass is a failed point
            p.ok, p.error, p.p50_ms = False, r["error"], math.nan
        p.passes.append(p50)
        if p.ok and p50 < p.p50_ms:  # the least disturbed pass: contention only ever slows a kernel down
            p.p50_ms, p.p20_ms, p.p80_ms = p50, float(r["p20_ms"]), float(r["p80_ms"])
    seconds = sum(p.seconds for p in points.values())
    points = list(points.values())
    return GridTable(name, space, points, default or {}, controls, seconds)


# ---- 2. samplers against the measured table ---------------------------------------------------------------------
def simulate(table: GridTable, sampler: str, trials: int, seed: int, states: list[str] | None = None) -> list[float]:
    """Best p50 found after each measured trial (inf until the first completed one) of one seeded Optuna study
    run by the tuner's own `search.explore` on the tuner's narrowed space, with a table lookup for the measurement.

    The trace has `trials` entries; a study that stopped early (every feasible point measured, or the proposal
    cap) keeps its final best. `states`, if given, receives each proposal's fate: COMPLETE / FAIL (measured),
    PRUNED (infeasible) or REPEAT (an already measured point)."""
    import optuna

    from moetune.autotune.search import TrialFailed, explore, make_sampler, measured

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
