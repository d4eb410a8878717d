"""The `moetune` command line (typer + rich).

Every command has --help; commands whose output is data take --json; bad input is a one-line message on
stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="moetune",
    help="Compiler-driven autotuning of mixture-of-experts kernels: lower, tune, store, run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (make demo, CI logs) gets a wide fixed width instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


@app.command()
def targets(as_json: JsonFlag = False) -> None:
    """List the hardware targets this machine can tune for: the host CPU and any CUDA GPU."""
    from moetune.kernels.target import detect_targets

    found = detect_targets()
    if as_json:
        _print_json(found)
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
        _print_json(rows)
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


if __name__ == "__main__":
    app()
