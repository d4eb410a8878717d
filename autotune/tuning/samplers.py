"""The tuner's samplers and how a schedule point is encoded as Optuna trial parameters.

Parameters with integer choices are sampled as an index into their choices (ordinal, so CMA-ES and GP see a
numeric axis); the others as categoricals. The tuner (autotune/tuning/search.py) and the search study
(autotune/sampler_study/replay.py) both use these, so a replayed study samples exactly as a tuning run does.
"""

from __future__ import annotations

from typing import Any

import optuna

from moetune.schedules.space import Point, SearchSpace

SAMPLERS = ("tpe", "cmaes", "gp", "random", "grid")


def make_sampler(name: str, space: SearchSpace, seed: int = 0) -> optuna.samplers.BaseSampler:
    if name == "tpe":  # constant_liar: parallel workers do not all sample next to the same running trial
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, constant_liar=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=4)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(_grid(space), seed=seed)
    raise ValueError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")


def _ordinal(choices: tuple) -> bool:
    return all(isinstance(c, int) and not isinstance(c, bool) for c in choices)


def _grid(space: SearchSpace) -> dict[str, list]:
    return {p.name: list(range(len(p.choices))) if _ordinal(p.choices) else list(p.choices) for p in space.params}


def suggest(trial: optuna.Trial, space: SearchSpace) -> Point:
    point = {}
    for p in space.params:
        if _ordinal(p.choices):
            point[p.name] = p.choices[trial.suggest_int(p.name, 0, len(p.choices) - 1)]
        else:
            point[p.name] = trial.suggest_categorical(p.name, list(p.choices))
    return point


def encode(space: SearchSpace, point: Point) -> dict[str, Any]:
    """A point as the trial params `suggest` would have produced (for enqueue_trial)."""
    return {p.name: p.choices.index(point[p.name]) if _ordinal(p.choices) else point[p.name] for p in space.params}
