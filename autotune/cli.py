"""The `moetune` command line (typer + rich).

Every command has --help; commands whose output is data take --json; bad input is a one-line message on
stderr and exit code 2.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from moetune.autotune.cli_common import JsonFlag, console, fail, print_json

app = typer.Typer(
    name="moetune",
    help="Compiler-driven autotuning of mixture-of-experts kernels: lower, tune, store, run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def targets(as_json: JsonFlag = False) -> None:
    """List the hardware targets this machine can tune for: the host CPU and any CUDA GPU."""
    from moetune.kernels.target import detect_targets

    found = detect_targets()
    if as_json:
        print_json(found)
        return
    table = Table(title="moetune targets")
    for column in ("kind", "name", "target", "details"):
        table.add_column(column)
    for t in found:
        if t["kind"] == "cpu":
            details = f"{t['cores']} cores; {t['triple']}; ISA: {' '.join(t['features']) or '-'}"
        else:
            details = f"cc {t['compute_capability']}; {t['sm_count']} SMs; {t['memory_gib']} GiB"
        table.add_row(t["kind"], t["name"], t["target"], details)
    console.print(table)
    if not any(t["kind"] == "cuda" for t in found):
        console.print("no CUDA GPU visible to torch: GPU archs can still be prepared ahead of time (sm_80/89/90)")


@app.command()
def presets(as_json: JsonFlag = False) -> None:
    """List the named MoE layer shapes of real models (use them with MoEConfig.preset or --preset)."""
    from moetune.model import MoEConfig

    rows = []
    for name in MoEConfig.presets():
        c = MoEConfig.preset(name)
        rows.append(
            {
                "name": name,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_experts": c.num_experts,
                "top_k": c.top_k,
                "router": c.router,
                "shared_size": c.shared_size,
                "activation": c.activation,
                "gflop_per_token": round(c.flops_per_token() / 1e9, 4),
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title="MoE presets (one layer)")
    for column in ("name", "H", "I", "E", "K", "router", "shared Is", "act", "GFLOP/token"):
        table.add_column(column, justify="left" if column in ("name", "router", "act") else "right")
    for r in rows:
        table.add_row(
            r["name"],
            str(r["hidden_size"]),
            str(r["intermediate_size"]),
            str(r["num_experts"]),
            str(r["top_k"]),
            r["router"],
            str(r["shared_size"]),
            r["activation"],
            f"{r['gflop_per_token']:.3f}",
        )
    console.print(table)


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{what} must be comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        fail(f"{what} must be integers >= 1, got {text!r}")
    return values


def _json_safe(value):
    """Non-finite floats (no result yet, no HF provider) as null: the files stay strict JSON."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


