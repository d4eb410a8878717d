"""Helpers every CLI command shares: the consoles, one-line failures (exit 2), JSON output."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

# Piped output (make demo, CI logs) gets a wide fixed width instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
QuantOpt = Annotated[
    str | None,
    typer.Option(
        help="Quantized experts: int8 | int4 (weight-only, one scale per group), w8a8 | w4a8 (the same codes, the "
        "inputs quantized to int8 per token and group too: integer dot products on AVX-512 VNNI) "
        "[default: as the dtype]."
    ),
]
QuantGroupOpt = Annotated[
    int | None, typer.Option(help="Weights per scale with --quant: 32 | 64 | 128 [default: 32 on a CPU, 128 on a GPU].")
]


def quantized(cfg: Any, quant: str | None, group: int | None, target_kind: str = "cpu") -> Any:
    """cfg with --quant / --quant-group applied; a bad format or group is a one-line failure."""
    if group is not None and quant is None:
        fail("--quant-group needs --quant (int8, int4, w8a8 or w4a8)")
    try:
        return cfg.quantized(quant, group, target_kind)
    except ValueError as exc:
        fail(str(exc))


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def parse_ints(text: str, what: str, minimum: int = 1, noun: str = "integers") -> list[int]:
    """'1,16,256' -> [1, 16, 256]; anything else is a one-line failure naming the option."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{what} must be comma-separated {noun}, got {text!r}")
    if not values or min(values) < minimum:
        fail(f"{what} must be {noun} >= {minimum}, got {text!r}")
    return values


def json_safe(value: Any) -> Any:
    """Non-finite floats (no result yet, no HF provider) as null: the files stay strict JSON."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
