"""Timing rules on the CPU (autotune/measure.py) and the tuner's early stop of clearly slower candidates."""

from __future__ import annotations

import time

import optuna

from moetune.autotune.measure import MIN_SAMPLES, measure, measure_interleaved
from moetune.autotune.tuning.search import EARLY_STOP, StudyContext, tune_op
from moetune.autotune.tuning.trial import Result
from moetune.ir.program import lower
from moetune.ir.target import resolve_target
from moetune.kernels.db import MemoryKernelDB
from moetune.model import MoEConfig


def _sleeper(seconds: float, calls: list):
    def fn(x):
        calls.append(x)
        time.sleep(seconds)

    return fn


def test_cutoff_stops_a_slow_call_after_three_samples():
    calls: list = []
    slow = measure(_sleeper(0.01, calls), [0, 1, 2], warmup=1, repeat=10, cutoff_ms=5.0)
    assert slow.n == MIN_SAMPLES and slow.p50_ms > 5.0 and slow.clock == "wall"
    assert calls == [0, 0, 1, 2]  # one warm-up, then the rotation
    fast = measure(_sleeper(0.001, []), [0], warmup=1, repeat=10, cutoff_ms=50.0)
    assert fast.n == 10 and fast.p20_ms <= fast.p50_ms <= fast.p80_ms


def test_one_slow_warm_up_call_is_enough():
    calls: list = []
    measure(_sleeper(0.3, calls), [0, 1], warmup=3, repeat=3)
    assert len(calls) == 1 + 3


def test_interleaved_timing_keeps_the_ratio_on_a_drifting_host():
    """Two callables, B twice A's work, on a host that slows 4x halfway: timed one after the other, A's samples
    would all be fast and B's all slow (ratio 8); interleaved call by call, both see the drift (ratio 2)."""
    calls: list = []
    slow = [1.0]

    def work(name, units):
        def fn(x):
            calls.append((name, x))
            time.sleep(0.002 * units * slow[0])
            if len(calls) == 12:
                slow[0] = 4.0

        return fn

    got = measure_interleaved({"a": work("a", 1), "b": work("b", 2)}, [0, 1, 2], warmup=1, repeat=10)
    assert got["a"].n == got["b"].n == 10 and 1.5 < got["b"].p50_ms / got["a"].p50_ms < 2.7
    assert calls[:2] == [("a", 0), ("b", 0)]  # warm-up, then rounds in a rotating order on the round's input
    assert calls[2:6] == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]


class _FakeWorker:
    """Times a point as 1 ms x its nt (so the default is not the best) and records each task's cutoff."""

    def __init__(self):
        self.tasks = []

    def run(self, task, timeout):
        self.tasks.append(task)
        ms = float(task.params.get("nt", 64)) / 8 if task.backend != "torch" else 100.0
        return Result(True, None, ms, ms, ms, 0.0, 0.01)


def test_the_tuner_passes_a_multiple_of_the_study_best_as_cutoff(tmp_path):
    cfg = MoEConfig(hidden_size=64, intermediate_size=48, num_experts=8, top_k=2)
    target = resolve_target("cpu")
    problem = lower(cfg, 8).op("experts.gemm1")
    worker = _FakeWorker()
    storage = optuna.storages.InMemoryStorage()
    ctx = StudyContext(cfg.to_dict(), target, worker, MemoryKernelDB(), storage, sampler="random", seed=3)
    outcome = tune_op(ctx, "experts.gemm1", problem, 8, trials=6, time_budget=None)
    tvm = [t for t in worker.tasks if t.backend == "tvm"]
    assert worker.tasks[0].backend == "torch" and worker.tasks[0].cutoff_ms is None
    assert tvm[0].cutoff_ms is None  # nothing measured yet in the study
    best = float("inf")
    for task in tvm:
        if task is not tvm[0]:
            assert task.cutoff_ms == EARLY_STOP * best, (task.params, task.cutoff_ms, best)
        best = min(best, task.params["nt"] / 8)
    assert outcome.p50_ms == best


def test_a_slow_check_call_at_the_studys_t_is_the_warm_up(monkeypatch):
    """evaluate(): 3 checks (T=1, one expert, the study's T); when the last takes over WARMUP_ENOUGH_S the timing
    starts at once (no warm-up), and stops after the task's max_seconds (at least 3 calls)."""
    from moetune.autotune.tuning import evaluate as ev
    from moetune.autotune.tuning.trial import Task
    from moetune.kernels.registry import ImplInfo, get_impl

    calls = []

    def slow_gemm1(problem, config, target, *args):
        calls.append(args[0].shape[0])
        time.sleep(0.3)
        return get_impl("gemm1", "torch").fn(problem, config, target, *args)

    def patched(op, backend):
        return ImplInfo(op, "slow", slow_gemm1, ("cpu",)) if backend == "slow" else get_impl(op, backend)

    monkeypatch.setattr(ev, "get_impl", patched)
    cfg = MoEConfig(hidden_size=32, intermediate_size=16, num_experts=4, top_k=2)
    task = Task(cfg.to_dict(), 8, "experts.gemm1", "slow", {}, repeat=10, warmup=2, max_seconds=0.5)
    result = ev.evaluate(task)  # timing stops at 3 calls: 0.9 s is over the task's 0.5 s
    assert result.ok, result.error
    assert calls == [1, 4, 8, 8, 8, 8]
