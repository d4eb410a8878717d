"""`moetune bench`: one whole MoE layer forward, moetune against what users would run instead (autotune/bench/layer.py).

On the CPU (default) the matrix is four presets with H and I divided by 4, in fp32 and bf16. With `--target cuda`
the matrix is full size in bf16 up to T = 4096, timed on the GPU, with the GPU's bf16 matmul peak and copy
bandwidth measured in the same run; the summary adds tuned over hf-grouped_mm (the torch._grouped_mm path).
"""

from __future__ import annotations

import warnings
from typing import Annotated

import typer
from rich.markup import escape

from moetune.autotune.cli.common import JsonFlag, console, err_console, fail, json_safe, parse_ints, print_json


def bench_command(
    preset: Annotated[
        list[str] | None,
        typer.Option(
            "--preset",
            "--model",
            "-p",
            help="Model preset (repeatable); see `moetune presets`. Default: the comparison matrix of "
            "qwen3-30b-a3b, mixtral-8x7b, olmoe-1b-7b and gpt-oss-20b.",
        ),
    ] = None,
    target: Annotated[
        str, typer.Option(help="'cpu' (the host) or 'cuda' (the first GPU: layer, inputs and timing on it).")
    ] = "cpu",
    tokens: Annotated[
        str | None,
        typer.Option("--tokens", "-t", help="Comma-separated token counts T. Default: 1,16,256,1024 (GPU: +4096)."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: float32, bfloat16, float16. Default: float32,bfloat16 for the CPU matrix, "
            "float32 with --preset; bfloat16 on a GPU."
        ),
    ] = None,
    quant: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated expert weight formats, each its own cells: none, int8, int4 (weight-only, one "
            "fp16 scale per 32 weights), w8a8, w4a8 (the same codes, inputs quantized to int8 per token and group; the "
            "ggml provider runs llama.cpp's Q8_0 / Q4_0 there). Default: none."
        ),
    ] = None,
    providers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated, or 'all': reference, torch, tvm (CPU), triton / tvm_cuda (GPU; untuned "
            "defaults), tuned (kernel DB), hf-eager, hf-grouped_mm, hf-batched_mm, ggml (llama.cpp's graph; needs "
            "moetune[anchors]). Default on a CPU: reference, "
            "the three hf-*, tvm, tuned for the matrix; reference, torch, tvm, tuned with --preset. On a GPU: "
            "reference, hf-eager, hf-grouped_mm, torch, triton, tvm_cuda, tuned (with --preset: reference, "
            "torch, triton, tuned)."
        ),
    ] = None,
    db: Annotated[str | None, typer.Option(help="Kernel DB for the tuned provider. Default: the embedded DB.")] = None,
    repeat: Annotated[
        int | None,
        typer.Option(min=1, help="Timed calls per cell (after a warm-up; 20 s cap). Default 10; --e2e: rounds, 3."),
    ] = None,
    shrink: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Divide H and I (and the shared width) by this. Default: 4 for the CPU matrix, else 1.",
        ),
    ] = None,
    hf_mem_gib: Annotated[
        float, typer.Option(help="Skip hf-batched_mm where its gathered weights exceed this many GiB.")
    ] = 4.0,
    slow_call_s: Annotated[
        float, typer.Option(help="A provider whose warm-up call takes longer is timed by that single call.")
    ] = 30.0,
    out: Annotated[str | None, typer.Option(help="CSV to append the rows to (implies --save).")] = None,
    save: Annotated[
        bool, typer.Option(help="Append the rows to a CSV: --out, else results/<machine>/layer_bench_v2.csv.")
    ] = False,
    report: Annotated[
        str | None, typer.Option(help="Write a JSON report (ceilings, rows, skipped, tuned-vs-HF geomean) here.")
    ] = None,
    plot: Annotated[
        str | None, typer.Option("--plot", help="Write speedup.png and roofline.png to this folder.")
    ] = None,
    matmul_n: Annotated[
        int | None, typer.Option(min=64, help="Square size of the peak-matmul measurement. Default: 2048 (GPU: 8192).")
    ] = None,
    stream_mib: Annotated[int, typer.Option(min=1, help="MiB of fp32 read / copied for the bandwidth.")] = 1024,
    e2e: Annotated[
        bool,
        typer.Option(
            "--e2e",
            help="A whole HF causal LM instead of one layer: the preset's MoE dims (default qwen3-30b-a3b), --layers "
            "layers, vocab 8192, random weights; hf-eager / hf-grouped_mm vs the model patched onto the tuned "
            "kernels: greedy decode and prefill (--tokens, default 256) tokens/s, same greedy tokens; "
            "--save/--out append to results/<machine>/e2e.csv.",
        ),
    ] = False,
    layers: Annotated[int, typer.Option(min=1, help="Decoder layers of the --e2e model.")] = 4,
    as_json: JsonFlag = False,
) -> None:
    """Time one whole MoE layer forward: moetune (reference, untuned, tuned) vs Hugging Face's experts
    implementations, same weights, same inputs, with this machine's roofline measured in the same run."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from moetune.autotune.bench import report as bench_report
    from moetune.autotune.bench.layer import (
        CSV_NAME,
        DEFAULT_DTYPES,
        DEFAULT_PRESETS,
        DEFAULT_PROVIDERS,
        DEFAULT_TOKENS,
        GPU_TOKENS,
        PRESET_PROVIDERS,
        PROVIDERS,
        append_csv,
        bench_layer,
        speedup_over,
    )
    from moetune.autotune.bench.roofline import measure_machine
    from moetune.autotune.measure import machine_name
    from moetune.ir.target import cuda_gpus, resolve_target
    from moetune.model import MoEConfig

    if e2e:
        from moetune.autotune.cli.bench_e2e import E2E_PROVIDERS, e2e_command

        if target != "cpu" or (preset and len(preset) > 1) or (dtype and "," in dtype):
            fail("--e2e times one preset in one dtype on the CPU (--target cpu)")
        chosen = tuple(p.strip() for p in (providers or ",".join(E2E_PROVIDERS)).split(",") if p.strip())
        prefill = parse_ints(tokens, "--tokens") if tokens else [256]
        if len(prefill) != 1:
            fail("--e2e takes one --tokens value: the prefill length")
        e2e_command((preset or ["qwen3-30b-a3b"])[0], dtype or "float32", shrink or 1, layers, prefill[0], chosen,
                    repeat or 3, db, out, save, as_json)  # fmt: skip
        return
    repeat = repeat or 10
    try:
        device = resolve_target(target).torch_device
    except ValueError as exc:
        fail(str(exc))
    if device == "cuda" and not cuda_gpus():
        fail(f"--target {target}: benchmarking a GPU needs that GPU here (no CUDA GPU found)")
    gpu, matrix = device == "cuda", not preset
    token_list = parse_ints(tokens, "--tokens") if tokens else list(GPU_TOKENS if gpu else DEFAULT_TOKENS)
    if providers == "all":
        providers = ",".join(PROVIDERS)
    chosen = tuple(p.strip() for p in (providers or "").split(",") if p.strip())
    chosen = chosen or (DEFAULT_PROVIDERS if matrix else PRESET_PROVIDERS)[device]
    bad = [p for p in chosen if p not in PROVIDERS]
    if bad:
        fail(f"unknown provider(s) {', '.join(bad)}; available: {', '.join(PROVIDERS)}")
    dtypes = [d.strip() for d in dtype.split(",") if d.strip()] if dtype else None
    dtypes = dtypes or (["bfloat16"] if gpu else list(DEFAULT_DTYPES if matrix else ("float32",)))
    factor = shrink if shrink is not None else (4 if matrix and not gpu else 1)
    quants = [q.strip() for q in (quant or "none").split(",") if q.strip()] or ["none"]
    try:
        configs = [
            MoEConfig.preset(name, dtype=d).shrunk(factor).quantized(None if q == "none" else q)
            for q in quants
            for d in dtypes
            for name in preset or DEFAULT_PRESETS
        ]
    except ValueError as exc:
        fail(str(exc))
    where = machine_name(device)
    with console.status(f"measuring {where}'s peak matmul and bandwidth"):
        machine = measure_machine(
            tuple(dtypes), n=matmul_n or (8192 if gpu else 2048), nbytes=stream_mib << 20, device=device
        )
    peaks = ", ".join(f"{d} {v:.1f} (n={machine.matmul_n[d]})" for d, v in machine.peak_gflops.items())
    if not as_json:  # --json: the output is the JSON alone (each row carries the ceilings)
        console.print(
            f"{where}: peak matmul GFLOP/s: {peaks}; read {machine.read_gbs:.1f} GB/s, "
            f"copy {machine.copy_gbs:.1f} GB/s ({machine.stream_bytes >> 20} MiB fp32); roof: {machine.roof_stream}",
            highlight=False,
        )
    rows, skipped = [], []
    with warnings.catch_warnings(record=True) as seen, console.status("benchmarking") as status:
        for cfg in configs:
            status.update(f"{cfg.name} {cfg.dtype}: building weights, kernels and HF blocks")
            result = bench_layer(
                cfg,
                token_list,
                chosen,
                machine=machine,
                target=target,
                repeat=repeat,
                db=db,
                hf_mem_limit=hf_mem_gib * 2**30,
                slow_call_s=slow_call_s,
                on_row=lambda r: status.update(f"{r.preset} {r.dtype} T={r.tokens}: {r.provider} done"),
            )
            rows += result.rows
            skipped += result.skipped
    if not as_json:  # one line each (the runtime's warnings, e.g. stale DB records), not Python's file:line form
        for message in dict.fromkeys(str(w.message) for w in seen):
            err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)
    full = bench_report.report(rows, skipped, machine)
    full["tuned_vs_grouped_mm"] = speedup_over(rows, "tuned", "hf-grouped_mm")
    path = Path(out) if out else Path("results") / where / CSV_NAME
    save = save or out is not None
    if save:
        try:
            append_csv(rows, path)
        except ValueError as exc:
            fail(str(exc))
    if report:
        Path(report).write_text(json.dumps(json_safe(full), indent=1, default=str) + "\n")
    if plot:
        try:
            bench_report.plot(rows, machine, Path(plot))
        except ImportError:
            fail("--plot needs matplotlib: pip install 'moetune[plot]'")
    if as_json:
        print_json([asdict(r) for r in rows])
        return
    console.print(bench_report.table(rows, f"one MoE layer forward on {where} (p50 of {repeat})"))
    for s in skipped:
        console.print(f"skipped {s['provider']} on {s['preset']} {s['dtype']} T={s['tokens'] or 'all'}: {s['reason']}")
    for key in ("tuned_vs_best_hf", "tvm_vs_best_hf"):
        summary = full[key]
        if summary["cells"]:
            per = ", ".join(f"{k[8:]} {v:.2f}x" for k, v in summary.items() if k.startswith("geomean_"))
            console.print(
                f"{summary['provider']} vs best HF provider: geomean {summary['geomean']:.2f}x over "
                f"{summary['cells']} cells ({per})"
            )
    over = full["tuned_vs_grouped_mm"]
    if over["cells"]:
        console.print(f"tuned vs hf-grouped_mm: geomean {over['geomean']:.2f}x over {len(over['cells'])} cells")
    if save:
        console.print(f"rows appended to {path}")
    if "tuned" in chosen:
        from moetune.autotune.tuning.storage import mask_url
        from moetune.kernels.db import default_db_path

        console.print()
        for line in bench_report.verdict(rows, mask_url(str(db or default_db_path()))):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(
            "next: `moetune tune -p <preset> --trials 64` searches longer; `moetune bench` (no -p) times the "
            "four-preset matrix against Hugging Face; `moetune package` ships a model with these kernels",
            highlight=False,
            soft_wrap=True,
        )
