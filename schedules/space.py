"""Search spaces as data: named parameters with their choices, and named constraints between them.

The tuner reads a SearchSpace (to sample points, to prune infeasible ones before building); a schedule
template applies one point. A point is a plain dict {param name: value}.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Point = dict[str, Any]


@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple[Any, ...]
    doc: str = ""


@dataclass(frozen=True)
class Constraint:
    name: str
    doc: str
    check: Callable[[Point], bool]


@dataclass(frozen=True)
class SearchSpace:
    op: str
    params: tuple[Param, ...] = ()
    constraints: tuple[Constraint, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def violations(self, point: Point) -> list[str]:
        """Why a point is infeasible (empty list: feasible)."""
        problems = []
        for p in self.params:
            if p.name not in point:
                problems.append(f"missing parameter {p.name}")
            elif point[p.name] not in p.choices:
                problems.append(f"{p.name}={point[p.name]!r} not in {p.choices}")
        extra = sorted(set(point) - set(self.names))
        if extra:
            problems.append(f"unknown parameter(s) {', '.join(extra)}")
        if not problems:
            problems += [f"{c.name}: {c.doc}" for c in self.constraints if not c.check(point)]
        return problems

    def is_feasible(self, point: Point) -> bool:
        return not self.violations(point)

    def grid(self) -> Iterator[Point]:
        """Every point of the full grid, feasible or not."""
        for values in itertools.product(*(p.choices for p in self.params)):
            yield dict(zip(self.names, values, strict=True))

    def points(self) -> Iterator[Point]:
        """Every feasible point."""
        return (pt for pt in self.grid() if self.is_feasible(pt))

    def narrowed(self, limit: int = 200_000) -> SearchSpace:
        """The same space with each parameter's choices cut to those that occur in some feasible point.

        What a sampler draws from: a choice no feasible point uses (mt not dividing BM, a panel wider than the
        output) can only ever produce pruned proposals. The feasible points, and the constraints, are unchanged.
        Spaces whose full grid exceeds `limit` points are returned as they are (too large to enumerate)."""
        if not self.params or math.prod(len(p.choices) for p in self.params) > limit:
            return self
        used: dict[str, set] = {p.name: set() for p in self.params}
        for point in self.points():
            for name, value in point.items():
                used[name].add(value)
        if not any(used.values()):
            return self  # nothing is feasible: keep the full choices so the violations can be reported
        params = tuple(Param(p.name, tuple(c for c in p.choices if c in used[p.name]), p.doc) for p in self.params)
        return SearchSpace(self.op, params, self.constraints)

    def describe(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "params": {p.name: {"choices": list(p.choices), "doc": p.doc} for p in self.params},
            "constraints": {c.name: c.doc for c in self.constraints},
        }
