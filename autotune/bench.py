"""Whole-layer benchmark: the reference MoE vs TunedMoE on each backend, side by side in one run.

Providers (all on the same weights and the same rotating inputs):
  reference   model.MoE, the readable reference (a loop over experts)
  torch       TunedMoE restricted to the torch backend (sort-based, vectorised)
  tvm         TunedMoE on TVM kernels with each op's default schedule point (untuned, DB ignored)
  tuned       TunedMoE with the kernel DB's winners (exact M bucket, else the nearest; else defaults)
One CSV row per (preset, dtype, T, provider) with machine, versions, config and timestamp.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moetune.autotune.measure import Timing, machine_name, measure
from moetune.model.config import MoEConfig

PROVIDERS = ("reference", "torch", "tvm", "tuned")


@dataclass(frozen=True)
class BenchRow:
    machine: str
    preset: str
    dtype: str
    tokens: int
    provider: str
    p20_ms: float
    p50_ms: float
    p80_ms: float
    n: int
    gflops: float  # useful FLOPs (router + K experts + shared) per second, at p50
    speedup_vs_reference: float  # reference p50 / this p50, same run
    config: str  # JSON: per-op backend and schedule point
    versions: str
    timestamp: str


def _versions() -> str:
    import tvm

    return json.dumps({"torch": torch.__version__, "tvm": tvm.__version__, "threads": torch.get_num_threads()})


def _providers(ref, names: tuple[str, ...], target: str, db: Any) -> dict[str, tuple[Callable[[Any], Any], Any]]:
    from moetune.model.tuned import TunedMoE

    out: dict[str, tuple[Callable[[Any], Any], Any]] = {}
    for name in names:
        if name == "reference":
            out[name] = (ref, None)
        elif name in ("torch", "tvm"):
            tuned = TunedMoE.from_module(ref, target=target, backends=(name,), db=False)
            out[name] = (tuned, tuned)
        elif name == "tuned":
            tuned = TunedMoE.from_module(ref, target=target, db=db)
            out[name] = (tuned, tuned)
        else:
            raise ValueError(f"unknown provider {name!r}; available: {', '.join(PROVIDERS)}")
    return out


def bench_layer(
    cfg: MoEConfig,
    tokens: list[int],
    providers: tuple[str, ...] = PROVIDERS,
    target: str = "cpu",
    repeat: int = 10,
    on_row: Callable[[BenchRow], None] | None = None,
    db: Any = None,
) -> list[BenchRow]:
    from moetune.model.moe import MoE

    torch.manual_seed(0)
    ref = MoE(cfg).eval()
    if cfg.score_correction_bias:
        ref.router.e_score_correction_bias.normal_(std=0.05)
    impls = _providers(ref, providers, target, db)
    rows, machine, versions = [], machine_name(), _versions()
    for t in tokens:
        inputs = [torch.randn(t, cfg.hidden_size, dtype=cfg.torch_dtype) for _ in range(3)]
        timings: dict[str, Timing] = {}
        with torch.no_grad():
            for name, (fn, _) in impls.items():
                timings[name] = measure(fn, inputs, repeat=repeat)
        base = timings.get("reference")
        for name, timing in timings.items():
            tuned = impls[name][1]
            row = BenchRow(
                machine=machine,
                preset=cfg.name or "custom",
                dtype=cfg.dtype,
                tokens=t,
                provider=name,
                p20_ms=round(timing.p20_ms, 4),
                p50_ms=round(timing.p50_ms, 4),
                p80_ms=round(timing.p80_ms, 4),
                n=timing.n,
                gflops=round(cfg.flops_per_token() * t / (timing.p50_ms * 1e-3) / 1e9, 3),
                speedup_vs_reference=round(base.p50_ms / timing.p50_ms, 3) if base else float("nan"),
                config=json.dumps(tuned.describe(t) if tuned is not None else []),
                versions=versions,
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def append_csv(rows: list[BenchRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(BenchRow.__dataclass_fields__))
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
