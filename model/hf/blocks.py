"""Hugging Face sparse-MoE blocks read as moetune layers: the MoEConfig inferred from the modules, the weights
in moetune's layout (MoE.from_hf_block copies them into a reference MoE; TunedMoE reads them in place).

Supported blocks (transformers 5.x): MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock,
OlmoeSparseMoeBlock, DeepseekV2Moe, DeepseekV3MoE, GptOssMLP, Llama4TextMoe. The config is read off the
modules themselves (shapes, router attributes), so a block works without its model config.

Layout conversions into moetune's canonical (E, 2I, H) [gate | up] / (E, H, I):
  gpt-oss   gate_up_proj (E, H, 2I) with gate/up interleaved on the last dim; down_proj (E, I, H)
  Llama 4   gate_up_proj (E, H, 2I) as [gate | up];                          down_proj (E, I, H)
  others    already canonical
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moetune.model.config import MoEConfig

_SOFTMAX_BLOCKS = (
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
    "DeepseekV2Moe",
)
SUPPORTED_BLOCKS = (*_SOFTMAX_BLOCKS, "DeepseekV3MoE", "GptOssMLP", "Llama4TextMoe")

_PROBE_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "relu": F.relu,
}


def _activation_name(act: nn.Module) -> str:
    """Identify an HF activation module by its values on a probe (class names vary across versions)."""
    probe = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        got = act(probe)
    for name, fn in _PROBE_ACTS.items():
        if torch.allclose(got, fn(probe), atol=1e-6):
            return name
    raise ValueError(f"unsupported activation {type(act).__name__}; supported: {', '.join(_PROBE_ACTS)}")


def _mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An HF gated MLP (gate_proj / up_proj / down_proj Linear) -> (gate_up (2Is, H), down (H, Is))."""
    return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0), mlp.down_proj.weight


