"""Presenting `moetune bench` results: the rich table, the JSON report and the PNG plots.

Plots (matplotlib, the `plot` extra): speedup.png, the tuned provider's speedup over the best HF provider
per cell; roofline.png, every provider's achieved GFLOP/s against the cell's roof (min(peak, bandwidth x
arithmetic intensity)) on log-log axes, with the measured ceilings drawn in.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from moetune.autotune.bench.layer import HF_PROVIDERS, BenchRow, tuned_vs_hf
from moetune.autotune.bench.roofline import Machine


def table(rows: list[BenchRow], title: str) -> Table:
    out = Table(title=title)
    columns = ("preset", "dtype", "T", "provider", "p20 ms", "p50 ms", "p80 ms", "GFLOP/s", "GB/s", "% roof")
    for column in (*columns, "vs ref", "vs best HF"):
        out.add_column(column, justify="left" if column in ("preset", "dtype", "provider") else "right")
    for r in rows:
        out.add_row(
            r.preset,
            r.dtype,
            str(r.tokens),
            r.provider + ("" if r.n > 1 else " (1 call)"),
            f"{r.p20_ms:.2f}",
            f"{r.p50_ms:.2f}",
            f"{r.p80_ms:.2f}",
            f"{r.gflops:.1f}",
            f"{r.gbps:.1f}",
            f"{r.pct_roofline:.1f}",
            f"{r.speedup_vs_reference:.2f}x",
            "-" if math.isnan(r.speedup_vs_best_hf) else f"{r.speedup_vs_best_hf:.2f}x ({r.best_hf})",
        )
    return out


def report(rows: list[BenchRow], skipped: list[dict[str, Any]], machine: Machine | None) -> dict[str, Any]:
    """Everything a run measured: the ceilings, rows, skipped providers and the tuned-vs-HF summary."""
    return {
        "machine": asdict(machine) if machine else None,
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
        "tuned_vs_best_hf": tuned_vs_hf(rows),
        "tvm_vs_best_hf": tuned_vs_hf(rows, "tvm"),
    }


NOISY_SPREAD = 0.25  # (p80 - p20) / p50 above this in any cell: the machine was busy while it was timed


def verdict(rows: list[BenchRow], db_location: str, provider: str = "tuned") -> list[str]:
    """The few lines a newcomer acts on: per cell the layer's speed against the reference and the fastest
    Hugging Face implementation on this machine, whether the timings were noisy, where the kernels came from."""
    lines = []
    mine = [r for r in rows if r.provider == provider]
    for r in mine:
        hf = "" if math.isnan(r.speedup_vs_best_hf) else f", {r.speedup_vs_best_hf:.2f}x the best HF ({r.best_hf})"
        above = " (above it: weights reused from cache, or the bandwidth moved during the cell)"
        lines.append(
            f"{r.preset} {r.dtype} T={r.tokens}: {provider} {r.p50_ms:.2f} ms = "
            f"{r.speedup_vs_reference:.2f}x the reference{hf}, {r.pct_roofline:.0f}% of this machine's roof"
            + (above if r.pct_roofline > 100 else "")
        )
    if mine and all(math.isnan(r.speedup_vs_best_hf) for r in mine):
        lines.append("no Hugging Face provider was timed: add --providers reference,hf-eager,hf-grouped_mm,tuned")
    noisy = max(rows, key=lambda r: (r.p80_ms - r.p20_ms) / r.p50_ms if r.p50_ms > 0 else 0.0, default=None)
    if noisy is not None and noisy.p50_ms > 0 and (noisy.p80_ms - noisy.p20_ms) / noisy.p50_ms > NOISY_SPREAD:
        spread = (noisy.p80_ms - noisy.p20_ms) / noisy.p50_ms
        lines.append(
            f"warning: the machine was busy: p20-p80 spread up to {spread:.0%} of p50 ({noisy.preset} "
            f"T={noisy.tokens} {noisy.provider}); ratios are less certain, re-run on a quiet machine"
        )
    lines.append(f"kernels: {provider} = the winners in {db_location} (`moetune db ls` lists them)")
    return lines


_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _cell(r: BenchRow) -> str:
    return f"{r.preset} {_SHORT_DTYPES.get(r.dtype, r.dtype)} T={r.tokens}"


def plot(rows: list[BenchRow], machine: Machine | None, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    tuned = [r for r in rows if r.provider == "tuned" and math.isfinite(r.speedup_vs_best_hf)]
    if tuned:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tuned)), 4.5))
        values = [r.speedup_vs_best_hf for r in tuned]
        ax.bar(range(len(tuned)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log", base=2)
        ax.set_xticks(range(len(tuned)), [_cell(r) for r in tuned], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("tuned p50 speedup over the best HF provider")
        summary = tuned_vs_hf(rows)
        ax.set_title(
            f"moetune tuned vs best of {', '.join(HF_PROVIDERS)} (geomean {summary['geomean']:.2f}x)", fontsize=9
        )
        written.append(folder / "speedup.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")  # long cell labels and the y label kept whole
        plt.close(fig)
    if machine and rows:
        fig, ax = plt.subplots(figsize=(7, 5))
        intensity = [r.flops / r.bytes for r in rows]
        lo, hi = min(intensity) / 2, max(intensity) * 2
        xs = [lo * (hi / lo) ** (k / 100) for k in range(101)]
        dtypes = list(dict.fromkeys(r.dtype for r in rows))
        colors = dict(zip(dtypes, ("tab:blue", "tab:orange", "tab:green"), strict=False))
        bandwidth = sorted(r.read_gbs for r in rows)[len(rows) // 2]  # cells re-measure it: their median
        roofs: dict[float, list[str]] = {}  # one line per distinct peak (bf16 falls back to fp32's)
        for dtype in dtypes:
            roofs.setdefault(machine.peak_for(dtype), []).append(dtype)
        for peak, names in roofs.items():
            label = (
                f"roof {' = '.join(_SHORT_DTYPES.get(n, n) for n in names)}: {peak:.0f} GFLOP/s, {bandwidth:.1f} GB/s"
            )
            ys = [min(peak, bandwidth * x) for x in xs]
            ax.plot(xs, ys, linestyle="--", color=colors[names[0]], linewidth=1, label=label)
        markers = dict(zip(dict.fromkeys(r.provider for r in rows), "osD^v<>px", strict=False))
        for (provider, marker), dtype in ((pm, d) for pm in markers.items() for d in dtypes):
            mine = [r for r in rows if r.provider == provider and r.dtype == dtype]
            if mine:
                xy = ([r.flops / r.bytes for r in mine], [r.gflops for r in mine])
                ax.scatter(
                    *xy, marker=marker, color=colors[dtype], s=22, label=f"{provider} {_SHORT_DTYPES.get(dtype, dtype)}"
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (useful FLOP / byte a forward must move)")
        ax.set_ylabel("achieved GFLOP/s (p50)")
        ax.set_title(
            f"{rows[0].machine}: points above a roof reuse weights from cache (the roof counts each byte once "
            "from DRAM)",
            fontsize=8,
        )
        ax.legend(fontsize=6, ncol=2)
        written.append(folder / "roofline.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return written
