"""`moetune study grid | run`: the sampler study (autotune/sampler_study/): measure whole schedule grids, then
replay the tuner's samplers on them. Mounted into the main app by app.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moetune.autotune.cli.common import JsonFlag, console, fail, json_safe, parse_ints, print_json

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

    from moetune.autotune.bench.layer import versions
    from moetune.autotune.measure import machine_name
    from moetune.autotune.sampler_study.replay import DEFAULT_PROBLEMS, StudyProblem, measure_grid
    from moetune.ir.target import resolve_target

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
    from pathlib import Path

    from moetune.autotune.sampler_study.replay import SAMPLERS, load_grid, run_study, targets
    from moetune.autotune.sampler_study.report import markdown
    from moetune.autotune.sampler_study.report import plot as plot_study

    chosen = [s.strip() for s in samplers.split(",") if s.strip()]
    if not chosen or any(s not in SAMPLERS for s in chosen):
        fail(f"--samplers must be a subset of {', '.join(SAMPLERS)}, got {samplers!r}")
    budget_list = parse_ints(budgets, "--budgets")
    paths = sorted(Path(folder).glob("grid_*.csv"))
    if not paths:
        fail(f"no grid_*.csv in {folder}; run `moetune study grid` first")
    tables = [load_grid(p) for p in paths]
    with console.status("replaying samplers") as status:
        result = run_study(
            tables, chosen, budget_list, seeds, on_run=lambda n, s, seed: status.update(f"{n}: {s} seed {seed}")
        )
    result["targets"] = targets(result["summary"], budget_list)
    Path(folder, "study.json").write_text(json.dumps(json_safe(result), indent=1, default=str) + "\n")
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
