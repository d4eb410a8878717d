"""moetune.model: the MoE layer definition (MoEConfig, presets, HF configs), the reference MoE module, and the
drop-in TunedMoE that runs it on tuned kernels.

Public API: MoEConfig, MoE, TunedMoE. TunedMoE is imported lazily: it depends on ir/ and kernels/, which
themselves import model.config, so an eager import here would be circular.
"""

from moetune.model.config import MoEConfig
from moetune.model.moe import MoE

__all__ = ["MoE", "MoEConfig", "TunedMoE"]


def __getattr__(name: str):
    if name == "TunedMoE":
        from moetune.model.tuned import TunedMoE

        return TunedMoE
    raise AttributeError(f"module 'moetune.model' has no attribute {name!r}")
