"""moetune.autotune: tuning, benchmarking and the `moetune` command line (the end of the flow).

tuning/         tune(): Optuna studies per op and M bucket, isolated trials, winners into the kernel DB
bench/          whole-layer benchmarks against Hugging Face's implementations, with this machine's roofline
sampler_study/  how many trials each sampler needs (exhaustive grids, samplers replayed on them)
cli/            the typer app: one module per command group
measure.py      timing (warm-up, rotating inputs, p20/p50/p80; CUDA events on a GPU), shared by all of them

Public API: tune(cfg, target=..., m=[...], trials=..., db=...) -> TuneReport (tuning/tuner.py), imported on
first use so that the CLI's --help does not pay for importing Optuna and TVM.
"""

import importlib

__all__ = ["TuneReport", "tune"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("moetune.autotune.tuning.tuner"), name)
    raise AttributeError(f"module 'moetune.autotune' has no attribute {name!r}")
