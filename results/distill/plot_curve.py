"""The distilled student's quality / compute curve (issue #20): held-out cosine vs FFN FLOPs per token.

Reads curve.csv beside it (one row per measured student: recipe, FLOPs share, held-out cosine, retrieval
agreement, layer-wise texts) and writes curve.png. Recipes: "E40 K8" = 40 routed experts, top-8, beside the
256-neuron shared expert; "S0" = no shared expert. The rows come from recipes.md (experiments/recipe_runs.jsonl).
Run: .venv/bin/python results/distill/plot_curve.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent


def main() -> None:
    rows = list(csv.DictReader((HERE / "curve.csv").open()))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for texts, marker in (("2048", "o"), ("12721", "s")):
        for stage, color in (("moefy", "tab:gray"), ("trained", "tab:blue")):
            pts = [r for r in rows if r["layerwise_texts"] == texts and r["stage"] == stage]
            if not pts:
                continue
            pts.sort(key=lambda r: float(r["ffn_flops_pct"]))
            xs = [float(r["ffn_flops_pct"]) for r in pts]
            ys = [float(r["cosine_mean"]) for r in pts]
            held = pts[0]["heldout_texts"]
            label = "MoEfied, untrained" if stage == "moefy" else f"layer-wise KD on {int(texts):,} texts"
            label += f" ({held} held-out texts)"
            ax.plot(xs, ys, marker=marker, color=color if texts == "2048" else "tab:orange", label=label)
            last_x, dy = None, 0
            for r, x, y in zip(pts, xs, ys, strict=True):
                dy = dy + 9 if last_x is not None and x - last_x < 2 else 0  # neighbours: stack their labels
                last_x = x
                base = 5 if stage == "trained" else -11
                ax.annotate(r["recipe"], (x, y), textcoords="offset points", xytext=(4, base - dy), fontsize=7)
    ax.axhline(0.97, color="tab:red", linestyle="--", linewidth=1, label="target cosine 0.97")
    ax.axvline(35, color="tab:green", linestyle=":", linewidth=1, label="target FFN FLOPs 35%")
    ax.set_xlabel("student FFN FLOPs per token, % of the teacher's (router and shared expert included)")
    ax.set_ylabel("held-out mean cosine to the teacher")
    ax.set_title("all-MiniLM-L6-v2 -> MoE student: quality vs FFN compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(HERE / "curve.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
