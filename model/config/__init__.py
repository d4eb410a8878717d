"""The description of an MoE layer every other stage reads: MoEConfig, the presets of published models, and
the reading of Hugging Face configs. The start of the flow: it imports nothing else of moetune.

moe_config.py  MoEConfig (routers, activations, dtypes, shared experts; JSON round trip)
presets.py     named shapes of real published MoE layers
hf_config.py   a transformers config / config.json -> MoEConfig fields, per model family
"""

from moetune.model.config.moe_config import MoEConfig

__all__ = ["MoEConfig"]
