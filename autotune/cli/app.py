"""The `moetune` command line (typer + rich).

Every command has --help; commands whose output is data take --json; bad input is a one-line message on
stderr and exit code 2.
"""

from __future__ import annotations

import typer
from rich.table import Table

from moetune.autotune.cli.common import JsonFlag, console, print_json

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
    from moetune.ir.target import detect_targets

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
            if t.get("not_enabled"):
                details += f"; not enabled here (hidden by the OS or hypervisor): {' '.join(t['not_enabled'])}"
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


def _mount() -> None:
    from moetune.autotune.cli.bench import bench_command

    app.command("bench")(bench_command)
    from moetune.autotune.cli.tune import tune_command

    app.command("tune")(tune_command)
    from moetune.autotune.cli.db import db_app

    app.add_typer(db_app, name="db")
    from moetune.autotune.cli.package import package_command, run_command

    app.command("package")(package_command)
    app.command("run")(run_command)
    from moetune.autotune.cli.distill import distill_command

    app.command("distill")(distill_command)
    from moetune.autotune.cli.study import study_app

    app.add_typer(study_app, name="study")


_mount()
