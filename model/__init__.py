"""moetune.model: the MoE layer definition and the modules that run it.

config/    MoEConfig, presets, Hugging Face configs: what every other stage reads (the start of the flow)
moe.py     MoE, the readable reference nn.Module
runtime/   TunedMoE: the same layer on tuned kernels (the end of the flow: it reads the kernel DB)
hf/        Hugging Face blocks as moetune layers; patch(model), register_hf()
packaging.py  package(model, dir) / load(dir): weights, configs, kernel records, manifest
distill/   a dense teacher -> an MoE student

Public API: MoEConfig, MoE, TunedMoE, patch, register_hf, package, load. Each is imported on first use, so
that `from moetune.model.config import MoEConfig` (as ir/ and kernels/ do) loads the config alone.
"""

import importlib

__all__ = ["MoE", "MoEConfig", "TunedMoE", "load", "package", "patch", "register_hf"]

_LAZY = {
    "MoEConfig": "moetune.model.config",
    "MoE": "moetune.model.moe",
    "TunedMoE": "moetune.model.runtime.tuned",
    "patch": "moetune.model.hf.patch",
    "register_hf": "moetune.model.hf.patch",
    "package": "moetune.model.packaging",
    "load": "moetune.model.packaging",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moetune.model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
