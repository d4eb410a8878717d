"""`moetune tune`: tune a model's MoE layer for a target, with a live view and a summary table.

`--target sm_90 --prepare` (also sm_80, sm_86, sm_89) compiles the Triton candidates ahead of time for that GPU
architecture on this machine instead (autotune/tuning/prepare.py) and prints what is feasible there.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from types import SimpleNamespace
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from moetune.autotune.cli.common import JsonFlag, QuantGroupOpt, QuantOpt, console, fail, print_json, quantized

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | None) -> float | None:
    """'90', '90s', '10m', '1h', '1h30m' -> seconds."""
    if text is None:
        return None
    parts = re.fullmatch(r"\s*((?:\d+(?:\.\d+)?[smh]?\s*)+)", text)
    if not parts:
        fail(f"--time-budget must look like 600, 90s, 10m or 1h30m; got {text!r}")
    total = sum(float(v) * _UNITS[u or "s"] for v, u in re.findall(r"(\d+(?:\.\d+)?)([smh]?)", text))
    if total <= 0:
        fail(f"--time-budget must be positive, got {text!r}")
    return total


def _config(model: str | None, hf_config: str | None, dtype: str | None, shrink: int = 1):
    from moetune.model import MoEConfig

    if (model is None) == (hf_config is None):
        fail("give exactly one of --model PRESET or --hf-config PATH")
    try:
        cfg = MoEConfig.preset(model) if model else MoEConfig.from_hf(hf_config)
        return (cfg.replace(dtype=dtype) if dtype else cfg).shrunk(shrink)
    except ValueError as exc:
        fail(str(exc))


def _event_json(event: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in event.items() if k != "study"}
    if "outcome" in out:
        out["outcome"] = asdict(out["outcome"])
    return out


class LiveView:
    """Per (M, op): trials done, failures, best p50, torch p50, speedup, redrawn on every event."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, str], dict[str, Any]] = {}

    def on_event(self, event: dict[str, Any]) -> None:
        if event["kind"] == "study_start":
            self.rows.setdefault(
                (event["m"], event["op"]), {"trials": 0, "failed": 0, "best": math.nan, "state": "tuning"}
            )
        elif event["kind"] == "trial":
            row = self.rows[(event["m"], event["op"])]
            if event.get("measured", True):  # pruned proposals and repeats cost no trial
                row["trials"] += 1
                row["failed"] += event["state"] == "FAIL"
            if event["value"] is not None:
                row["best"] = min(v for v in (row["best"], event["value"]) if not math.isnan(v))
        elif event["kind"] == "study_end":
            o = event["outcome"]
            o = SimpleNamespace(**o) if isinstance(o, dict) else o
            self.rows[(o.m_bucket, o.name)] = {
                "trials": o.trials,
                "failed": o.failed,
                "best": o.p50_ms,
                "torch": o.torch_p50_ms,
                "backend": o.backend,
                "state": o.status,
            }

    def render(self) -> Table:
        table = Table(title="moetune tune")
        for column in ("M", "op", "state", "trials", "failed", "best p50 ms", "torch p50 ms", "speedup", "winner"):
            table.add_column(column, justify="left" if column in ("op", "state", "winner") else "right")
        for (m, op), r in self.rows.items():
            torch_p50 = r.get("torch", math.nan)
            speed = torch_p50 / r["best"] if r["best"] and not math.isnan(r["best"]) else math.nan
            table.add_row(
                str(m),
                op,
                r["state"],
                str(r["trials"]),
                str(r["failed"]),
                _blank(r["best"], "{:.3f}"),  # nothing measured yet: a blank, not "nan"
                _blank(torch_p50, "{:.3f}"),
                _blank(speed, "{:.2f}x"),
                r.get("backend", ""),
            )
        return table

    @staticmethod
    def line(event: dict[str, Any]) -> str | None:
        """One plain progress line for a log or CI (output not on a terminal): a study's start and its end."""
        if event["kind"] == "study_start":
            return f"tuning M={event['m']} {event['op']} ..."
        if event["kind"] != "study_end":
            return None
        o = event["outcome"]
        o = SimpleNamespace(**o) if isinstance(o, dict) else o
        speed = o.torch_p50_ms / o.p50_ms if o.p50_ms and not math.isnan(o.p50_ms) else math.nan
        return (
            f"M={o.m_bucket} {o.name}: {o.status}, {o.backend or '-'} p50 {_blank(o.p50_ms, '{:.3f} ms')} "
            f"(torch {_blank(o.torch_p50_ms, '{:.3f} ms')}, {_blank(speed, '{:.2f}x')}), "
            f"{o.trials} trials, {o.seconds:.0f} s"
        )


