"""The Optuna search: one study per (problem signature, target, M bucket), trials run in an isolated worker.

Per study: the torch backend is measured first (the baseline, kept in the study so a resumed run does not
measure it again), the backend's default point is enqueued as the first trial, then the winners of the
nearest already-tuned shapes from the kernel DB (warm start), then the sampler explores the op's declared
space (schedules/), narrowed to the choices that occur in some feasible point. Infeasible proposals are pruned
before anything is built and a repeat of a measured point is answered from the study: the budget counts
measurements only (`explore`). A trial whose candidate fails to build, crashes, hangs or computes a wrong
result is a FAIL with its reason in the trial's user attrs. The winner (the fastest of the completed trials and
the torch baseline, so never slower than either; on a CPU the baseline only as a fallback, see
TORCH_FALLBACK_ONLY) goes into the kernel DB. Trials live in the Optuna storage as they finish, so a killed run
resumes where it stopped.

Samplers and the encoding of points as trial parameters: autotune/tuning/samplers.py. A candidate clearly slower than
the study's best so far is timed with a few calls only (EARLY_STOP).
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from moetune.autotune.tuning.samplers import encode, make_sampler, suggest
from moetune.autotune.tuning.storage import create_study, fail_orphans, settle_study
from moetune.autotune.tuning.worker import Task, Worker
from moetune.ir.program import Problem
from moetune.ir.target import Target
from moetune.kernels.db import KernelDB, KernelKey, KernelRecord, current_versions, is_current, kernel_key
from moetune.kernels.registry import backend_info, backends_for, missing_packages
from moetune.schedules.space import Point, SearchSpace

# A candidate whose first timed calls have a median over EARLY_STOP x the study's best so far stops there (3 calls
# instead of `repeat`): a full-size Mixtral T=256 gemm1 call takes 0.77 s, and most candidates are that slow.
EARLY_STOP = 1.5
# A study stops after this many proposals per budgeted trial even if too few were measurable (pruned or repeats).
PROPOSALS_PER_TRIAL = 10
STALL = 3  # unmeasured proposals in a row after which the next trial is a random unmeasured feasible point
# Target kinds where the torch baseline is kept only as a fallback (no compiled candidate completed), never as
# a winner by its isolated timing. On a CPU, torch's OpenMP pool and TVM's thread pool share the cores: an op
# that switches pools inside a layer pays for the other pool's spinning threads, which an op timed alone never
# sees. Measured on the 2-core Zen3 (olmoe-1b-7b/4 fp32, whole layer, all other ops on TVM): the torch route
# (0.085 ms alone, 10% faster than TVM's) made the layer 10.6 -> 37.3 ms at T=16 and 35.9 -> 56.1 ms at T=256.
TORCH_FALLBACK_ONLY = ("cpu",)
TUNED_BACKENDS = {"cpu": ("tvm",), "cuda": ("triton", "tvm_cuda")}  # spaces searched (torch: always, the baseline)
optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's reason is in the summary, not a traceback


class TrialFailed(Exception):
    """A candidate that did not build, crashed, hung or computed a wrong result."""


def _key(point: Point | None) -> str:
    return json.dumps(point, sort_keys=True)


@dataclass
class OpOutcome:
    name: str  # program op name
    problem: str  # signature
    m_bucket: int
    status: str  # "tuned" | "cached"
    backend: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    p50_ms: float = math.nan
    torch_p50_ms: float = math.nan
    default_p50_ms: float = math.nan
    trials: int = 0  # measured (built and timed)
    failed: int = 0
    pruned: int = 0  # infeasible proposals (not built)
    repeats: int = 0  # proposals of an already measured point (answered from the study)
    seconds: float = 0.0
    stale: int = 0  # stale DB records for this key that were reported and re-tuned
    cut_short: bool = False  # the time budget ended the study before its trial budget
    failures: list[str] = field(default_factory=list)

    @property
    def speedup_vs_torch(self) -> float:
        return self.torch_p50_ms / self.p50_ms if self.p50_ms > 0 else math.nan


@dataclass
class StudyContext:
    cfg: dict[str, Any]
    target: Target
    worker: Worker
    db: KernelDB
    storage: Any
    sampler: str = "tpe"
    trial_timeout: float = 120.0
    repeat: int = 10
    patience: int = 12
    seed: int = 0
    imports: tuple[str, ...] = ()
    on_event: Callable[[dict[str, Any]], None] = lambda event: None


def tuned_backends(op: str, target: Target) -> list[str]:
    """TUNED_BACKENDS that implement the op on the target and are installed (skipped_backends: the others)."""
    installed = tuple(b for b in TUNED_BACKENDS.get(target.kind, ()) if not missing_packages(b))
    return backends_for(op, target.kind, installed)


def skipped_backends(target: Target) -> dict[str, list[str]]:
    """The backends a tune on this target leaves out for want of packages: {backend: missing packages}."""
    return {b: missing_packages(b) for b in TUNED_BACKENDS.get(target.kind, ()) if missing_packages(b)}


def _study_name(target: Target, problem: Problem, m_bucket: int, backend: str = "tvm") -> str:
    """One study per backend, named with that backend's kernel sources. `enc=2`: parameters index the narrowed
    choices (a study with the older encoding of the full choices is not resumed into this one)."""
    name = f"moetune|{target.name}|{problem.signature}|M{m_bucket}|src={current_versions(backend)['source']}|enc=2"
    return name if backend == "tvm" else f"{name}|{backend}"


def _budget_run(ctx: StudyContext, problem: Problem, m: int, record: KernelRecord) -> int:
    """The largest trial budget this key's studies ran with (else the winner's trial count): a re-run that
    asks for more continues the studies (Optuna resumes them from the storage) instead of answering cached."""
    budgets = [record.trials]
    for backend in tuned_backends(problem.op, ctx.target):
        name = _study_name(ctx.target, problem, m, backend)
        try:
            budgets.append(int(optuna.load_study(study_name=name, storage=ctx.storage).user_attrs.get("budget", 0)))
        except KeyError:  # no such study in this storage (another storage, or deleted): the record decides
            continue
    return max(budgets)


def _measure(ctx: StudyContext, m: int, op_name: str, backend: str, point: Point, cutoff_ms: float | None = None):
    task = Task(
        cfg=ctx.cfg,
        m_tokens=m,
        op=op_name,
        backend=backend,
        params=point,
        target=ctx.target.name,
        repeat=ctx.repeat,
        cutoff_ms=cutoff_ms,
        seed=ctx.seed,
        imports=ctx.imports,
    )
    return ctx.worker.run(task, ctx.trial_timeout)


def _warm_start(ctx: StudyContext, problem: Problem, m: int, space: SearchSpace, backend: str = "tvm") -> list[Point]:
    """Feasible winners of the backend for the same op kind, nearest shape first (same signature, then M)."""
    found = []
    for r in ctx.db.records(target=ctx.target.name, dtype=problem.dtype):
        if r.backend == backend and is_current(r) and r.key.op.split("[")[0] == problem.op:
            distance = (r.key.op != problem.signature, abs(math.log2(r.key.m_bucket) - math.log2(m)))
            found.append((distance, r.config))
    points = []
    for _, config in sorted(found, key=lambda item: item[0]):
        if space.is_feasible(config) and config not in points:
            points.append(config)
    return points[:3]


def tune_op(
    ctx: StudyContext,
    op_name: str,
    problem: Problem,
    m: int,
    trials: int,
    time_budget: float | None,
    force: bool = False,
) -> OpOutcome:
    key = kernel_key(ctx.target, problem, m)
    found = ctx.db.lookup(key)
    outcome = OpOutcome(op_name, problem.signature, m, "tuned", stale=len(found.stale))
    if found.kind == "exact" and not force and trials <= _budget_run(ctx, problem, m, found.record):
        r = found.record
        outcome.status, outcome.backend, outcome.config = "cached", r.backend, r.config
        outcome.p50_ms, outcome.torch_p50_ms, outcome.trials = r.p50_ms, r.baseline_p50_ms, r.trials
        ctx.on_event({"kind": "study_end", "outcome": outcome})
        return outcome
    started = time.monotonic()
    backends = tuned_backends(problem.op, ctx.target)
    ctx.on_event({"kind": "study_start", "op": op_name, "problem": problem.signature, "m": m})
    studies = []
    baseline = None
    for backend in backends:
        space = backend_info(backend).space(problem, ctx.target).narrowed()
        sampler = make_sampler(ctx.sampler, space, ctx.seed)
        study = create_study(ctx.storage, _study_name(ctx.target, problem, m, backend), sampler)
        fail_orphans(study)
        baseline = baseline or study.user_attrs.get("torch")
        studies.append((backend, space, study))
    if baseline is None:
        res = _measure(ctx, m, op_name, "torch", {})
        if not res.ok:
            raise RuntimeError(f"the torch baseline of {op_name} failed: {res.error}")
        baseline = {"p20_ms": res.p20_ms, "p50_ms": res.p50_ms, "p80_ms": res.p80_ms}
    for _, _, study in studies:
        if study.user_attrs.get("torch") is None:
            study.set_user_attr("torch", baseline)
    outcome.torch_p50_ms = baseline["p50_ms"]
    for backend, space, study in studies:
        share = time_budget / len(studies) if time_budget is not None else None  # the budget is split
        _run_study(ctx, op_name, problem, m, trials, share, backend, space, study)
    outcome = _finish(ctx, studies, outcome, key, baseline, started)
    spent = time.monotonic() - started
    outcome.cut_short = time_budget is not None and spent >= 0.95 * time_budget and outcome.trials < trials
    return outcome


def _run_study(ctx, op_name, problem, m, trials, time_budget, backend, space, study) -> None:
    """Enqueue the backend's default point and warm starts, then let the sampler explore its space."""
    if not study.trials:
        default = backend_info(backend).default(problem, ctx.target)
        study.enqueue_trial(encode(space, default), user_attrs={"origin": "default"})
        for point in _warm_start(ctx, problem, m, space, backend):
            study.enqueue_trial(encode(space, point), user_attrs={"origin": "warm-start"}, skip_if_exists=True)

    def measure(trial: optuna.Trial, point: Point) -> float:
        trial.set_user_attr("backend", backend)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it (many workers)
        done = [t.value for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
        cutoff = EARLY_STOP * min(done) if done else None  # clearly slower than the best: timed briefly
        res = _measure(ctx, m, op_name, backend, point, cutoff)
        if not res.ok:
            trial.set_user_attr("error", res.error)
            raise TrialFailed(res.error)
        trial.set_user_attr("p20_ms", res.p20_ms)
        trial.set_user_attr("p80_ms", res.p80_ms)
        return res.p50_ms

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ctx.on_event(
            {
                "kind": "trial",
                "op": op_name,
                "m": m,
                "backend": backend,
                "state": trial.state.name,
                "value": trial.value,
                "error": trial.user_attrs.get("error"),
                "measured": bool(measured([trial])),  # False: pruned, or a repeat answered from the study
                "study": study,
            }
        )

    explore(
        study,
        space,
        measure,
        trials,
        patience=ctx.patience,
        timeout=time_budget,
        on_trial=on_trial,
        settle=isinstance(ctx.storage, optuna.storages.RDBStorage),
    )
    study.set_user_attr("budget", max(trials, int(study.user_attrs.get("budget", 0))))


def measured(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that built and timed a candidate (complete or failed), in order: what a budget counts."""
    states = optuna.trial.TrialState
    return [t for t in trials if t.state in (states.COMPLETE, states.FAIL) and "repeat_of" not in t.user_attrs]


def explore(
    study: optuna.Study,
    space: SearchSpace,
    measure: Callable[[optuna.Trial, Point], float],
    trials: int,
    *,
    patience: int | None = None,
    timeout: float | None = None,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    settle: bool = False,
) -> None:
    """Let the study's sampler propose points of `space` until `trials` of them have been measured.

    Only measurements count against the budget. An infeasible proposal is pruned (nothing is built; TPE ranks it
    below every measured point), and a repeat of a point the study already measured gets that trial's result
    back; neither is measured again. The study also stops once every feasible point is measured, after
    `patience` measurements without a new best, after PROPOSALS_PER_TRIAL x `trials` proposals, or after `timeout`
    seconds. A sampler whose last STALL proposals were all infeasible or repeats (GP's deterministic acquisition
    does this) is given a random unmeasured feasible point as its next trial, so it cannot stall the search.
    `measure(trial, point)` returns the p50 (ms) or raises TrialFailed. The budget holds across all the workers
    sharing the study."""
    budget = 1 if not space.params else trials
    feasible = list(space.points())
    states = optuna.trial.TrialState
    # patience counts from where this run started: a resumed study (a larger budget) gets `patience` fresh tries
    resumed_at = len(measured(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL))))

    def objective(trial: optuna.Trial) -> float:
        point = suggest(trial, space)
        violations = space.violations(point)
        if violations:
            trial.set_user_attr("pruned", "; ".join(violations))
            raise optuna.TrialPruned()
        trial.set_user_attr("config", point)
        done = trial.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL))
        earlier = next((t for t in measured(done) if t.user_attrs.get("config") == point), None)
        if earlier is None:
            return measure(trial, point)
        trial.set_user_attr("repeat_of", earlier.number)
        for key in ("backend", "p20_ms", "p80_ms", "error"):
            if key in earlier.user_attrs:
                trial.set_user_attr(key, earlier.user_attrs[key])
        if earlier.state == states.FAIL:
            raise TrialFailed(earlier.user_attrs.get("error", "failed before"))
        return earlier.value

    def finished(study: optuna.Study) -> bool:
        proposals = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL, states.PRUNED))
        spent = measured(proposals)
        distinct = {_key(t.user_attrs.get("config")) for t in spent}
        if len(spent) >= budget or len(distinct) >= len(feasible) or len(proposals) >= budget * PROPOSALS_PER_TRIAL:
            return True
        complete = [i for i, t in enumerate(spent) if t.state == states.COMPLETE]
        if patience is None or not complete:
            return False
        best = max(min(complete, key=lambda i: spent[i].value), resumed_at - 1)
        return len(spent) - 1 - best >= patience

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial:
            on_trial(study, trial)
        if finished(study):
            study.stop()
            return
        recent = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL, states.PRUNED))[-STALL:]
        if len(recent) == STALL and not measured(recent) and not study.get_trials(states=(states.WAITING,)):
            known = {_key(t.user_attrs.get("config")) for t in measured(study.get_trials(deepcopy=False))}
            fresh = [p for p in feasible if _key(p) not in known]
            if fresh:  # the sampler is stuck on infeasible or known points: give it a new one to learn from
                point = random.Random(trial.number).choice(fresh)
                study.enqueue_trial(encode(space, point), user_attrs={"origin": "unstick"})

    if not finished(study):
        study.optimize(
            objective,
            n_trials=budget * PROPOSALS_PER_TRIAL,
            timeout=timeout,
            callbacks=[callback],
            catch=(TrialFailed,),
        )
    if settle:
        settle_study(study, objective, callback, (TrialFailed,))


def _finish(ctx, studies, outcome: OpOutcome, key: KernelKey, baseline, started: float) -> OpOutcome:
    """The winner over every backend's completed trials and the torch baseline; into the DB."""
    states = optuna.trial.TrialState
    complete, default = [], []
    outcome.trials = outcome.failed = outcome.pruned = outcome.repeats = 0
    outcome.failures = []
    for backend, _, study in studies:
        trials = study.trials
        done = [(backend, t) for t in trials if t.state == states.COMPLETE]
        complete += done
        default += [bt for bt in done if bt[1].user_attrs.get("origin") == "default"]
        spent = measured(trials)
        outcome.trials += len(spent)
        outcome.failed += sum(t.state == states.FAIL for t in spent)
        outcome.pruned += sum(t.state == states.PRUNED for t in trials)
        outcome.repeats += sum("repeat_of" in t.user_attrs for t in trials)
        outcome.failures += [t.user_attrs.get("error", "") for t in spent if t.state == states.FAIL]
    outcome.default_p50_ms = default[0][1].value if default else math.nan  # the preferred backend's default
    best = min(complete, key=lambda bt: bt[1].value) if complete else None
    torch_may_win = ctx.target.kind not in TORCH_FALLBACK_ONLY
    if best is not None and (best[1].value < baseline["p50_ms"] or not torch_may_win):
        backend, trial = best
        outcome.backend, outcome.config, outcome.p50_ms = backend, trial.user_attrs["config"], trial.value
        p20, p80 = trial.user_attrs["p20_ms"], trial.user_attrs["p80_ms"]
    else:
        outcome.backend, outcome.config, outcome.p50_ms = "torch", {}, baseline["p50_ms"]
        p20, p80 = baseline["p20_ms"], baseline["p80_ms"]
    outcome.seconds = time.monotonic() - started
    ctx.db.put(
        KernelRecord(
            key=key,
            versions=current_versions(outcome.backend),  # only what decides this backend's kernels
            backend=outcome.backend,
            config=outcome.config,
            p20_ms=p20,
            p50_ms=outcome.p50_ms,
            p80_ms=p80,
            baseline_p50_ms=baseline["p50_ms"],
            trials=outcome.trials,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
    )
    ctx.on_event({"kind": "study_end", "outcome": outcome})
    return outcome
