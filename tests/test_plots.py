"""The report plots a newcomer reads (issue #19, item 8): labels whole, every line and point named in a legend.

Each test draws the real plot from synthetic rows and inspects the figure before it is closed: tick labels are the
full cell names, nothing is drawn outside the saved (tight) bounding box, the roofs of dtypes with different
peaks are separate lines, every point's legend entry names provider and dtype, and the search plot's 5% line is in
its legend.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

pytest.importorskip("matplotlib")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from moetune.autotune.bench import report
from moetune.autotune.bench.layer import BenchRow
from moetune.autotune.bench.roofline import Machine
from moetune.autotune.sampler_study import report as study_report


@pytest.fixture
def figures(monkeypatch):
    """The figures a plot function closes, kept open for inspection."""
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    close("all")


def _row(preset: str, dtype: str, tokens: int, provider: str, p50: float, speedup: float) -> BenchRow:
    flops, nbytes = 2e9 * tokens, 4e8 if dtype == "float32" else 2e8
    return BenchRow(
        machine="test-machine-2c", preset=preset, dtype=dtype, tokens=tokens, provider=provider,
        p20_ms=p50 * 0.9, p50_ms=p50, p80_ms=p50 * 1.1, n=5, gflops=flops / p50 / 1e6, gbps=nbytes / p50 / 1e6,
        pct_roofline=50.0, roofline_gflops=100.0, flops=flops, bytes=nbytes, experts_touched=8.0,
        max_rel_err=1e-6, speedup_vs_reference=1.5, speedup_vs_best_hf=speedup, best_hf="hf-eager",
        peak_gflops=100.0, read_gbs=30.0, config="{}", versions="{}", timestamp="2026-12-01T00:00:00Z",
    )  # fmt: skip


ROWS = [
    _row(preset, dtype, tokens, provider, p50, speedup)
    for preset in ("qwen3-30b-a3b", "deepseek-v2-lite/2")
    for dtype in ("float32", "bfloat16")
    for tokens in (1, 256)
    for provider, p50, speedup in (("tuned", 2.0, 2.5 if tokens > 1 else 0.8), ("hf-eager", 5.0, math.nan))
]
MACHINE = Machine(
    peak_gflops={"float32": 180.0, "bfloat16": 430.0}, read_gbs=30.0, copy_gbs=20.0,
    matmul_n={"float32": 1024, "bfloat16": 1024}, stream_bytes=1 << 28,
)  # fmt: skip


def _cut_off(fig, png) -> list[str]:
    """Labels, titles, legend entries and in-view tick labels that the saved PNG does not show whole (empty when
    all fit): the image must span every such text's extent (savefig with bbox_inches='tight' makes it so)."""
    fig.canvas.draw()  # places the legend ("best" location) as savefig did
    renderer = fig.canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            texts += [t.label1 for t in axis.get_major_ticks() if lo <= t.get_loc() <= hi]
    texts = [t for t in texts if t.get_visible() and t.get_text()]
    assert len(texts) > 5  # the check looks at something
    union = matplotlib.transforms.Bbox.union([t.get_window_extent(renderer) for t in texts])
    saved_h, saved_w = matplotlib.image.imread(png).shape[:2]  # pixels; the figure drew at the same dpi (110)
    scale = 110 / fig.dpi
    if saved_w + 2 >= union.width * scale and saved_h + 2 >= union.height * scale:
        return []
    inside = fig.bbox  # an image the size of the figure shows only what lies inside it
    return [t.get_text() for t in texts if not inside.contains(*t.get_window_extent(renderer).p0)
            or not inside.contains(*t.get_window_extent(renderer).p1)]  # fmt: skip


def test_speedup_plot_names_every_cell_in_full(tmp_path, figures):
    written = report.plot(ROWS, MACHINE, tmp_path)
    assert [p.name for p in written] == ["speedup.png", "roofline.png"] and all(p.stat().st_size for p in written)
    speedup = figures[0]
    ax = speedup.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    tuned = [r for r in ROWS if r.provider == "tuned"]
    assert labels == [report._cell(r) for r in tuned]
    assert "deepseek-v2-lite/2 bf16 T=256" in labels  # whole, not "deep" or "floa"
    assert "best HF" in ax.get_ylabel() and "geomean" in ax.get_title()
    assert _cut_off(speedup, written[0]) == []
    colors = [tuple(p.get_facecolor()) for p in ax.patches]
    green, red = matplotlib.colors.to_rgba("tab:green"), matplotlib.colors.to_rgba("tab:red")
    assert colors == [red if r.speedup_vs_best_hf < 1 else green for r in tuned]  # below 1.0x is red


def test_roofline_separates_roofs_and_names_each_point(tmp_path, figures):
    written = report.plot(ROWS, MACHINE, tmp_path)
    roofline = figures[1]
    ax = roofline.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    roofs = [t for t in legend if t.startswith("roof")]
    assert len(roofs) == 2, legend  # fp32 and bf16 have different peaks: two lines, not one on top of the other
    assert any("fp32" in t and "180" in t for t in roofs) and any("bf16" in t and "430" in t for t in roofs)
    assert {"tuned fp32", "tuned bf16", "hf-eager fp32", "hf-eager bf16"} <= set(legend)
    assert "above a roof" in ax.get_title()
    assert _cut_off(roofline, written[1]) == []


def test_roofline_draws_one_roof_when_peaks_are_equal(tmp_path, figures):
    same = dataclasses.replace(MACHINE, peak_gflops={"float32": 180.0})  # no bf16 peak: bf16 falls back to fp32's
    report.plot(ROWS, same, tmp_path)
    legend = [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()]
    assert [t for t in legend if t.startswith("roof")] == ["roof fp32 = bf16: 180 GFLOP/s, 30.0 GB/s"]


def test_search_plot_legend_has_the_within_line(tmp_path, figures):
    summary = [{"problem": "p:gemm1:16", "grid_best_ms": 1.0}]
    traces = {"p:gemm1:16|tpe": [[3.0, 1.5, 1.02, 1.0]], "p:gemm1:16|random": [[3.0, 2.0, 1.5, math.inf]]}
    path = study_report.plot({"summary": summary, "traces": traces}, tmp_path / "search.png")
    assert path.stat().st_size > 0
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert {"tpe", "random"} <= set(legend)
    assert f"within {study_report.WITHIN:.0%} of the best" in legend
