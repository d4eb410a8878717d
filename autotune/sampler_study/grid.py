"""The measured grid of the sampler study (autotune/sampler_study/replay.py): study problems, and every feasible
point of a problem's CPU schedule space measured through the tuner's own trial path.

Data flow:
  measure_grid(problem)  every feasible point of the op's SearchSpace (schedules/tvm_cpu.py) goes through the tuner's
     own trial path: a Task to the isolated worker (autotune/tuning/worker.py -> evaluate.py: build, verify against the
     reference on fresh inputs and edge cases, time p20/p50/p80 on rotating inputs), `passes` times, each pass in
     its own seeded random order; a point's value is its fastest pass (contention only slows a kernel down). The
     default point is re-measured every `control_every` points ("control" rows) so the table says how much the
     machine drifted. -> GridTable; one CSV per problem, appended as it goes (save_grid / load_grid).

Problems are named "PRESET[/SHRINK]:OP:M", e.g. "qwen3-30b-a3b/4:gemm1:256" (H and I divided by SHRINK so a
whole grid is measurable in minutes on a small CPU).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetune.model.config import MoEConfig
from moetune.schedules.space import Point, SearchSpace


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

    from moetune.autotune.tuning.worker import Task, Worker
    from moetune.ir.target import resolve_target
    from moetune.kernels.registry import backend_info

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
        from moetune.ir.target import resolve_target
        from moetune.kernels.registry import backend_info

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
