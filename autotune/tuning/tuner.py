"""`tune(cfg, target, m, trials, db)`: tune every op of a layer's program for each token count.

For each M in `m` the config is lowered (ir.lower) and each op gets its own study (autotune/tuning/search.py); the
time budget, if any, is shared out over the studies still to run. Problems that repeat across M buckets are
separate studies (their best tiles differ with the row count), problems that repeat within one program
(none today) would be tuned once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from moetune.autotune.bench.roofline import layer_bytes
from moetune.autotune.measure import available_bytes
from moetune.autotune.tuning.samplers import SAMPLERS
from moetune.autotune.tuning.search import OpOutcome, StudyContext, tune_op
from moetune.autotune.tuning.storage import open_storage
from moetune.autotune.tuning.worker import Worker
from moetune.ir.program import lower, m_bucket
from moetune.ir.target import resolve_target
from moetune.kernels.cache import writable_cache_root
from moetune.kernels.db import KernelDB, open_db
from moetune.model.config import MoEConfig


@dataclass
class TuneReport:
    model: str
    target: str
    dtype: str
    m: list[int]
    sampler: str
    outcomes: list[OpOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trials(self) -> int:
        return sum(o.trials for o in self.outcomes if o.status == "tuned")

    def speedup_vs_torch(self) -> float:
        """Geometric mean over the tuned ops of torch p50 / winner p50."""
        values = [o.speedup_vs_torch for o in self.outcomes if not math.isnan(o.speedup_vs_torch)]
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trials"] = self.trials
        out["geomean_speedup_vs_torch"] = self.speedup_vs_torch()
        for o, d in zip(self.outcomes, out["outcomes"], strict=True):
            d["speedup_vs_torch"] = o.speedup_vs_torch
        return out


def _check_memory(cfg: MoEConfig, tokens: int, target_kind: str) -> None:
    """Refuse, before anything is allocated or written, a tune that cannot fit: the worker holds the layer's
    weights and one packed copy, the inputs and the routed intermediates of the largest M (a lower bound; an
    `--m 1000000000` or terabyte-sized `--hf-config` once died in an allocation with a traceback)."""
    if target_kind != "cpu":
        return
    weights = layer_bytes(cfg, 0, cfg.num_experts)  # every expert, router and shared expert (the bench's count)
    h, k = cfg.hidden_size, cfg.top_k
    activations = tokens * (2 * h + k * (cfg.up_factor * cfg.intermediate_size + h)) * 4
    need, free = 2 * weights + activations, available_bytes()
    if free is not None and need > free:
        raise ValueError(
            f"tuning {cfg.name or 'this layer'} at M={tokens} needs at least {need / 2**30:,.1f} GiB of memory; "
            f"{free / 2**30:,.1f} GiB is available (lower --m, or --shrink the layer)"
        )


def tune(
    cfg: MoEConfig,
    target: str = "cpu",
    m: list[int] | tuple[int, ...] = (1, 16, 256),
    trials: int = 32,
    db: KernelDB | str | None = None,
    storage: str | None = None,
    sampler: str = "tpe",
    time_budget: float | None = None,
    patience: int = 12,
    trial_timeout: float = 120.0,
    repeat: int = 10,
    force: bool = False,
    seed: int = 0,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    imports: tuple[str, ...] = (),
    ops: tuple[str, ...] | None = None,
) -> TuneReport:
    """Tune each op of `cfg` on `target` for the token counts `m`; winners go into `db`. -> TuneReport.

    `ops` restricts the run to some program ops (e.g. ("experts.gemm1",)); `imports` names extra modules the
    worker imports before each trial (how tests inject faulty kernels).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    buckets = sorted({m_bucket(v) for v in m})
    tgt = resolve_target(target)
    _check_memory(cfg, buckets[-1], tgt.kind)
    # lowered for the target kind: BM (and so the problem signatures) are what TunedMoE looks up there
    programs = {bucket: lower(cfg, bucket, target_kind=tgt.kind) for bucket in buckets}
    jobs = [(bucket, op) for bucket in buckets for op in programs[bucket] if ops is None or op.name in ops]
    if not jobs:
        names = ", ".join(o.name for o in lower(cfg, 1, target_kind=tgt.kind))
        raise ValueError(f"no op of the program matches {ops}; ops: {names}")
    cache = writable_cache_root()  # before the DB is opened or created: a bad cache dir writes nothing
    studies = open_storage(storage, cache)
    database = db if isinstance(db, KernelDB) else open_db(db)
    worker = Worker()
    ctx = StudyContext(
        cfg=cfg.to_dict(),
        target=tgt,
        worker=worker,
        db=database,
        storage=studies,
        sampler=sampler,
        trial_timeout=trial_timeout,
        repeat=repeat,
        patience=patience,
        seed=seed,
        imports=imports,
        on_event=on_event or (lambda event: None),
    )
    report = TuneReport(cfg.name or "custom", tgt.name, cfg.dtype, buckets, sampler)
    started = time.monotonic()
    try:
        for index, (bucket, op) in enumerate(jobs):
            budget = None
            if time_budget is not None:
                left = time_budget - (time.monotonic() - started)
                budget = max(1.0, left / (len(jobs) - index))
            report.outcomes.append(tune_op(ctx, op.name, op.problem, bucket, trials, budget, force=force))
    finally:
        worker.close()
        if not isinstance(db, KernelDB):
            database.close()
    report.seconds = time.monotonic() - started
    return report
