"""`moetune tune --workers N`: N local tuning processes on the same studies, one combined progress view.

Each worker is the same `moetune tune` command (with --events: progress as JSON lines on stdout); they share
the Optuna storage (so they split the trials of each study between them) and the kernel DB (whose puts are
better-wins, so racing workers leave one row per key). On a multi-GPU host worker i sees GPU i
(CUDA_VISIBLE_DEVICES); on CPU each worker is pinned to its share of the cores. The summary at the end is read
from the kernel DB: it holds the winners whatever worker found them.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from typing import Any

from rich.live import Live
from rich.table import Table

from moetune.autotune.cli.common import console, fail, print_json


def child_args(**opts: Any) -> list[str]:
    args: list[str] = []
    for name, value in opts.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        args += [flag] if value is True else [flag, str(value)]
    return args


def _cores_for(index: int, workers: int) -> set[int]:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    mine = [c for j, c in enumerate(cores) if j % workers == index]
    return set(mine or [cores[index % len(cores)]])


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def run_workers(
    cfg, ms: list[int], target: str, db: str | None, workers: int, args: list[str], view, as_json: bool
) -> None:
    gpus, events, procs = _gpu_count(), queue.Queue(), []
    for index in range(workers):
        cores = _cores_for(index, workers)
        env = {**os.environ, "TVM_NUM_THREADS": str(len(cores)), "OMP_NUM_THREADS": str(len(cores))}
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        proc = subprocess.Popen(
            [sys.executable, "-m", "moetune.autotune.cli", "tune", *args, "--events"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c)) if hasattr(os, "sched_setaffinity") else None,
        )
        procs.append(proc)
        threading.Thread(target=_pump, args=(proc, events), daemon=True).start()
    running = workers
    with Live(view.render(), console=console, refresh_per_second=4, transient=as_json) as live:
        while running:
            item = events.get()
            if item is None:
                running -= 1
                continue
            view.on_event(item)
            live.update(view.render())
    codes = [p.wait() for p in procs]
    errors = [p.stderr.read().strip().splitlines()[-1:] for p, c in zip(procs, codes, strict=True) if c]
    if any(codes):
        fail(f"{sum(1 for c in codes if c)} of {workers} workers failed: {errors[0][0] if errors[0] else codes}")
    _summary(cfg, ms, target, db, as_json)


def _pump(proc: subprocess.Popen, events: queue.Queue) -> None:
    for line in proc.stdout:
        try:
            events.put(json.loads(line))
        except json.JSONDecodeError:
            continue
    events.put(None)


def _summary(cfg, ms: list[int], target: str, db: str | None, as_json: bool) -> None:
    from moetune.ir.program import m_bucket
    from moetune.ir.target import resolve_target
    from moetune.kernels.db import layer_keys, open_db

    tgt, rows = resolve_target(target), []
    with open_db(db) as database:
        for bucket in sorted({m_bucket(v) for v in ms}):
            for name, key in layer_keys(cfg, tgt, bucket).items():  # lowered for the target's kind
                found = database.lookup(key)
                if found.kind == "exact":
                    rows.append({**found.record.to_dict(), "m": bucket, "name": name})
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"kernel DB winners after the workers ({tgt.name})")
    for column in ("M", "op", "backend", "p50 ms", "torch p50 ms", "speedup", "trials"):
        table.add_column(column, justify="left" if column in ("op", "backend") else "right")
    for r in rows:
        table.add_row(
            str(r["m"]),
            r["op"],
            r["backend"],
            f"{r['p50_ms']:.3f}",
            f"{r['baseline_p50_ms']:.3f}",
            f"{r['baseline_p50_ms'] / r['p50_ms']:.2f}x",
            str(r["trials"]),
        )
    console.print(table)
