"""Reporting the search-efficiency study (autotune/sampler_study/replay.py): Markdown tables and the PNG plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from moetune.autotune.sampler_study.replay import WITHIN, targets


def markdown(result: dict[str, Any]) -> str:
    """The study's tables in Markdown: per problem and sampler, then the targets. `free`: median share of the
    proposals that were not measured (infeasible or repeats; they cost no trial); `trials to 5%`: median over
    seeds (and as a share of the grid points)."""
    budgets = result["budgets"]
    head = "| problem | grid pts | grid best ms | default/best | drift | pass spread | sampler | free | trials to 5% |"
    head += "".join(f" best/grid @{b} |" for b in budgets)
    lines = [head, "|" + "---|" * (9 + len(budgets))]
    for r in result["summary"]:
        med = r["median_trials_to_5pct"]
        reached = "—" if med is None else f"{med:g} ({100 * r['median_fraction_of_grid']:.0f}%)"
        if med is None:
            reached = f">{max(budgets)}"
        ratios = "".join(f" {r['ratio_at'][b]:.3f} |" for b in budgets)
        lines.append(
            f"| {r['problem']} | {r['grid_points']} | {r['grid_best_ms']:.3f} | {r['default_ratio']:.3f} | "
            f"{r['drift']:.2f} | {_opt(r['pass_spread'])} | {r['sampler']} | {100 * r['pruned_fraction']:.0f}% | "
            f"{reached} |{ratios}"
        )
    lines += ["", "| sampler | median trials-to-5% / grid pts | ≤ 10%? |"]
    lines[-1] += "".join(f" geomean best/grid @{b} (random) |" for b in budgets)
    lines.append("|" + "---|" * (3 + len(budgets)))
    for sampler, t in targets(result["summary"], budgets).items():
        frac = t["median_fraction_of_grid"]
        cells = "".join(
            f" {t[f'geomean_ratio@{b}']:.3f} ({t.get(f'random_geomean_ratio@{b}', math.nan):.3f}) |" for b in budgets
        )
        frac_text = "not reached" if frac is None else f"{100 * frac:.1f}%"
        lines.append(f"| {sampler} | {frac_text} | {'yes' if t['meets_10pct'] else 'no'} |{cells}")
    return "\n".join(lines)


def _opt(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Best-found / grid-best (median over seeds) vs trials, one panel per problem, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in result["summary"]))
    best = {r["problem"]: r["grid_best_ms"] for r in result["summary"]}
    cols = min(3, len(problems))
    rows = math.ceil(len(problems) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, problem in zip(axes.flat, problems, strict=False):
        for key, runs in result["traces"].items():
            name, sampler = key.split("|")
            if name != problem:
                continue
            n = len(runs[0])
            med = [statistics.median(r[i] / best[problem] for r in runs) for i in range(n)]
            ax.plot(range(1, n + 1), [v if math.isfinite(v) else math.nan for v in med], label=sampler)
        ax.axhline(1 + WITHIN, color="grey", linestyle="--", linewidth=0.8, label=f"within {WITHIN:.0%} of the best")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(0.97, 4.0)
        ax.set_title(problem, fontsize=9)
        ax.set_xlabel("trials")
        ax.set_ylabel("best found / grid best")
    for ax in list(axes.flat)[len(problems) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
