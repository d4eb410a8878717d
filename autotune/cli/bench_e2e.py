"""`moetune bench --e2e`: a whole Hugging Face causal LM, transformers' experts implementations vs the same model
patched onto moetune's tuned kernels (autotune/bench/e2e.py): decode and prefill tokens/s, same greedy tokens."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from moetune.autotune.cli.common import console, err_console, fail, print_json

E2E_PROVIDERS = ("hf-eager", "hf-grouped_mm", "tuned")  # the default set
QUANT_PROVIDERS = (
    "tuned-int8",
    "tuned-int4",
    "tuned-w8a8",
    "tuned-w4a8",
)  # on request (--providers): quantized experts
E2E_CSV = "e2e.csv"


def _model_bytes(cfg: Any, layers: int, vocab: int) -> int:
    """The weights of the e2e model: per layer the MoE (router, experts) and attention (~4 H^2), plus embeddings."""
    from moetune.autotune.bench.roofline import layer_bytes

    h, size = cfg.hidden_size, cfg.torch_dtype.itemsize
    return layers * (layer_bytes(cfg, 0, cfg.num_experts) + 4 * h * h * size) + 2 * vocab * h * size


def e2e_command(
    preset: str,
    dtype: str,
    shrink: int,
    layers: int,
    prefill: int,
    providers: tuple[str, ...],
    rounds: int,
    db: str | None,
    out: str | None,
    save: bool,
    as_json: bool,
) -> None:
    from moetune.autotune.bench.e2e import E2E_VOCAB, causal_lm, run_e2e
    from moetune.autotune.bench.hf import family
    from moetune.autotune.measure import available_bytes, machine_name
    from moetune.model import MoEConfig
    from moetune.model.runtime.plan import runtime_db

    bad = [p for p in providers if p not in E2E_PROVIDERS + QUANT_PROVIDERS]
    if bad:
        fail(f"unknown --e2e provider(s) {', '.join(bad)}; available: {', '.join(E2E_PROVIDERS + QUANT_PROVIDERS)}")
    try:
        cfg = MoEConfig.preset(preset, dtype=dtype).shrunk(shrink)
        family(cfg)
    except ValueError as exc:
        fail(str(exc))
    need, free = 1.3 * _model_bytes(cfg, layers, E2E_VOCAB), available_bytes()
    if free is not None and need > free:
        fail(
            f"the {layers}-layer {preset} model needs about {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB is "
            "available (fewer --layers, or --shrink)"
        )
    try:
        handle = runtime_db(db)
    except ValueError as exc:
        fail(str(exc))
    where = machine_name("cpu")
    building = f"building a {layers}-layer {preset} causal LM ({need / 1.3 / 1e9:.1f} GB)"
    with warnings.catch_warnings(record=True) as seen, console.status(building) as status:
        warnings.simplefilter("always")
        model = causal_lm(cfg, layers)
        results = run_e2e(model, providers, handle, rounds=rounds, prefill=prefill, on_step=status.update)
    if not as_json:  # the runtime's warnings (e.g. stale DB records) as one line each
        for message in dict.fromkeys(str(w.message) for w in seen if w.category is UserWarning):
            err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)
    rows = [{"machine": where, "preset": cfg.name, "dtype": dtype, "layers": layers, **r.summary(prefill)}
            for r in results.values()]  # fmt: skip
    tokens = {p: r.tokens for p, r in results.items()}
    # the dense providers compute the same function: their greedy tokens must agree; quantized ones are compared
    same = len({tuple(t) for p, t in tokens.items() if p not in QUANT_PROVIDERS}) == 1
    first = next(iter(results.values()))
    best_hf = {k: max((r[k] for r in rows if r["provider"].startswith("hf-")), default=None)
               for k in ("decode_tok_s", "prefill_tok_s")}  # fmt: skip
    for row in rows:
        row["same_tokens"] = tokens[row["provider"]] == next(iter(tokens.values()))
        mine = results[row["provider"]].argmax
        row["agree"] = sum(a == b for a, b in zip(mine, first.argmax, strict=True)) / len(mine)
        for key, best in best_hf.items():
            row[f"{key}_vs_best_hf"] = row[key] / best if best else None
    path = Path(out) if out else Path("results") / where / E2E_CSV
    if save or out:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    if as_json:
        print_json({"rows": rows, "tokens": tokens, "same_tokens": same})
        return
    table = Table(title=f"{layers}-layer {cfg.name} causal LM ({dtype}) on {where}: p50 of {rounds} rounds")
    columns = ("provider", "decode tok/s", "vs best HF", "prefill tok/s", "vs best HF", "RSS GB", "tokens", "agree")
    for column in columns:
        table.add_column(column, justify="left" if column in ("provider", "tokens") else "right")
    for r in rows:
        table.add_row(
            r["provider"],
            f"{r['decode_tok_s']:.1f}",
            f"{r['decode_tok_s_vs_best_hf']:.2f}x" if r["decode_tok_s_vs_best_hf"] else "",
            f"{r['prefill_tok_s']:.1f}",
            f"{r['prefill_tok_s_vs_best_hf']:.2f}x" if r["prefill_tok_s_vs_best_hf"] else "",
            f"{r['rss_gb']:.2f}",
            "same" if r["same_tokens"] else "DIFFERENT",
            f"{r['agree']:.1%}",
        )
    console.print(table)
    console.print(
        f"decode: 15 greedy steps from an 8-token prompt (KV cache); prefill: {prefill} tokens, no cache. "
        + ("The dense providers produced the same greedy tokens." if same else "WARNING: the greedy tokens differ.")
        + f" agree: the prefill positions whose next-token argmax is {first.provider}'s.",
        highlight=False,
        soft_wrap=True,
    )
    if save or out:
        console.print(f"rows appended to {path}")
