"""moetune.model: the MoE layer definition (MoEConfig, presets, HF configs) and the reference MoE module.

Public API: MoEConfig, MoE.
"""

from moetune.model.config import MoEConfig
from moetune.model.moe import MoE

__all__ = ["MoE", "MoEConfig"]
