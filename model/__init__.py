"""moetune.model: the MoE layer definition (MoEConfig, presets, HF configs), the reference MoE module, and the
drop-in TunedMoE that runs it on tuned kernels.

Public API: MoEConfig, MoE, TunedMoE, patch, register_hf, package, load. All but the first two are imported
lazily: they depend on ir/ and kernels/, which themselves import model.config, so an eager import here would
be circular.
"""

from moetune.model.config import MoEConfig
from moetune.model.moe import MoE

__all__ = ["MoE", "MoEConfig", "TunedMoE", "load", "package", "patch", "register_hf"]

_LAZY = {
    "TunedMoE": "moetune.model.tuned",
    "patch": "moetune.model.hf",
    "register_hf": "moetune.model.hf",
    "package": "moetune.model.packaging",
    "load": "moetune.model.packaging",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moetune.model' has no attribute {name!r}")
