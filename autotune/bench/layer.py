"""Whole-layer benchmark: moetune against the MoE implementations users would pick instead, one run, same weights.

Providers (all on the same weights and the same rotating inputs, each verified once against the reference
before it is timed; one that does not match is reported and not timed):
  reference       model.MoE, moetune's readable reference (a loop over experts)
  torch           TunedMoE restricted to the torch backend (sort-based, vectorised)
  tvm             TunedMoE on TVM kernels at each op's default schedule point (untuned, DB ignored; CPU)
  triton          ... on Triton kernels at their default points (GPU)
  tvm_cuda        ... TVM-scheduled CUDA GEMMs at their default points, torch route/align (GPU)
  tuned           TunedMoE with the kernel DB's winners (exact M bucket, else the nearest; else defaults)
  hf-eager        transformers' own block of the preset's family, experts_implementation="eager"
  hf-grouped_mm   ... "grouped_mm" (torch grouped_mm over expert-sorted rows)
  hf-batched_mm   ... "batched_mm" (gathers S copies of expert weights: skipped where that exceeds a limit)
  ggml            llama.cpp's tensor library running its own MoE graph (autotune/bench/ggml.py; optional:
                  `pip install 'moetune[anchors]'`, else skipped with a note)
Per cell (preset, dtype, T): p20/p50/p80, useful GFLOP/s, GB/s of the bytes a forward must move (the
experts the routing touched + router + shared + activations, autotune/bench/roofline.py) and % of this machine's
roofline (matmul peak measured in the same run; on a CPU the read bandwidth re-measured around each cell, since a
shared host's bandwidth drifts), speedup over the reference and over the best HF provider. On a CPU the providers
of a cell are timed interleaved call by call (autotune/measure.py: measure_interleaved), so drift hits all alike.
On a GPU (target "cuda") the layer, its weights and the inputs live on the device, calls are timed with CUDA
events or CUDA graph replays (autotune/measure.py), and hf-grouped_mm (transformers' torch._grouped_mm path)
is the baseline the GPU targets name (`speedup_over`).
One CSV row per (cell, provider) with machine, versions, config and timestamp.
Legend: T tokens, H hidden, K top-k.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moetune.autotune.bench.roofline import Machine, experts_touched, layer_bytes, measure_bandwidth
from moetune.autotune.measure import Timing, machine_name, measure, measure_interleaved
from moetune.model.config import MoEConfig

MOETUNE_PROVIDERS = ("reference", "torch", "tvm", "triton", "tvm_cuda", "tuned")
HF_PROVIDERS = ("hf-eager", "hf-grouped_mm", "hf-batched_mm")
ANCHOR_PROVIDERS = ("ggml",)  # other libraries' own MoE graphs, from optional packages
PROVIDERS = MOETUNE_PROVIDERS + HF_PROVIDERS + ANCHOR_PROVIDERS
# the comparison matrix per device: what a user of that device would otherwise run, and moetune untuned / tuned
DEFAULT_PROVIDERS = {
    "cpu": ("reference", *HF_PROVIDERS, "tvm", "tuned"),
    "cuda": ("reference", "hf-eager", "hf-grouped_mm", "torch", "triton", "tvm_cuda", "tuned"),
}
PRESET_PROVIDERS = {"cpu": ("reference", "torch", "tvm", "tuned"), "cuda": ("reference", "torch", "triton", "tuned")}
BACKENDS = {"torch": ("torch",), "tvm": ("tvm",), "triton": ("triton",), "tvm_cuda": ("tvm_cuda", "torch")}
DEFAULT_PRESETS = ("qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b", "gpt-oss-20b")
DEFAULT_TOKENS = (1, 16, 256, 1024)
DEFAULT_DTYPES = ("float32", "bfloat16")
GPU_TOKENS = (1, 16, 256, 1024, 4096)  # the GPU targets: weights-bound at T <= 16, matmul-bound at T >= 4096
CSV_NAME = "layer_bench_v2.csv"  # layer_bench.csv keeps the older, narrower header
VERIFY_TOKENS = 16
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}  # norm-wise rel. error vs the reference
# an anchor quantizes the weights its own way (ggml's Q8_0 / Q4_0 rounding, and int8 activations in its dot
# products): its distance to moetune's reference is a quantization step, not a kernel's rounding
ANCHOR_QUANT_TOLERANCE = {"int8": 5e-2, "int4": 0.3, "w8a8": 5e-2, "w4a8": 0.3}
# w8a8 / w4a8 quantize gemm2's input, gemm1's output, again: a rounding-level difference in gemm1 (integer sums vs
# the reference's fp32 FMAs) moves a value across a rounding boundary now and then, and that input code changes
# by one step (1/127 of its group's largest value). Measured on qwen3-30b-a3b, fp32, T=16: 1.2e-4 norm-wise on
# the Zen5 host (one layout or index error gives ~1). The kernels' own tolerance stays 1e-5 (tests/test_quant_a8).
ACT_QUANT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class BenchRow:
    machine: str
    preset: str  # "<preset>/<shrink>" when H and I were divided for a quick run
    dtype: str
    tokens: int
    provider: str
    p20_ms: float
    p50_ms: float
    p80_ms: float
    n: int  # timed calls (1: a single call over the slow-call limit)
    gflops: float  # useful FLOPs (router + K experts + shared) per second, at p50
    gbps: float  # bytes a forward must move (see roofline.layer_bytes) per second, at p50
    pct_roofline: float  # achieved GFLOP/s / min(peak, bandwidth x intensity), in %
    roofline_gflops: float
    flops: float
    bytes: float
    experts_touched: float  # distinct experts routed to, mean over the input sets
    max_rel_err: float  # against the reference at T=VERIFY_TOKENS (or the smallest T that fits)
    speedup_vs_reference: float  # reference p50 / this p50, same run
    speedup_vs_best_hf: float  # best HF provider's p50 / this p50, same run (nan without HF providers)
    best_hf: str
    peak_gflops: float  # the ceilings measured in this run
    read_gbs: float  # the roof's bandwidth: read on a CPU, copy on a GPU (roofline.Machine.roof_gbs)
    config: str  # JSON: per-op backend and schedule point, or the HF family and experts implementation
    versions: str
    timestamp: str


@dataclass
class Provider:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    describe: Callable[[int], Any]
    fits: Callable[[int], str | None] = lambda t: None  # a reason it cannot run at T, else None
    max_rel_err: float = math.nan


@dataclass
class LayerResult:
    rows: list[BenchRow] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {preset, dtype, tokens, provider, reason}


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__}
    for name, dist in (("tvm", "apache-tvm"), ("triton", "triton"), ("transformers", "transformers")):
        try:
            found[name] = version(dist)
        except PackageNotFoundError:
            found[name] = "none"
    return json.dumps({**found, "threads": torch.get_num_threads()})


def reference_layer(cfg: MoEConfig, device: str = "cpu"):
    from moetune.model.moe import MoE

    torch.manual_seed(0)
    ref = MoE(cfg).eval().requires_grad_(False)
    if cfg.score_correction_bias:
        ref.router.e_score_correction_bias.normal_(std=0.05)
    return ref.to(device)


def make_provider(name: str, ref, target: str, db: Any, hf_mem_limit: float) -> Provider:
    """One provider on `ref`'s weights; ValueError when it cannot run this config at all."""
    from moetune.model.runtime.tuned import TunedMoE

    cfg = ref.cfg
    if name == "reference":
        return Provider(name, ref, lambda t: [])
    if name in BACKENDS or name == "tuned":
        kw = {"backends": BACKENDS[name], "db": False} if name != "tuned" else {"db": db}
        tuned = TunedMoE.from_module(ref, target=target, **kw)
        return Provider(name, tuned, tuned.describe)
    if name == "ggml":
        from moetune.autotune.bench.ggml import GgmlMoE

        layer = GgmlMoE(ref)
        return Provider(name, layer, layer.describe)
    if name not in HF_PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; available: {', '.join(PROVIDERS)}")
    from moetune.autotune.bench.hf import batched_mm_bytes, family, hf_block, hf_forward

    impl = name.removeprefix("hf-")
    block = hf_block(cfg, dict(ref.state_dict()), impl)
    info = {"family": family(cfg), "experts_implementation": impl}

    def fits(t: int) -> str | None:
        need = batched_mm_bytes(cfg, t)
        if impl == "batched_mm" and need > hf_mem_limit:
            return f"batched_mm gathers {need / 2**30:.1f} GiB of expert weights (limit {hf_mem_limit / 2**30:.1f})"
        return None

    return Provider(name, hf_forward(block, cfg.hidden_size), lambda t: info, fits)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item() if torch.isfinite(got).all() else math.inf


