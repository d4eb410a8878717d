"""Hugging Face transformers' own MoE blocks as benchmark providers, on moetune's weights.

For a MoEConfig this builds the sparse-MoE block of the matching HF family from an HF config of the same
shape (on the meta device: no second random init of billions of weights), loads moetune's weights into it
(the inverse of model/hf/blocks.py's conversion), and selects one of transformers' experts implementations
through the config (`config._experts_implementation`, which the experts module's forward dispatches on):
  eager        HF's per-expert loop (the module's own forward)
  grouped_mm   sort by expert + torch grouped_mm (transformers.integrations.moe)
  batched_mm   gathers every routed row's expert weights (S x expert size bytes): only where that fits
Llama 4's experts class does not use the experts interface (it runs every expert densely): eager only.

Layouts (moetune's canonical gate_up (E, 2I, H) [gate | up], down (E, H, I)):
  gpt-oss   gate_up (E, H, 2I) with gate/up interleaved on the last dim, biases interleaved; down (E, I, H)
  Llama 4   gate_up (E, H, 2I) as [gate | up]; down (E, I, H)
  others    the same layout: the HF block holds moetune's tensors themselves (no copy)
Legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K routed rows, Is shared intermediate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moetune.autotune.bench.roofline import expert_bytes
from moetune.model.config import MoEConfig

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
_TRANSPOSED = ("gpt_oss", "llama4_text")  # experts stored (E, H, 2I) / (E, I, H); router named `router`


def family(cfg: MoEConfig) -> str:
    """The HF model type whose MoE block computes what `cfg` describes (ValueError if none does)."""
    if not cfg.gated:
        raise ValueError("no Hugging Face MoE family has non-gated experts")
    if cfg.router == "topk_softmax" and cfg.activation == "swiglu_oai":
        return "gpt_oss"
    if cfg.router == "topk_sigmoid" and cfg.apply_router_weight_on_input and cfg.top_k == 1:
        return "llama4_text"
    if cfg.router == "sigmoid" and cfg.score_correction_bias:
        return "deepseek_v3"
    if cfg.router == "softmax" and cfg.activation == "silu" and not cfg.expert_bias and not cfg.router_bias:
        if cfg.shared_expert_gate:
            return "qwen2_moe"
        if cfg.num_shared_experts or cfg.routed_scaling_factor != 1.0 or cfg.n_group > 1:
            return "deepseek_v2"
        if cfg.name.startswith("mixtral") and cfg.norm_topk_prob:
            return "mixtral"
        return "qwen3_moe" if cfg.norm_topk_prob else "olmoe"
    raise ValueError(f"no Hugging Face MoE family matches router={cfg.router}, activation={cfg.activation}")


def hf_config(cfg: MoEConfig, implementation: str = "eager"):
    """A transformers config of `cfg`'s family and shape, asking for one experts implementation."""
    from transformers import AutoConfig

    fam = family(cfg)
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k
    kw: dict = {"hidden_size": h, "num_attention_heads": 1, "num_key_value_heads": 1, "num_experts_per_tok": k}
    if fam in ("mixtral", "gpt_oss", "llama4_text"):
        kw.update(intermediate_size=i, num_local_experts=e)
    elif fam == "olmoe":
        kw.update(intermediate_size=i, num_experts=e, norm_topk_prob=cfg.norm_topk_prob)
    elif fam in ("qwen2_moe", "qwen3_moe"):
        kw.update(moe_intermediate_size=i, num_experts=e, norm_topk_prob=cfg.norm_topk_prob)
        if fam == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = cfg.shared_size
    else:  # deepseek_v2 / v3
        kw.update(
            moe_intermediate_size=i,
            n_routed_experts=e,
            n_shared_experts=cfg.num_shared_experts or None,
            routed_scaling_factor=cfg.routed_scaling_factor,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
        )
        if fam == "deepseek_v2":
            kw["topk_method"] = "group_limited_greedy" if cfg.n_group > 1 else "greedy"
    if fam == "gpt_oss":
        kw.update(swiglu_limit=cfg.swiglu_limit, head_dim=h)
    if fam == "llama4_text":
        kw.update(head_dim=h, intermediate_size_mlp=cfg.shared_size or i)
    hf = AutoConfig.for_model(fam, **kw)
    hf._experts_implementation = implementation
    return hf