@app.command()
def bench(
    preset: Annotated[
        list[str] | None,
        typer.Option(
            "--preset",
            "-p",
            help="Model preset (repeatable); see `moetune presets`. Default: the comparison matrix of "
            "qwen3-30b-a3b, mixtral-8x7b, olmoe-1b-7b and gpt-oss-20b.",
        ),
    ] = None,
    tokens: Annotated[str, typer.Option("--tokens", "-t", help="Comma-separated token counts T.")] = "1,16,256,1024",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: float32, bfloat16, float16. Default: float32,bfloat16 for the matrix, "
            "float32 with --preset."
        ),
    ] = None,
    providers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated, or 'all': reference, torch, tvm (untuned defaults), tuned (kernel DB), "
            "hf-eager, hf-grouped_mm, hf-batched_mm. Default: reference, the three hf-*, tvm, tuned for the "
            "matrix; reference, torch, tvm, tuned with --preset."
        ),
    ] = None,
    db: Annotated[str | None, typer.Option(help="Kernel DB for the tuned provider. Default: the embedded DB.")] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Timed calls per cell (after a warm-up; 20 s cap).")] = 10,
    shrink: Annotated[
        int | None,
        typer.Option(
            min=1, help="Divide H and I (and the shared width) by this. Default: 4 for the matrix, 1 with --preset."
        ),
    ] = None,
    hf_mem_gib: Annotated[
        float, typer.Option(help="Skip hf-batched_mm where its gathered weights exceed this many GiB.")
    ] = 4.0,
    slow_call_s: Annotated[
        float, typer.Option(help="A provider whose warm-up call takes longer is timed by that single call.")
    ] = 30.0,
    out: Annotated[
        str | None, typer.Option(help="CSV to append rows to. Default: results/<machine>/layer_bench_v2.csv.")
    ] = None,
    save: Annotated[bool, typer.Option(help="Append the rows to the CSV.")] = True,
    report: Annotated[
        str | None, typer.Option(help="Write a JSON report (ceilings, rows, skipped, tuned-vs-HF geomean) here.")
    ] = None,
    plot: Annotated[
        str | None, typer.Option("--plot", help="Write speedup.png and roofline.png to this folder.")
    ] = None,
    matmul_n: Annotated[int, typer.Option(min=64, help="Square size of the peak-matmul measurement.")] = 2048,
    stream_mib: Annotated[int, typer.Option(min=1, help="MiB of fp32 read / copied for the bandwidth.")] = 1024,
    as_json: JsonFlag = False,
) -> None:
    """Time one whole MoE layer forward: moetune (reference, untuned, tuned) vs Hugging Face's experts
    implementations, same weights, same inputs, with this machine's roofline measured in the same run."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from moetune.autotune import bench_report
    from moetune.autotune.bench import (
        CSV_NAME,
        DEFAULT_DTYPES,
        DEFAULT_PRESETS,
        DEFAULT_PROVIDERS,
        MOETUNE_PROVIDERS,
        PROVIDERS,
        append_csv,
        bench_layer,
    )
    from moetune.autotune.measure import machine_name
    from moetune.autotune.roofline import measure_machine
    from moetune.model import MoEConfig

    matrix = not preset
    token_list = _parse_ints(tokens, "--tokens")
    if providers == "all":
        providers = ",".join(PROVIDERS)
    chosen = tuple(p.strip() for p in (providers or "").split(",") if p.strip())
    chosen = chosen or (DEFAULT_PROVIDERS if matrix else MOETUNE_PROVIDERS)
    bad = [p for p in chosen if p not in PROVIDERS]
    if bad:
        fail(f"unknown provider(s) {', '.join(bad)}; available: {', '.join(PROVIDERS)}")
    dtypes = [d.strip() for d in dtype.split(",") if d.strip()] if dtype else None
    dtypes = dtypes or list(DEFAULT_DTYPES if matrix else ("float32",))
    factor = shrink if shrink is not None else (4 if matrix else 1)
    try:
        configs = [MoEConfig.preset(name, dtype=d).shrunk(factor) for d in dtypes for name in preset or DEFAULT_PRESETS]
    except ValueError as exc:
        fail(str(exc))
    with console.status("measuring this machine's peak matmul and read bandwidth"):
        machine = measure_machine(tuple(dtypes), n=matmul_n, nbytes=stream_mib << 20)
    peaks = ", ".join(f"{d} {v:.1f} (n={machine.matmul_n[d]})" for d, v in machine.peak_gflops.items())
    if not as_json:  # --json: the output is the JSON alone (each row carries the ceilings)
        console.print(
            f"{machine_name()}: peak matmul GFLOP/s: {peaks}; read {machine.read_gbs:.1f} GB/s, "
            f"copy {machine.copy_gbs:.1f} GB/s ({machine.stream_bytes >> 20} MiB fp32)",
            highlight=False,
        )
    rows, skipped = [], []
    with console.status("benchmarking") as status:
        for cfg in configs:
            status.update(f"{cfg.name} {cfg.dtype}: building weights, kernels and HF blocks")
            result = bench_layer(
                cfg,
                token_list,
                chosen,
                machine=machine,
                repeat=repeat,
                db=db,
                hf_mem_limit=hf_mem_gib * 2**30,
                slow_call_s=slow_call_s,
                on_row=lambda r: status.update(f"{r.preset} {r.dtype} T={r.tokens}: {r.provider} done"),
            )
            rows += result.rows
            skipped += result.skipped
    full = bench_report.report(rows, skipped, machine)
    path = Path(out) if out else Path("results") / machine_name() / CSV_NAME
    if save:
        try:
            append_csv(rows, path)
        except ValueError as exc:
            fail(str(exc))
    if report:
        Path(report).write_text(json.dumps(_json_safe(full), indent=1, default=str) + "\n")
    if plot:
        try:
            bench_report.plot(rows, machine, Path(plot))
        except ImportError:
            fail("--plot needs matplotlib: pip install 'moetune[plot]'")
    if as_json:
        print_json([asdict(r) for r in rows])
        return
    console.print(bench_report.table(rows, f"one MoE layer forward on {machine_name()} (p50 of {repeat})"))
    for s in skipped:
        console.print(f"skipped {s['provider']} on {s['preset']} {s['dtype']} T={s['tokens'] or 'all'}: {s['reason']}")
    for key in ("tuned_vs_best_hf", "tvm_vs_best_hf"):
        summary = full[key]
        if summary["cells"]:
            per = ", ".join(f"{k[8:]} {v:.2f}x" for k, v in summary.items() if k.startswith("geomean_"))
            console.print(
                f"{summary['provider']} vs best HF provider: geomean {summary['geomean']:.2f}x over "
                f"{summary['cells']} cells ({per})"
            )
    if save:
        console.print(f"rows appended to {path}")


study_app = typer.Typer(
    help="Search-efficiency study: measure whole schedule grids, then replay the tuner's samplers on them.",
    no_args_is_help=True,
)


@study_app.command("grid")
def study_grid(
    problem: Annotated[
        list[str] | None,
        typer.Option(
            "--problem",
            help="PRESET:OP:M or PRESET/SHRINK:OP:M, OP gemm1|gemm2 (repeatable). Default: the study's six problems.",
        ),
    ] = None,
    out: Annotated[str, typer.Option(help="Folder for grid_<problem>.csv")] = "results/search",
    repeat: Annotated[int, typer.Option(min=1, help="Timed calls per point (the tuner's default).")] = 10,
    passes: Annotated[
        int,
        typer.Option(
            min=1, help="Measurements of each point, each pass in its own random order; the table keeps the fastest."
        ),
    ] = 2,
    force: Annotated[
        bool, typer.Option(help="Re-measure from scratch (default: resume, skipping measured points).")
    ] = False,
) -> None:
    """Build, verify and time every feasible schedule point of each problem (the tuner's trial path)."""
    from pathlib import Path

    from moetune.autotune.bench import versions
    from moetune.autotune.measure import machine_name
    from moetune.autotune.search_study import DEFAULT_PROBLEMS, StudyProblem, measure_grid
    from moetune.kernels.target import resolve_target

    try:
        problems = [StudyProblem.parse(p) for p in (problem or DEFAULT_PROBLEMS)]
    except ValueError as exc:
        fail(str(exc))
    meta = {"machine": machine_name(), "target": resolve_target("cpu").name, "versions": versions()}
    for p in problems:
        path = Path(out) / f"grid_{p.slug}.csv"
        if path.exists() and force:
            path.unlink()
        with console.status(f"{p.name}: measuring") as status:
            table = measure_grid(
                p,
                path,
                meta,
                passes=passes,
                repeat=repeat,
                on_point=lambda i, n, gp, name=p.name: status.update(f"{name}: {i}/{n} ({gp.p50_ms:.3f} ms)"),
            )
        console.print(
            f"{p.name}: {len(table.points)} points, {table.seconds:.0f} s of trials; best {table.best.p50_ms:.3f} ms "
            f"{table.best.point}; drift of the default point {table.drift():.2f}x, median pass-to-pass spread "
            f"{table.pass_spread():.2f}x (nan: one pass) -> {path}"
        )


@study_app.command("run")
def study_run(
    folder: Annotated[str, typer.Option("--dir", help="Folder holding grid_*.csv; results go here too.")] = (
        "results/search"
    ),
    samplers: Annotated[str, typer.Option(help="Comma-separated: tpe, cmaes, gp, random.")] = "tpe,cmaes,gp,random",
    budgets: Annotated[str, typer.Option(help="Comma-separated trial budgets.")] = "8,16,32,64",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per sampler and problem.")] = 5,
    plot: Annotated[bool, typer.Option(help="Write search_efficiency.png.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Replay each sampler against the measured grids (a table lookup) and report trials-to-5% and ratios."""
    import json
    from pathlib import Path

    from moetune.autotune.search_study import SAMPLERS, load_grid, run_study, targets
    from moetune.autotune.search_study_report import markdown
    from moetune.autotune.search_study_report import plot as plot_study

    chosen = [s.strip() for s in samplers.split(",") if s.strip()]
    if not chosen or any(s not in SAMPLERS for s in chosen):
        fail(f"--samplers must be a subset of {', '.join(SAMPLERS)}, got {samplers!r}")
    budget_list = _parse_ints(budgets, "--budgets")
    paths = sorted(Path(folder).glob("grid_*.csv"))
    if not paths:
        fail(f"no grid_*.csv in {folder}; run `moetune study grid` first")
    tables = [load_grid(p) for p in paths]
    with console.status("replaying samplers") as status:
        result = run_study(
            tables, chosen, budget_list, seeds, on_run=lambda n, s, seed: status.update(f"{n}: {s} seed {seed}")
        )
    result["targets"] = targets(result["summary"], budget_list)
    Path(folder, "study.json").write_text(json.dumps(_json_safe(result), indent=1, default=str) + "\n")
    Path(folder, "study.md").write_text(markdown(result) + "\n")
    if plot:
        try:
            plot_study(result, Path(folder, "search_efficiency.png"))
        except ImportError:
            console.print("no plot: matplotlib is not installed (pip install 'moetune[plot]')")
            plot = False
    if as_json:
        print_json({k: v for k, v in result.items() if k != "traces"})
        return
    console.print(markdown(result), markup=False, highlight=False)
    console.print(f"study.json, study.md{', search_efficiency.png' if plot else ''} written to {folder}")


def _mount() -> None:
    from moetune.autotune.tune_cli import tune_command

    app.command("tune")(tune_command)
    from moetune.autotune.db_cli import db_app

    app.add_typer(db_app, name="db")
    from moetune.autotune.package_cli import package_command, run_command

    app.command("package")(package_command)
    app.command("run")(run_command)
    from moetune.autotune.distill_cli import distill_command

    app.command("distill")(distill_command)
    app.add_typer(study_app, name="study")


_mount()


if __name__ == "__main__":
    app()