def verify(provider: Provider, ref, tokens: list[int]) -> str | None:
    """Compare once with the reference at T=VERIFY_TOKENS (or the largest smaller T that fits); None if it matches.

    fp32: the norm-wise relative error must be within TOLERANCE. bf16/fp16: per token, since a near-tie in the
    router can pick another expert for a token in low precision (HF routes in the weights' dtype, the reference
    in fp32): at least 3/4 of the tokens must be within TOLERANCE (a layout error misses on every token).
    `max_rel_err` records the norm-wise error either way."""
    cfg = ref.cfg
    fitting = [t for t in sorted({VERIFY_TOKENS, *tokens}) if t <= VERIFY_TOKENS and provider.fits(t) is None]
    if not fitting:
        return provider.fits(min(tokens))
    x = torch.randn(fitting[-1], cfg.hidden_size, generator=torch.Generator().manual_seed(7)).to(cfg.torch_dtype)
    x = x.to(ref.router.weight.device)
    with torch.no_grad():
        got, want = provider.fn(x).double().cpu(), ref(x).double().cpu()
    provider.max_rel_err = _rel(got, want)
    limit = TOLERANCE[cfg.dtype]
    if cfg.quant != "none" and provider.name in ANCHOR_PROVIDERS:
        limit = max(limit, ANCHOR_QUANT_TOLERANCE[cfg.quant])
    elif cfg.act_quant:
        limit = max(limit, ACT_QUANT_TOLERANCE)
    if cfg.dtype == "float32":
        ok, what = provider.max_rel_err <= limit, f"rel err {provider.max_rel_err:.3g}"
    else:
        per_token = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)
        good = int((per_token <= limit).sum()) if torch.isfinite(got).all() else 0
        ok, what = 4 * good >= 3 * len(per_token), f"{good}/{len(per_token)} tokens within {limit:g}"
    return None if ok else f"output does not match the reference: {what} (norm-wise {provider.max_rel_err:.3g})"


