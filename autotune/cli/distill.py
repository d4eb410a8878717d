"""`moetune distill`: dense teacher -> MoE student (model/distill/pipeline.py), tuned for this machine, packaged.

Steps: distill (MoEfication + knowledge distillation, live progress) -> tune the student's MoE ops for the
target at the token counts its encode batches have -> package (weights, configs, kernel records, manifest)
-> load the package back and time teacher vs student encoding on the same held-out batches in one run.
`--results DIR` appends a CSV row and writes a summary there (results/distill/ in the repository).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from moetune.autotune.cli.common import JsonFlag, QuantGroupOpt, QuantOpt, console, fail, print_json
from moetune.model.distill.recipe import RECIPE


def _bench_batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    from moetune.model.distill.student import tokenize

    return [tokenize(tokenizer, texts[i : i + batch_size], max_length) for i in range(0, len(texts), batch_size)]


def encode_speed(teacher: Any, students: dict[str, Any], batches: list[dict], repeat: int = 5) -> dict[str, Any]:
    """p20/p50/p80 ms per batch of the teacher and each student (same batches, interleaved, one run)."""
    import torch

    from moetune.autotune.measure import measure
    from moetune.model.distill.student import mean_pool

    def run(model):
        def fn(batch):
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                return mean_pool(out.last_hidden_state, batch["attention_mask"])

        return fn

    models = {"teacher": teacher, **students}
    timings: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeat):  # interleaved rounds: machine drift hits every model alike
        for name, model in models.items():
            timings[name].append(measure(run(model), batches, warmup=1, repeat=len(batches)).p50_ms)
    p50 = {name: sorted(v)[len(v) // 2] for name, v in timings.items()}
    return {"p50_ms": p50, "rounds": timings, "speedup": {n: p50["teacher"] / p50[n] for n in students}}


def _write_results(out_dir: Path, row: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "distill.csv"
    rows, fields = [], list(row)
    if path.exists():  # older rows may lack newer columns: rewrite them under the union of the headers
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = [*(reader.fieldnames or []), *(k for k in row if k not in (reader.fieldnames or []))]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows([*rows, row])
    (out_dir / "latest.json").write_text(json.dumps(row, indent=1, default=str) + "\n")


def _check_before_start(
    teacher: str, experts: int, top_k: int, shared: int | None, quant: str | None = None, group: int | None = None
) -> None:
    """The teacher, the split and the weight format, checked against the teacher's config before any progress
    bar is drawn."""
    import json

    from moetune.model import MoEConfig
    from moetune.model.distill.moefy import check_split
    from moetune.model.distill.pipeline import resolve_teacher
    from moetune.model.distill.recipe import default_shared

    try:
        config = json.loads((resolve_teacher(teacher) / "config.json").read_text())
        intermediate = int(config["intermediate_size"])
        shared = default_shared(intermediate, experts) if shared is None else shared
        check_split(intermediate, experts, top_k, shared)
        if quant is not None:  # the routed experts' width must fit the quant group
            width = (intermediate - shared) // experts
            MoEConfig(int(config["hidden_size"]), width, experts, top_k, gated=False).quantized(quant, group)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else f"cannot read the teacher's config: {exc!r}")


def distill_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Package directory to write (new or empty).")],
    teacher: Annotated[str, typer.Option(help="'minilm' (all-MiniLM-L6-v2, shipped on PyPI) or a local HF dir.")] = (
        "minilm"
    ),
    experts: Annotated[int, typer.Option("--experts", "-e", min=1, help="E: routed experts per FFN.")] = RECIPE[
        "experts"
    ],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="K: routed experts per token.")] = RECIPE["top_k"],
    shared: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Neurons of the always-on shared expert (the teacher's most important ones; 0: none). "
            "Default: 1/6 of the teacher's FFN width, rounded so that E divides the rest.",
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=0, help="End-to-end distillation steps (after the layer-wise stage).")] = (
        RECIPE["steps"]
    ),
    layerwise_texts: Annotated[int, typer.Option(min=1, help="Training texts of the layer-wise KD stage.")] = (
        RECIPE["layerwise_texts"]
    ),
    target: Annotated[str, typer.Option("--target", "-t", help="Target to tune and package kernels for.")] = "cpu",
    tune_trials: Annotated[int, typer.Option(min=0, help="Trials per op and token count (0: no tuning).")] = 16,
    db: Annotated[str | None, typer.Option(help="Kernel database (default: the embedded one).")] = None,
    results: Annotated[Path | None, typer.Option(help="Append the measured row here (e.g. results/distill).")] = None,
    eval_texts: Annotated[int, typer.Option(min=1, help="Held-out texts to evaluate the cosine on.")] = 512,
    bench_texts: Annotated[int, typer.Option(min=1, help="Held-out texts to time encoding on (batches of 64).")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the clustering and the training order.")] = 0,
    quant: QuantOpt = None,
    quant_group: QuantGroupOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Distil a dense teacher into a shared expert + E routed experts (top-K) MoE student, tune, package it.

    Example: moetune distill --teacher minilm --out student.moetune   (the default recipe; other points on the
    quality / compute curve: --experts 8 --top-k 2 --shared 0, ...)
    """
    if top_k > experts:
        fail(f"--top-k ({top_k}) must be <= --experts ({experts})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out} exists and is not empty; choose another --out")
    if quant_group is not None and quant is None:
        fail("--quant-group needs --quant (int8, int4, w8a8 or w4a8)")
    _check_before_start(teacher, experts, top_k, shared, quant, quant_group)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar; HF's would interleave with it

    from moetune.model.distill.pipeline import distill
    from moetune.model.distill.text import SOURCE, corpus

    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=as_json,
    ) as bar:
        task = bar.add_task("moefy", total=1, info="splitting neurons, fitting routers")

        def progress(info: dict[str, Any]) -> None:
            shown = {k: info[k] for k in ("loss", "cosine") if isinstance(info.get(k), float)}
            text = " ".join(f"{k} {v:.4f}" for k, v in shown.items())
            total = max(int(info.get("steps", 1)), 1)
            step = info.get("step", 0)
            bar.update(task, description=info.get("phase", ""), total=total, completed=step, info=text)

        try:
            student, report = distill(
                teacher, experts, top_k, steps, shared=shared, layerwise_texts=layerwise_texts,
                eval_texts=eval_texts, seed=seed, progress=progress,
            )  # fmt: skip
        except (ValueError, OSError) as exc:
            fail(str(exc).splitlines()[0])
    t_distill = time.perf_counter() - t0
    if quant is not None:  # after distillation (the student trains dense), before tuning and packaging
        student.quantize_(quant, quant_group)
        report["quant"] = {"format": quant, "group": next(iter(student.moe_cfgs.values())).quant_group}
    report = _finish(student, report, out, target, tune_trials, db, bench_texts, as_json)
    report.update(
        distill_seconds=t_distill,
        total_seconds=time.perf_counter() - t0,
        text_source=SOURCE,
        heldout_texts=len(corpus("heldout")),
    )
    if results is not None:
        _write_results(results, _row(report, teacher, experts, top_k, steps, seed))
    if as_json:
        print_json(report)
        return
    held, flops, speed = report["heldout"], report["ffn_flops_per_token"], report["speed"]
    console.print(
        f"held-out ({held['texts']} texts): cosine to the teacher mean {held['cosine_mean']:.4f}, "
        f"p05 {held['cosine_p05']:.4f}, min {held['cosine_min']:.3f}; retrieval agreement "
        f"{held['retrieval_at10']:.3f} (share of each text's 10 nearest neighbours kept)"
    )
    console.print(
        f"FFN FLOPs per token: student {flops['student']:,} / teacher {flops['teacher']:,} = "
        f"{100 * flops['ratio']:.1f}% (router and shared expert included); shared {report['shared']} neurons + "
        f"top-{report['top_k']} of {report['experts']} routed experts"
    )
    console.print(
        f"encode speed: student {speed['speedup']['student_tuned']:.2f}x the teacher's (packaged, tuned kernels; "
        f"p50 per batch of 64, same batches, interleaved: {speed['p50_ms']['student_tuned']:.0f} vs "
        f"{speed['p50_ms']['teacher']:.0f} ms)"
    )
    console.print(f"package: {out}   ({report['total_seconds']:.0f} s in all)")


