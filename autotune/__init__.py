"""moetune.autotune: the search (Optuna), measurement, kernel database and the `moetune` CLI.

Public API: tune(cfg, target=..., m=[...], trials=..., db=...) -> TuneReport (implemented in tuner.py).
Imported lazily so that the CLI's --help does not pay for importing Optuna and TVM.
"""

import importlib

__all__ = ["TuneReport", "tune"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("moetune.autotune.tuner"), name)
    raise AttributeError(f"module 'moetune.autotune' has no attribute {name!r}")