def time_providers(
    fns: dict[str, Callable], inputs: list[torch.Tensor], repeat: int, slow_call_s: float, device: str = "cpu"
) -> dict[str, Timing]:
    """Each provider's timing after one timed warm-up call (one slower than `slow_call_s` is that provider's only
    sample). CPU: the rest interleaved call by call (measure_interleaved), so the cell's ratios survive the
    host's drift; GPU: measure() per provider, on the device's clock."""
    timings, rest = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn(inputs[-1])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        if first > slow_call_s:
            timings[name] = Timing(first * 1e3, first * 1e3, first * 1e3, 1)
        elif device.startswith("cuda"):
            timings[name] = measure(fn, inputs, warmup=1, repeat=repeat, device=device)
        else:
            rest[name] = fn
    timings.update(measure_interleaved(rest, inputs, warmup=1, repeat=repeat) if rest else {})
    return {name: timings[name] for name in fns}


def bench_layer(
    cfg: MoEConfig,
    tokens: list[int],
    providers: tuple[str, ...] = DEFAULT_PROVIDERS["cpu"],
    machine: Machine | None = None,
    target: str = "cpu",
    repeat: int = 10,
    db: Any = None,
    hf_mem_limit: float = 4 * 2**30,
    slow_call_s: float = 30.0,
    on_row: Callable[[BenchRow], None] | None = None,
) -> LayerResult:
    """Every provider at every T on one config's layer; rows in provider order per T.

    target: "cpu" or a GPU ("cuda"): the layer and its inputs live on that device."""
    from moetune.ir.target import resolve_target

    device = resolve_target(target).torch_device
    result, preset = LayerResult(), cfg.name or "custom"
    ref = reference_layer(cfg, device)
    impls: dict[str, Provider] = {}
    for name in providers:
        try:
            p = make_provider(name, ref, target, db, hf_mem_limit)
            reason = verify(p, ref, tokens)
        except (ValueError, ImportError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if reason is None:
            impls[name] = p
        else:
            result.skipped.append(
                {"preset": preset, "dtype": cell_dtype(cfg), "tokens": None, "provider": name, "reason": reason}
            )
    machine_, vers = machine_name(device), versions()
    for t in tokens:
        inputs = [torch.randn(t, cfg.hidden_size, device=device).to(cfg.torch_dtype) for _ in range(3)]
        with torch.no_grad():
            touched = sum(experts_touched(ref.route(x)[1]) for x in inputs) / len(inputs)
        flops, nbytes = cfg.flops_per_token() * t, layer_bytes(cfg, t, touched)
        fns = {}
        probe = _bandwidth_probe(machine, device)
        for name, p in impls.items():
            reason = p.fits(t)
            if reason:
                result.skipped.append(
                    {"preset": preset, "dtype": cell_dtype(cfg), "tokens": t, "provider": name, "reason": reason}
                )
                continue
            fns[name] = p.fn
        with torch.no_grad():
            timings = time_providers(fns, inputs, repeat, slow_call_s, device)
        hf = {k: v.p50_ms for k, v in timings.items() if k in HF_PROVIDERS}
        best_hf = min(hf, key=hf.get) if hf else ""
        base = timings.get("reference")
        cell = probe()  # the machine as it was around this cell's timings
        peak = cell.peak_for(cfg.dtype) if cell else math.nan
        bw = cell.roof_gbs if cell else math.nan
        roof = cell.roof_gflops(flops, nbytes, cfg.dtype) if cell else math.nan
        for name, timing in timings.items():
            seconds = timing.p50_ms * 1e-3
            row = BenchRow(
                machine=machine_,
                preset=preset,
                dtype=cell_dtype(cfg),
                tokens=t,
                provider=name,
                p20_ms=round(timing.p20_ms, 4),
                p50_ms=round(timing.p50_ms, 4),
                p80_ms=round(timing.p80_ms, 4),
                n=timing.n,
                gflops=_sig(flops / seconds / 1e9),
                gbps=_sig(nbytes / seconds / 1e9),
                pct_roofline=_sig(100 * flops / seconds / 1e9 / roof) if machine else math.nan,
                roofline_gflops=_sig(roof),
                flops=flops,
                bytes=round(nbytes),
                experts_touched=round(touched, 2),
                max_rel_err=impls[name].max_rel_err,
                speedup_vs_reference=_sig(base.p50_ms / timing.p50_ms) if base else math.nan,
                speedup_vs_best_hf=_sig(hf[best_hf] / timing.p50_ms) if hf else math.nan,
                best_hf=best_hf,
                peak_gflops=peak,
                read_gbs=bw,
                config=json.dumps(impls[name].describe(t)),
                versions=vers,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )
            result.rows.append(row)
            if on_row:
                on_row(row)
    return result


def cell_dtype(cfg: MoEConfig) -> str:
    """A row's weight format: the dtype, or "int8/float32" for int8 experts with fp32 activations."""
    return cfg.dtype if cfg.quant == "none" else f"{cfg.quant}/{cfg.dtype}"


CELL_PROBE_BYTES = 256 << 20


def _bandwidth_probe(machine: Machine | None, device: str) -> Callable[[], Machine | None]:
    """Read bandwidth measured now; the returned function measures it again and gives the machine with the
    higher of the two as its read roof. A shared 2-vCPU host's bandwidth moves (measured on the Zen4 machine:
    47 GB/s, then 30 GB/s for minutes): a % of a roof taken once at the start of a long run means little."""
    if machine is None or device != "cpu" or machine.stream_bytes < (1 << 20):  # no probe for a given machine
        return lambda: machine
    nbytes = min(CELL_PROBE_BYTES, machine.stream_bytes)
    before = measure_bandwidth(nbytes, calls=3)[0]

    def after() -> Machine:
        read = max(before, measure_bandwidth(nbytes, calls=3)[0])
        return dataclasses.replace(machine, read_gbs=round(read, 2))

    return after


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def geomean(values: list[float]) -> float:
    good = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in good) / len(good)) if good else math.nan