def _block_class(fam: str) -> type[nn.Module]:
    import importlib

    name = {
        "mixtral": "MixtralSparseMoeBlock",
        "qwen2_moe": "Qwen2MoeSparseMoeBlock",
        "qwen3_moe": "Qwen3MoeSparseMoeBlock",
        "olmoe": "OlmoeSparseMoeBlock",
        "deepseek_v2": "DeepseekV2Moe",
        "deepseek_v3": "DeepseekV3MoE",
        "gpt_oss": "GptOssMLP",
        "llama4_text": "Llama4TextMoe",
    }[fam]
    module = "llama4" if fam == "llama4_text" else fam
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


def hf_state(cfg: MoEConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moetune state_dict (names and layout of model/moe.py) -> the HF block's state_dict."""
    fam = family(cfg)
    i = cfg.intermediate_size
    router = "router" if fam in _TRANSPOSED else "gate"
    out = {f"{router}.weight": weights["router.weight"]}
    if cfg.router_bias:
        out[f"{router}.bias"] = weights["router.bias"]
    if cfg.score_correction_bias:
        out["gate.e_score_correction_bias"] = weights["router.e_score_correction_bias"]
    gu, down = weights["experts.gate_up_proj"], weights["experts.down_proj"]  # (E, 2I, H), (E, H, I)
    if fam == "gpt_oss":  # [gate | up] -> gate0, up0, gate1, up1, ... on the 2I axis
        gu = torch.stack((gu[:, :i], gu[:, i:]), dim=2).flatten(1, 2)
        b = weights["experts.gate_up_bias"]
        out["experts.gate_up_proj_bias"] = torch.stack((b[:, :i], b[:, i:]), dim=2).flatten(1, 2)
        out["experts.down_proj_bias"] = weights["experts.down_bias"]
    if fam in _TRANSPOSED:
        gu, down = gu.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    out["experts.gate_up_proj"], out["experts.down_proj"] = gu, down
    if cfg.num_shared_experts:
        prefix = "shared_experts" if fam.startswith("deepseek") else "shared_expert"
        s, sgu = cfg.shared_size, weights["shared_expert.gate_up_proj"]  # (2Is, H)
        out[f"{prefix}.gate_proj.weight"], out[f"{prefix}.up_proj.weight"] = sgu[:s], sgu[s:]
        out[f"{prefix}.down_proj.weight"] = weights["shared_expert.down_proj"]
        if cfg.shared_expert_gate:
            out["shared_expert_gate.weight"] = weights["shared_expert.gate_weight"]
    return out


def hf_block(cfg: MoEConfig, weights: dict[str, torch.Tensor], implementation: str = "eager") -> nn.Module:
    """The HF block of `cfg`'s family holding `weights` (moetune names), running `implementation`."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown HF experts implementation {implementation!r}; available: {IMPLEMENTATIONS}")
    fam = family(cfg)
    if fam == "llama4_text" and implementation != "eager":
        raise ValueError("Llama 4's experts class does not use transformers' experts interface (eager only)")
    config = hf_config(cfg, implementation)
    with torch.device("meta"):
        block = _block_class(fam)(config)
    block.load_state_dict(hf_state(cfg, weights), strict=True, assign=True)
    return block.eval().requires_grad_(False)


def batched_mm_bytes(cfg: MoEConfig, tokens: int) -> int:
    """What batched_mm gathers: every routed row's copy of its expert's weights (S x expert bytes)."""
    return tokens * cfg.top_k * expert_bytes(cfg)


def hf_forward(block: nn.Module, hidden: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (T, H) -> (T, H) through the block (HF blocks take (B, S, H); gpt-oss and Llama 4 return a pair)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        out = block(x.unsqueeze(0))
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(-1, hidden)

    return run
