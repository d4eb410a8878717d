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


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))