def tuned_vs_hf(rows: list[BenchRow], provider: str = "tuned") -> dict[str, Any]:
    """Per cell: `provider`'s speedup over the best HF provider; their geometric mean (overall and per dtype)."""
    cells = [r for r in rows if r.provider == provider and math.isfinite(r.speedup_vs_best_hf)]
    out: dict[str, Any] = {
        "provider": provider,
        "cells": len(cells),
        "geomean": geomean([r.speedup_vs_best_hf for r in cells]),
    }
    for dtype in dict.fromkeys(r.dtype for r in cells):
        out[f"geomean_{dtype}"] = geomean([r.speedup_vs_best_hf for r in cells if r.dtype == dtype])
    return out


def speedup_over(rows: list[BenchRow], provider: str, baseline: str) -> dict[str, Any]:
    """Per cell with both: baseline p50 / provider p50 (e.g. tuned over hf-grouped_mm, the GPU target); geomean."""
    p50 = {(r.preset, r.dtype, r.tokens, r.provider): r.p50_ms for r in rows}
    cells = {
        f"{pre} {dt} T={t}": p50[(pre, dt, t, baseline)] / ms
        for (pre, dt, t, name), ms in p50.items()
        if name == provider and (pre, dt, t, baseline) in p50
    }
    return {"provider": provider, "baseline": baseline, "geomean": geomean(list(cells.values())), "cells": cells}


def append_csv(rows: list[BenchRow], path: Path) -> None:
    """Append rows; a file whose header is not this one is never appended to (ValueError: use another name)."""
    fields = list(BenchRow.__dataclass_fields__)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{path} has another header (an older bench schema); write to a new file with --out")
    new = not path.exists() or not path.stat().st_size
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
