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


def _shrunk(cfg, factor: int):
    if factor == 1:
        return cfg
    return cfg.replace(
        name=f"{cfg.name}/{factor}",
        hidden_size=max(8, cfg.hidden_size // factor),
        intermediate_size=max(8, cfg.intermediate_size // factor),
        shared_intermediate_size=max(8, cfg.shared_intermediate_size // factor) if cfg.num_shared_experts else 0,
    )


@app.command()
def bench(
    preset: Annotated[
        list[str], typer.Option("--preset", "-p", help="Model preset (repeatable); see `moetune presets`.")
    ] = ["qwen3-30b-a3b"],  # noqa: B006
    tokens: Annotated[str, typer.Option("--tokens", "-t", help="Comma-separated token counts T.")] = "1,16,256",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    providers: Annotated[
        str, typer.Option(help="Comma-separated: reference, torch, tvm (untuned defaults), tuned (kernel DB).")
    ] = "reference,torch,tvm,tuned",
    db: Annotated[str | None, typer.Option(help="Kernel DB for the tuned provider [default: the embedded DB]")] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Timed calls per cell (after 2 warm-ups).")] = 10,
    shrink: Annotated[
        int, typer.Option(min=1, help="Divide H and I (and the shared width) by this, for quick smoke runs.")
    ] = 1,
    out: Annotated[
        str | None, typer.Option(help="CSV to append rows to [default: results/<machine>/layer_bench.csv]")
    ] = None,
    save: Annotated[bool, typer.Option(help="Append the rows to the CSV.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Time one whole MoE layer: the reference vs TunedMoE on each backend, in one run, same weights."""
    from pathlib import Path

    from moetune.autotune.bench import PROVIDERS, append_csv, bench_layer
    from moetune.autotune.measure import machine_name
    from moetune.model import MoEConfig

    token_list = _parse_ints(tokens, "--tokens")
    chosen = tuple(p.strip() for p in providers.split(",") if p.strip())
    bad = [p for p in chosen if p not in PROVIDERS]
    if bad or not chosen:
        fail(f"unknown provider(s) {', '.join(bad) or '(none)'}; available: {', '.join(PROVIDERS)}")
    try:
        configs = [_shrunk(MoEConfig.preset(name, dtype=dtype), shrink) for name in preset]
    except ValueError as exc:
        fail(str(exc))
    rows = []
    with console.status("benchmarking") as status:
        for cfg in configs:
            status.update(f"{cfg.name} {cfg.dtype}: building weights and kernels")
            rows += bench_layer(
                cfg,
                token_list,
                chosen,
                repeat=repeat,
                db=db,
                on_row=lambda r: status.update(f"{r.preset} {r.dtype} T={r.tokens}: {r.provider} done"),
            )
    if save:
        path = Path(out) if out else Path("results") / machine_name() / "layer_bench.csv"
        append_csv(rows, path)
    if as_json:
        from dataclasses import asdict

        print_json([asdict(r) for r in rows])
        return
    table = Table(title=f"one MoE layer forward on {machine_name()} (p50 of {repeat}; speedup vs reference)")
    for column in ("preset", "dtype", "T", "provider", "p20 ms", "p50 ms", "p80 ms", "GFLOP/s", "speedup"):
        table.add_column(column, justify="left" if column in ("preset", "dtype", "provider") else "right")
    for r in rows:
        table.add_row(
            r.preset,
            r.dtype,
            str(r.tokens),
            r.provider,
            f"{r.p20_ms:.2f}",
            f"{r.p50_ms:.2f}",
            f"{r.p80_ms:.2f}",
            f"{r.gflops:.1f}",
            f"{r.speedup_vs_reference:.2f}x",
        )
    console.print(table)
    if save:
        console.print(f"rows appended to {path}")


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


_mount()


if __name__ == "__main__":
    app()
