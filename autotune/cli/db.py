"""`moetune db ...`: inspect and manage the kernel database (ls, show, export, import, prune).

Mounted into the main app by cli.py (`app.add_typer(db_app, name="db")`). Every command takes --db (a file
path or an SQLAlchemy URL; default $MOETUNE_DB or ~/.cache/moetune/kernels.db); a KernelDBError or bad
input is one line on stderr and exit code 2, like every other moetune command.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from moetune.autotune.cli.common import JsonFlag, console, fail, print_json
from moetune.kernels.db import KernelDB, KernelDBError, KernelRecord, current_versions, is_current, open_db

db_app = typer.Typer(help="Inspect and manage the kernel database (winners of tuning runs).", no_args_is_help=True)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Kernel database: a file path or an SQLAlchemy URL [default: $MOETUNE_DB or ~/.cache/moetune/kernels.db].",
        show_default=False,
    ),
]


@contextmanager
def _opened(db: str | None, create: bool = False) -> Iterator[KernelDB]:
    """Open the database (created only by `import`: looking never creates one); any KernelDBError while it is
    open becomes a one-line failure."""
    try:
        handle = open_db(db, create=create)
    except KernelDBError as exc:
        fail(escape(str(exc)))
    try:
        yield handle
    except KernelDBError as exc:
        fail(escape(str(exc)))
    finally:
        handle.close()


def _row(r: KernelRecord) -> dict[str, Any]:
    return {"id": r.short_id, **r.to_dict(), "speedup": round(r.speedup, 4), "stale": not is_current(r)}


@db_app.command("ls")
def ls(
    target: Annotated[str | None, typer.Option(help="Only this target (exact), e.g. 'llvm -mcpu=znver3'.")] = None,
    op: Annotated[str | None, typer.Option(help="Only ops whose signature contains this text.")] = None,
    db: DbOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List the stored winners; 'stale' ones were tuned with other versions and are not used."""
    with _opened(db) as handle:
        found = [r for r in handle.records(target=target) if op is None or op in r.key.op]
        location = handle.location
    rows = [_row(r) for r in found]
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print(f"no records in {location}", highlight=False)
        return
    table = Table(title=f"kernel database {location} ({len(rows)} records; `db show ID` for the full op)")
    models = _models()
    columns = ("id", "target", "model", "op", "dtype", "M", "backend", "p50 ms", "torch p50 ms", "speedup", "stale")
    for column in columns:
        right = column in ("M", "p50 ms", "torch p50 ms", "speedup")
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for r in rows:
        table.add_row(
            r["id"],
            r["target"].removeprefix("llvm -mcpu=").removeprefix("cuda -arch="),
            models.get(r["op"], ""),
            _short_op(r["op"]),
            r["dtype"],
            str(r["m_bucket"]),
            r["backend"],
            f"{r['p50_ms']:.4g}",
            f"{r['baseline_p50_ms']:.4g}",
            f"{r['speedup']:.2f}x",
            "[yellow]stale[/yellow]" if r["stale"] else "",
        )
    console.print(table)


def _short_op(signature: str) -> str:
    """gemm1[H=2048,I=768,E=128,BM=8,gated=1,...]:float32 -> gemm1 H=2048 I=768 E=128 BM=8: the sizes only."""
    name, _, rest = signature.partition("[")
    sizes = [kv for kv in rest.split("]")[0].split(",") if kv.split("=")[0] in _SIZES]
    return " ".join([name, *sizes])


_SIZES = ("H", "I", "E", "K", "BM")


def _models() -> dict[str, str]:
    """op signature -> the presets whose layer lowers to it (any M bucket, CPU or CUDA; shared experts too),
    full size or /4 (the bench matrix's shrink)."""
    from moetune.ir.program import lower
    from moetune.model.config import MoEConfig

    found: dict[str, set[str]] = {}
    for name in MoEConfig.presets():
        for dtype, shrink in ((d, s) for d in ("float32", "bfloat16") for s in (1, 4)):
            cfg = MoEConfig.preset(name, dtype=dtype).shrunk(shrink)
            label = name if shrink == 1 else f"{name}/{shrink}"
            for kind in ("cpu", "cuda"):
                for bucket in (1 << b for b in range(14)):
                    for op in lower(cfg, bucket, target_kind=kind):
                        found.setdefault(op.problem.signature, set()).add(label)
    return {sig: ",".join(sorted(names)) for sig, names in found.items()}


@db_app.command("show")
def show(
    key: Annotated[str, typer.Argument(help="The record id printed by `moetune db ls` (or a longer prefix).")],
    db: DbOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Show one record: key, versions, timings and the schedule config."""
    with _opened(db) as handle:
        record = handle.find(key)
    row = _row(record)
    if as_json:
        print_json(row)
        return
    table = Table(title=f"record {record.short_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name in ("target", "op", "dtype", "m_bucket", "backend", "trials", "created_at"):
        table.add_row(name, str(row[name]))
    for name in ("p20_ms", "p50_ms", "p80_ms", "baseline_p50_ms"):
        table.add_row(name, f"{row[name]:.4g}")
    table.add_row("speedup", f"{row['speedup']:.2f}x vs torch in the same run")
    table.add_row("config", escape(json.dumps(record.config, sort_keys=True)))
    # the versions the record is compared with: its backend's (entries "*" are not compared), else all of them
    versions = current_versions(record.backend) if "*" in record.versions.values() else current_versions()
    for name, value in record.versions.items():
        now = versions.get(name, "none")
        table.add_row(f"version {name}", value if value == now else f"{value} [yellow](now {now}: stale)[/yellow]")
    console.print(table)


@db_app.command("export")
def export(
    file: Annotated[Path, typer.Argument(help="JSON file to write.", dir_okay=False)],
    db: DbOption = None,
) -> None:
    """Write every record to a JSON file (for `moetune db import` elsewhere)."""
    with _opened(db) as handle:
        count = handle.export_json(file)
        location = handle.location
    console.print(f"exported {count} records from {location} to {file}", highlight=False)


@db_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="JSON file written by `moetune db export`.", dir_okay=False)],
    db: DbOption = None,
) -> None:
    """Merge records from a JSON export; a record replaces a stored one only if its p50 is lower."""
    with _opened(db, create=True) as handle:
        stored = handle.import_json(file)
        location = handle.location
    console.print(f"imported {stored} records into {location} (better wins)", highlight=False)


@db_app.command("prune")
def prune(
    everything: Annotated[bool, typer.Option("--all", help="Delete every record, not only stale ones.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm --all.")] = False,
    db: DbOption = None,
) -> None:
    """Delete stale records (tuned with other versions), or all of them with --all --yes."""
    if everything and not yes:
        fail("prune --all deletes every record; add --yes to confirm")
    with _opened(db) as handle:
        count = handle.prune(everything=everything)
        location = handle.location
    what = "records" if everything else "stale records"
    console.print(f"deleted {count} {what} from {location}", highlight=False)