def _blank(value: float, fmt: str) -> str:
    return "" if value is None or math.isnan(value) else fmt.format(value)


def tune_command(
    model: Annotated[
        str | None,
        typer.Option("--model", "--preset", "-p", help="Model preset (see `moetune presets`); same flag as bench's."),
    ] = None,
    hf_config: Annotated[str | None, typer.Option(help="A Hugging Face config.json (or its directory).")] = None,
    target: Annotated[
        str, typer.Option(help="'cpu' (the host), 'llvm -mcpu=<cpu>', 'cuda', or a GPU arch: sm_80|sm_86|sm_89|sm_90.")
    ] = "cpu",
    m: Annotated[
        str, typer.Option("--m", help="Comma-separated token counts (each tuned as its M bucket).")
    ] = "1,16,256",
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16 [default: the model's]")] = None,
    shrink: Annotated[
        int, typer.Option(min=1, help="Divide H and I by this (as `moetune bench --shrink`: tune what it times).")
    ] = 1,
    quant: QuantOpt = None,
    quant_group: QuantGroupOpt = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials per op and M (a study resumes up to this).")] = 32,
    time_budget: Annotated[str | None, typer.Option(help="Wall-time budget for the whole run: 600, 10m, 1h.")] = None,
    sampler: Annotated[str, typer.Option(help="tpe | cmaes | gp | random | grid")] = "tpe",
    patience: Annotated[int, typer.Option(min=1, help="Stop a study after this many trials without a new best.")] = 12,
    db: Annotated[
        str | None,
        typer.Option(help="Kernel DB path or SQLAlchemy URL [default: $MOETUNE_DB or ~/.cache/moetune/kernels.db]"),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage URL or journal path [default: a journal file under ~/.cache/moetune]"),
    ] = None,
    trial_timeout: Annotated[float, typer.Option(min=1, help="Seconds before a trial counts as hung.")] = 120.0,
    repeat: Annotated[int, typer.Option(min=3, help="Timed calls per trial.")] = 10,
    force: Annotated[bool, typer.Option(help="Re-tune ops that already have a fresh winner in the DB.")] = False,
    ops: Annotated[
        str | None, typer.Option(help="Only these program ops, comma-separated (e.g. experts.gemm1).")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Local worker processes sharing the studies (CPU: pinned to cores; one per GPU).")
    ] = 1,
    events: Annotated[bool, typer.Option(hidden=True, help="Print progress as JSON lines (for --workers).")] = False,
    prepare: Annotated[
        bool,
        typer.Option(
            "--prepare",
            help="Compile every Triton candidate for --target sm_XX ahead of time (no GPU needed); report what fits.",
        ),
    ] = False,
    jobs: Annotated[int | None, typer.Option(min=1, help="Compile processes for --prepare [default: cores].")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Tune every op of a model's MoE layer for a target; winners go into the kernel DB."""
    from moetune.autotune.cli.common import parse_ints
    from moetune.autotune.tuning.samplers import SAMPLERS
    from moetune.autotune.tuning.storage import mask_url
    from moetune.autotune.tuning.tuner import tune
    from moetune.kernels.db import KernelDBError

    cfg = _config(model, hf_config, dtype, shrink)
    ms = parse_ints(m, "--m")
    gpu_target = _gpu_target(target, prepare)
    cfg = quantized(cfg, quant, quant_group, "cpu" if gpu_target is None else "cuda")
    if prepare:
        _prepare(cfg, gpu_target, ms, jobs, force, as_json)
        return
    if sampler not in SAMPLERS:
        fail(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
    budget = parse_duration(time_budget)
    _note_skipped_backends(target)
    if workers > 1:
        from moetune.autotune.cli.tune_parallel import child_args, run_workers

        args = child_args(
            model=model,
            hf_config=hf_config,
            target=target,
            m=m,
            dtype=dtype,
            shrink=shrink if shrink > 1 else None,
            quant=quant,
            quant_group=quant_group,
            trials=trials,
            time_budget=time_budget,
            sampler=sampler,
            patience=patience,
            db=db,
            storage=storage,
            trial_timeout=trial_timeout,
            repeat=repeat,
            force=force,
            ops=ops,
        )
        run_workers(cfg, ms, target, db, workers, args, LiveView(), as_json)
        return
    view = LiveView()
    plain = not console.is_terminal and not (as_json or events)  # a log or CI: lines as studies end, no redraws
    try:
        # transient: the live table goes when the run ends; a run that fails leaves only its one-line error
        with Live(view.render(), console=console, refresh_per_second=4, transient=True) as live:

            def on_event(event: dict[str, Any]) -> None:
                if events:
                    typer.echo(json.dumps(_event_json(event), default=str), nl=True)
                    return
                view.on_event(event)
                if plain:
                    text = view.line(event)
                    if text:
                        console.print(text, highlight=False, soft_wrap=True)
                    return
                live.update(view.render())

            report = tune(
                cfg,
                target=target,
                m=ms,
                trials=trials,
                db=db,
                storage=storage,
                sampler=sampler,
                time_budget=budget,
                patience=patience,
                trial_timeout=trial_timeout,
                repeat=repeat,
                force=force,
                on_event=on_event,
                ops=tuple(o.strip() for o in ops.split(",")) if ops else None,
            )
    except (KernelDBError, ValueError) as exc:
        fail(mask_url(str(exc)))
    if events:
        return
    if as_json:
        print_json(report.to_dict())
        return
    console.print(view.render())
    console.print()
    cut = [o for o in report.outcomes if o.cut_short]
    if cut:
        console.print(
            f"the time budget ({time_budget}) ended {len(cut)} of {len(report.outcomes)} studies before --trials "
            f"{trials}; their winners are the best found so far (re-run with a larger budget to continue them)"
        )
    retuned = sum(o.stale for o in report.outcomes if o.status == "tuned")
    kept = sum(o.stale for o in report.outcomes if o.status != "tuned")
    if retuned:
        console.print(f"{retuned} stale kernel record(s) (tuned with other versions) were reported and re-tuned")
    if kept:
        console.print(
            f"{kept} stale kernel record(s) sit beside current winners, unused (`moetune db prune` deletes them)"
        )
    cached = all(o.status == "cached" for o in report.outcomes)
    console.print(
        f"{report.model} on {report.target}: {report.trials} trials in {report.seconds:.0f} s"
        + (" (every op answered from the kernel DB; --force re-tunes, a larger --trials continues)" if cached else "")
        + f"; geometric-mean speedup of the winners over the torch backend: {report.speedup_vs_torch():.2f}x"
    )


def _note_skipped_backends(target: str) -> None:
    """One stderr line per backend this tune leaves out because its packages are missing (e.g. tvm_cuda on a GPU
    host without TVM): said before the run, not discovered as a failure in every trial."""
    from moetune.autotune.tuning.search import skipped_backends
    from moetune.ir.target import resolve_target

    try:
        tgt = resolve_target(target)
    except ValueError as exc:
        fail(str(exc))
    for backend, missing in skipped_backends(tgt).items():
        typer.echo(f"note: backend {backend} is not tuned here: {', '.join(missing)} not installed", err=True)


def _gpu_target(target: str, prepare: bool):
    """The CUDA Target of --target, or None for a CPU; --prepare needs one, tuning on CUDA needs the GPU."""
    from moetune.ir.target import GPU_LIMITS, cuda_gpus, resolve_target

    archs = ", ".join(GPU_LIMITS)
    if prepare and not (target.startswith(("sm_", "cuda")) or target == "gpu"):
        fail(f"--prepare compiles for a GPU architecture: give --target {archs.replace(', ', '|')}")
    if not target.startswith(("sm_", "cuda")):
        return None
    try:
        tgt = resolve_target(target)
    except ValueError as exc:
        fail(str(exc))
    if not prepare and tgt.torch_device == "cuda" and not cuda_gpus():
        fail(f"tuning for {tgt.arch} needs that GPU here; on this machine use --prepare to compile for it ahead")
    return tgt


def _prepare(cfg, target, ms: list[int], jobs: int | None, force: bool, as_json: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moetune.autotune.tuning.prepare import prepare, summary_rows

    progress = Progress(
        TextColumn(f"compiling for {target.arch}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    )
    task = None

    def on_event(event: dict[str, Any]) -> None:
        nonlocal task
        if event["kind"] == "start":
            task = progress.add_task("compile", total=event["kernels"])
        elif event["kind"] == "compiled" and task is not None:
            progress.update(task, completed=event["done"])

    try:
        with progress:
            report = prepare(cfg, target, ms, jobs=jobs, force=force, on_event=on_event)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        print_json(report.to_dict())
        return
    table = Table(title=f"moetune prepare: {report.model} ({report.dtype}) for {report.arch}, M={report.m}")
    columns = ("op", "problems", "grid", "static pruned", "candidates", "kernels", "feasible", "pruned (why)")
    columns += ("feasible by instruction", "s")
    left = ("op", "kernels", "pruned (why)", "feasible by instruction")
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(
        f"points = (problem, config) pairs; kernels = distinct compiles (GROUP_M and BM are launch arguments); "
        f"instruction: wgmma / mma = tensor cores, fma = CUDA cores; "
        f"results cached in {report.cache}; {report.seconds:.0f} s"
    )