def _finish(student, report: dict, out: Path, target: str, trials: int, db: Any, texts: int, quiet: bool) -> dict:
    """Tune the student's MoE ops for the bench batches' token counts, package, reload, time."""
    from moetune.autotune.tuning.tuner import tune
    from moetune.ir.program import m_bucket
    from moetune.kernels.db import open_db
    from moetune.model.distill.pipeline import load_teacher
    from moetune.model.distill.text import corpus
    from moetune.model.packaging import load, package

    heldout = corpus("heldout")[:texts]
    batches = _bench_batches(student.tokenizer, heldout, 64, student.max_length)
    tokens = sorted({int(b["input_ids"].numel()) for b in batches})
    buckets = sorted({m_bucket(t) for t in tokens})
    handle = open_db(db)
    tuned = []
    if trials:
        for cfg in {c for c in student.moe_cfgs.values()}:
            status = console.status(f"tuning {cfg.name or 'student MoE'} for M={buckets}")
            with contextlib.nullcontext() if quiet else status:
                rep = tune(cfg, target=target, m=buckets, trials=trials, db=handle, time_budget=300)
            tuned.append({"trials": rep.trials, "seconds": rep.seconds, "speedup_vs_torch": rep.speedup_vs_torch()})
    package(student, out, targets=[target], db=handle)
    loaded = load(out, target=target)
    teacher, _ = load_teacher(report.get("teacher", "minilm"))
    speed = encode_speed(teacher.eval(), {"student_reference": student.bert, "student_tuned": loaded.bert}, batches)
    return {**report, "tuning": tuned, "bench_tokens_per_batch": tokens, "speed": speed, "package": str(out)}


def _row(report: dict, teacher: str, experts: int, top_k: int, steps: int, seed: int) -> dict[str, Any]:
    from moetune.autotune.measure import machine_name

    sp = report["speed"]
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_name(),
        "teacher": teacher,
        "experts": experts,
        "top_k": top_k,
        "steps": steps,
        "seed": seed,
        "quant": report.get("quant", {}).get("format", "none"),
        "heldout_cosine_mean": round(report["heldout"]["cosine_mean"], 5),
        "heldout_cosine_min": round(report["heldout"]["cosine_min"], 5),
        "heldout_cosine_p05": round(report["heldout"]["cosine_p05"], 5),
        "retrieval_at10": round(report["heldout"]["retrieval_at10"], 4),
        "shared": report["shared"],
        "layerwise_texts": report["layerwise_texts"],
        "heldout_texts": report["heldout"].get("texts", math.nan),
        "ffn_flops_ratio": round(report["ffn_flops_ratio"], 4),
        "teacher_p50_ms": round(sp["p50_ms"]["teacher"], 2),
        "student_reference_p50_ms": round(sp["p50_ms"]["student_reference"], 2),
        "student_tuned_p50_ms": round(sp["p50_ms"]["student_tuned"], 2),
        "speedup_tuned_vs_teacher": round(sp["speedup"]["student_tuned"], 3),
        "distill_seconds": round(report["distill_seconds"], 1),
    }
