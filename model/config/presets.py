"""Named MoE layer shapes of real published models, from their public config.json files.

Each entry holds the MoEConfig fields of one MoE layer (dtype is the released checkpoint's). The field
names in the comments are the config.json keys the numbers come from. MoEConfig.preset(name) builds one;
MoEConfig.presets() lists them.
"""

from __future__ import annotations

from typing import Any

_MIXTRAL = {"router": "softmax", "norm_topk_prob": True, "activation": "silu", "dtype": "bfloat16"}
_QWEN = {"router": "softmax", "activation": "silu", "dtype": "bfloat16"}
_GPT_OSS = {
    "router": "topk_softmax",
    "norm_topk_prob": False,
    "router_bias": True,
    "expert_bias": True,
    "activation": "swiglu_oai",
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "dtype": "bfloat16",
}
# Llama 4: top-1 on the logits, sigmoid of the chosen logit scales the expert's *input*; one shared
# expert of the same width (Llama4TextMLP(config) uses config.intermediate_size).
_LLAMA4 = {
    "router": "topk_sigmoid",
    "norm_topk_prob": False,
    "apply_router_weight_on_input": True,
    "activation": "silu",
    "num_shared_experts": 1,
    "dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {
    # mistralai/Mixtral-8x7B-v0.1: hidden_size, intermediate_size, num_local_experts, num_experts_per_tok
    "mixtral-8x7b": {**_MIXTRAL, "hidden_size": 4096, "intermediate_size": 14336, "num_experts": 8, "top_k": 2},
    # mistralai/Mixtral-8x22B-v0.1
    "mixtral-8x22b": {**_MIXTRAL, "hidden_size": 6144, "intermediate_size": 16384, "num_experts": 8, "top_k": 2},
    # Qwen/Qwen1.5-MoE-A2.7B: moe_intermediate_size 1408, shared_expert_intermediate_size 5632 (gated)
    "qwen1.5-moe-a2.7b": {
        **_QWEN,
        "hidden_size": 2048,
        "intermediate_size": 1408,
        "num_experts": 60,
        "top_k": 4,
        "norm_topk_prob": False,
        "num_shared_experts": 1,
        "shared_intermediate_size": 5632,
        "shared_expert_gate": True,
    },
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": {
        **_QWEN,
        "hidden_size": 2048,
        "intermediate_size": 768,
        "num_experts": 128,
        "top_k": 8,
        "norm_topk_prob": True,
    },
    # Qwen/Qwen3-235B-A22B
    "qwen3-235b-a22b": {
        **_QWEN,
        "hidden_size": 4096,
        "intermediate_size": 1536,
        "num_experts": 128,
        "top_k": 8,
        "norm_topk_prob": True,
    },
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": {
        "router": "softmax",
        "norm_topk_prob": False,
        "activation": "silu",
        "dtype": "bfloat16",
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_experts": 64,
        "top_k": 8,
    },
    # deepseek-ai/DeepSeek-V2-Lite: n_routed_experts 64, n_shared_experts 2, topk_method greedy
    "deepseek-v2-lite": {
        "router": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "activation": "silu",
        "dtype": "bfloat16",
        "hidden_size": 2048,
        "intermediate_size": 1408,
        "num_experts": 64,
        "top_k": 6,
        "num_shared_experts": 2,
        "shared_intermediate_size": 1408,
    },
    # deepseek-ai/DeepSeek-V3: scoring_func sigmoid, topk_method noaux_tc, n_group 8, topk_group 4
    "deepseek-v3": {
        "router": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "group_score": "top2_sum",
        "score_correction_bias": True,
        "activation": "silu",
        "dtype": "bfloat16",
        "hidden_size": 7168,
        "intermediate_size": 2048,
        "num_experts": 256,
        "top_k": 8,
        "num_shared_experts": 1,
        "shared_intermediate_size": 2048,
    },
    # openai/gpt-oss-20b: num_local_experts 32, experts_per_token 4, swiglu_limit 7.0
    "gpt-oss-20b": {**_GPT_OSS, "hidden_size": 2880, "intermediate_size": 2880, "num_experts": 32, "top_k": 4},
    # openai/gpt-oss-120b
    "gpt-oss-120b": {**_GPT_OSS, "hidden_size": 2880, "intermediate_size": 2880, "num_experts": 128, "top_k": 4},
    # meta-llama/Llama-4-Scout-17B-16E: text_config.intermediate_size 8192, num_local_experts 16
    "llama4-scout": {
        **_LLAMA4,
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "num_experts": 16,
        "top_k": 1,
        "shared_intermediate_size": 8192,
    },
    # meta-llama/Llama-4-Maverick-17B-128E
    "llama4-maverick": {
        **_LLAMA4,
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "num_experts": 128,
        "top_k": 1,
        "shared_intermediate_size": 8192,
    },
}