def _shared(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    return mlp, getattr(block, "shared_expert_gate", None)


def _config(block: nn.Module) -> dict[str, Any]:
    kind = type(block).__name__
    ex = block.experts
    e = ex.gate_up_proj.shape[0]
    fields: dict[str, Any] = {"name": kind, "num_experts": e, "dtype": str(ex.gate_up_proj.dtype)[6:]}
    if kind in _SOFTMAX_BLOCKS or kind == "DeepseekV3MoE":
        gate = block.gate
        _, two_i, h = ex.gate_up_proj.shape
        fields.update(
            hidden_size=h,
            intermediate_size=two_i // 2,
            top_k=gate.top_k,
            activation=_activation_name(ex.act_fn),
            norm_topk_prob=bool(getattr(gate, "norm_topk_prob", kind == "MixtralSparseMoeBlock")),
            routed_scaling_factor=float(getattr(gate, "routed_scaling_factor", 1.0)),
        )
        if kind == "DeepseekV2Moe":
            fields["norm_topk_prob"] = False  # HF's V2 router never renormalises
            if gate.topk_method == "group_limited_greedy":
                fields.update(n_group=gate.num_group, topk_group=gate.topk_group, group_score="max")
        if kind == "DeepseekV3MoE":
            fields.update(
                router="sigmoid",
                n_group=gate.num_group,
                topk_group=gate.topk_group,
                group_score="top2_sum",
                score_correction_bias=True,
            )
    elif kind == "GptOssMLP":
        _, h, two_i = ex.gate_up_proj.shape
        fields.update(
            hidden_size=h,
            intermediate_size=two_i // 2,
            top_k=block.router.top_k,
            router="topk_softmax",
            norm_topk_prob=False,
            router_bias=True,
            expert_bias=True,
            activation="swiglu_oai",
            swiglu_alpha=float(ex.alpha),
            swiglu_limit=float(ex.limit),
        )
    elif kind == "Llama4TextMoe":
        _, h, two_i = ex.gate_up_proj.shape
        fields.update(
            hidden_size=h,
            intermediate_size=two_i // 2,
            top_k=block.router.top_k,
            router="topk_sigmoid",
            norm_topk_prob=False,
            apply_router_weight_on_input=True,
            activation=_activation_name(ex.act_fn),
        )
    else:
        raise ValueError(f"unsupported HF MoE block {kind}; supported: {', '.join(SUPPORTED_BLOCKS)}")
    mlp, shared_gate = _shared(block)
    if mlp is not None:
        n_shared = int(getattr(getattr(block, "config", None), "n_shared_experts", 1) or 1)
        width = mlp.down_proj.weight.shape[1]
        if width % n_shared:
            n_shared = 1
        fields.update(
            num_shared_experts=n_shared,
            shared_intermediate_size=width // n_shared,
            shared_expert_gate=shared_gate is not None,
        )
    return fields


# (is_concatenated, is_transposed) of the blocks whose experts are not in moetune's layout; the same flags
# transformers' `use_experts_implementation` puts on its experts classes.
_EXPERT_LAYOUTS = {"GptOssMLP": (False, True), "Llama4TextMoe": (True, True)}


def experts_weights(ex: nn.Module, concatenated: bool = True, transposed: bool = False) -> dict[str, torch.Tensor]:
    """An HF experts module's tensors in moetune's layout: gate_up_proj (E, 2I, H) [gate | up], down_proj
    (E, H, I), and gate_up_bias / down_bias when it has biases. `transposed`: stored as (E, H, 2I) / (E, I, H)
    (views, no copy); not `concatenated`: gate and up interleaved on the 2I axis (one copy)."""
    gu, down = ex.gate_up_proj, ex.down_proj
    gu_b, down_b = getattr(ex, "gate_up_proj_bias", None), getattr(ex, "down_proj_bias", None)
    if transposed:
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    if not concatenated:
        gu = torch.cat([gu[:, ::2], gu[:, 1::2]], dim=1)
        gu_b = torch.cat([gu_b[..., ::2], gu_b[..., 1::2]], dim=-1) if gu_b is not None else None
    out = {"gate_up_proj": gu, "down_proj": down}
    if gu_b is not None:
        out.update(gate_up_bias=gu_b, down_bias=down_b)
    return out


def hf_block_config(block: nn.Module) -> MoEConfig:
    """The MoEConfig of a supported HF MoE block, read off its modules."""
    kind = type(block).__name__
    if kind not in SUPPORTED_BLOCKS:
        raise ValueError(f"unsupported HF MoE block {kind}; supported: {', '.join(SUPPORTED_BLOCKS)}")
    return MoEConfig(**_config(block))


def hf_block_weights(block: nn.Module, cfg: MoEConfig, kind: str | None = None) -> dict[str, torch.Tensor]:
    """The block's tensors under moetune's state_dict names, in moetune's layout.

    Views of the block's own parameters where the layouts agree (no copy; Llama 4's transposes are views
    too); gpt-oss's interleaved gate/up and the shared expert's separate gate/up Linears are concatenated
    (copies). `kind`: the block's class name, when `block` is a module holding its children (TunedMoE)."""
    kind = kind or type(block).__name__
    router = block.router if kind in _EXPERT_LAYOUTS else block.gate
    routed = experts_weights(block.experts, *_EXPERT_LAYOUTS.get(kind, (True, False)))
    state = {"router.weight": router.weight, **{f"experts.{k}": v for k, v in routed.items()}}
    if cfg.router_bias:
        state["router.bias"] = router.bias
    if cfg.score_correction_bias:
        state["router.e_score_correction_bias"] = router.e_score_correction_bias
    mlp, shared_gate = _shared(block)
    if mlp is not None:
        state["shared_expert.gate_up_proj"], state["shared_expert.down_proj"] = _mlp_weights(mlp)
        if shared_gate is not None:
            state["shared_expert.gate_weight"] = shared_gate.weight
    return {k: v.detach() for k, v in state.items()}


# What a block's forward returns besides the output, per family: gpt-oss returns (out, router scores (T, K)),
# Llama 4 (out (T, H), router logits (T, E)); the others the output alone. Arguments: out (..., H), the flat
# input x2 (T, H), the routing weights (T, K) and the weights in moetune's layout.
_RETURNS = {
    "GptOssMLP": lambda out, x2, weights, w: (out, weights.to(out.dtype)),
    "Llama4TextMoe": lambda out, x2, weights, w: (out.reshape(x2.shape), F.linear(x2, w["router.weight"])),
}


def block_returns(kind: str):
    """The function that turns a block's output into what `kind`'s forward returns (see _RETURNS)."""
    return _RETURNS.get(kind, lambda out, x2, weights, w: out)
