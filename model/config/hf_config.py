"""Hugging Face config -> MoEConfig fields, for every supported MoE family (MoEConfig.from_hf calls this).

Accepts a transformers config object, a plain dict, a config.json path, or a directory holding one, so a
user needs neither transformers nor the weights to describe a model. Keys are read by their config.json
names (with the transformers attribute aliases as fallbacks).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MISSING = object()


class _Keys:
    """Uniform read access to a config object or a config.json dict."""

    def __init__(self, source: Any):
        self.source = source

    def get(self, *names: str, default: Any = _MISSING) -> Any:
        for name in names:
            if isinstance(self.source, dict):
                if name in self.source:
                    return self.source[name]
            elif hasattr(self.source, name):
                return getattr(self.source, name)
        if default is _MISSING:
            raise ValueError(f"HF config has none of the keys {', '.join(names)}")
        return default


def _dtype(k: _Keys) -> str:
    value = k.get("dtype", "torch_dtype", default=None)
    name = str(value).replace("torch.", "") if value is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _softmax_family(k: _Keys, name: str, intermediate: str, norm_default: bool) -> dict[str, Any]:
    return {
        "name": name,
        "router": "softmax",
        "hidden_size": k.get("hidden_size"),
        "intermediate_size": k.get(intermediate),
        "num_experts": k.get("num_local_experts", "num_experts", "n_routed_experts"),
        "top_k": k.get("num_experts_per_tok"),
        "norm_topk_prob": bool(k.get("norm_topk_prob", default=norm_default)),
        "activation": k.get("hidden_act", default="silu"),
    }


def _mixtral(k: _Keys) -> dict[str, Any]:
    return _softmax_family(k, "mixtral", "intermediate_size", norm_default=True)


def _qwen2_moe(k: _Keys) -> dict[str, Any]:
    fields = _softmax_family(k, "qwen2_moe", "moe_intermediate_size", norm_default=False)
    shared = int(k.get("shared_expert_intermediate_size", default=0) or 0)
    if shared:
        fields.update(num_shared_experts=1, shared_intermediate_size=shared, shared_expert_gate=True)
    return fields


def _qwen3_moe(k: _Keys) -> dict[str, Any]:
    return _softmax_family(k, "qwen3_moe", "moe_intermediate_size", norm_default=True)


def _olmoe(k: _Keys) -> dict[str, Any]:
    return _softmax_family(k, "olmoe", "intermediate_size", norm_default=False)


def _deepseek_shared(k: _Keys, fields: dict[str, Any]) -> dict[str, Any]:
    n_shared = int(k.get("n_shared_experts", default=0) or 0)
    if n_shared:
        fields.update(num_shared_experts=n_shared, shared_intermediate_size=fields["intermediate_size"])
    return fields


def _deepseek_v2(k: _Keys) -> dict[str, Any]:
    fields = _softmax_family(k, "deepseek_v2", "moe_intermediate_size", norm_default=False)
    # HF's DeepSeek-V2 router applies no renormalisation whatever norm_topk_prob says.
    fields["norm_topk_prob"] = False
    fields["routed_scaling_factor"] = float(k.get("routed_scaling_factor", default=1.0))
    if k.get("topk_method", default="greedy") == "group_limited_greedy":
        fields.update(n_group=k.get("n_group"), topk_group=k.get("topk_group"), group_score="max")
    return _deepseek_shared(k, fields)


def _deepseek_v3(k: _Keys) -> dict[str, Any]:
    fields = _softmax_family(k, "deepseek_v3", "moe_intermediate_size", norm_default=True)
    fields.update(
        router="sigmoid",
        routed_scaling_factor=float(k.get("routed_scaling_factor", default=1.0)),
        n_group=int(k.get("n_group", default=1) or 1),
        topk_group=int(k.get("topk_group", default=1) or 1),
        group_score="top2_sum",
        score_correction_bias=True,
    )
    return _deepseek_shared(k, fields)


def _gpt_oss(k: _Keys) -> dict[str, Any]:
    return {
        "name": "gpt_oss",
        "router": "topk_softmax",
        "norm_topk_prob": False,
        "router_bias": True,
        "expert_bias": True,
        "activation": "swiglu_oai",
        "hidden_size": k.get("hidden_size"),
        "intermediate_size": k.get("intermediate_size"),
        "num_experts": k.get("num_local_experts", "num_experts"),
        "top_k": k.get("num_experts_per_tok", "experts_per_token"),
        "swiglu_alpha": float(k.get("swiglu_alpha", default=1.702)),
        "swiglu_limit": float(k.get("swiglu_limit", default=7.0)),
    }


def _llama4_text(k: _Keys) -> dict[str, Any]:
    intermediate = k.get("intermediate_size")
    return {
        "name": "llama4",
        "router": "topk_sigmoid",
        "norm_topk_prob": False,
        "apply_router_weight_on_input": True,
        "activation": k.get("hidden_act", default="silu"),
        "hidden_size": k.get("hidden_size"),
        "intermediate_size": intermediate,
        "num_experts": k.get("num_local_experts"),
        "top_k": k.get("num_experts_per_tok"),
        "num_shared_experts": 1,
        "shared_intermediate_size": intermediate,
    }


FAMILIES: dict[str, Callable[[_Keys], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "llama4_text": _llama4_text,
}


def _load(config_or_path: Any) -> Any:
    if isinstance(config_or_path, (str, Path)):
        path = Path(config_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"no HF config at {path}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable JSON config: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object")
        return data
    return config_or_path


def fields_from_hf(config_or_path: Any) -> dict[str, Any]:
    """MoEConfig keyword arguments of a supported HF config (MoEConfig.from_hf builds the config from them)."""
    source = _load(config_or_path)
    keys = _Keys(source)
    model_type = keys.get("model_type", default=None)
    if model_type == "llama4":  # the multimodal wrapper: the MoE lives in its text config
        text = keys.get("text_config")
        keys = _Keys(text)
        model_type = "llama4_text"
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported HF architecture {model_type!r}; supported model types: {', '.join([*FAMILIES, 'llama4'])}"
        )
    fields = FAMILIES[model_type](keys)
    activation = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(
        fields["activation"], fields["activation"]
    )
    return {**fields, "activation": activation, "dtype": _dtype(keys)}
