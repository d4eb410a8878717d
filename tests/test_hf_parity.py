"""The reference MoE reproduces Hugging Face's own sparse-MoE block of every supported family (fp32).

Each case builds HF's block from a small config with random weights (nothing is downloaded), loads it into
MoE.from_hf_block, and compares outputs on random (batch, seq, H) inputs: relative error <= 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

transformers = pytest.importorskip("transformers")

from moetune.model import MoE, MoEConfig  # noqa: E402

H, I, E = 48, 40, 8
ATTN = {"num_attention_heads": 4, "num_key_value_heads": 4}  # HF validates H % heads


def _mixtral():
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(**ATTN, hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    return cfg, MixtralSparseMoeBlock(cfg)


def _qwen2_moe():
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(
        **ATTN,
        hidden_size=H,
        moe_intermediate_size=I,
        shared_expert_intermediate_size=56,
        num_experts=E,
        num_experts_per_tok=3,
        norm_topk_prob=False,
    )
    return cfg, Qwen2MoeSparseMoeBlock(cfg)


def _qwen3_moe():
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(
        **ATTN, hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=4, norm_topk_prob=True
    )
    return cfg, Qwen3MoeSparseMoeBlock(cfg)


def _olmoe():
    from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = OlmoeConfig(**ATTN, hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=2)
    return cfg, OlmoeSparseMoeBlock(cfg)


def _deepseek_v2(topk_method="greedy"):
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    cfg = DeepseekV2Config(
        **ATTN,
        hidden_size=H,
        moe_intermediate_size=I,
        n_routed_experts=E,
        num_experts_per_tok=3,
        n_shared_experts=2,
        routed_scaling_factor=1.5,
        topk_method=topk_method,
        n_group=4,
        topk_group=2,
    )
    return cfg, DeepseekV2Moe(cfg)


def _deepseek_v3():
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(
        **ATTN,
        hidden_size=H,
        moe_intermediate_size=I,
        n_routed_experts=E,
        num_experts_per_tok=3,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    return cfg, DeepseekV3MoE(cfg)


def _gpt_oss():
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(**ATTN, hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    return cfg, GptOssMLP(cfg)


def _llama4():
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = Llama4TextConfig(**ATTN, hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=1)
    return cfg, Llama4TextMoe(cfg)


FAMILIES = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,  # shared expert with a sigmoid gate, no renormalisation
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,  # greedy top-k, routed scaling, two shared experts
    "deepseek_v2_grouped": lambda: _deepseek_v2("group_limited_greedy"),  # group-limited by max score
    "deepseek_v3": _deepseek_v3,  # sigmoid + correction bias, groups scored by top-2 sum
    "gpt_oss": _gpt_oss,  # top-k on logits then softmax, clamped SwiGLU, interleaved gate/up, biases
    "llama4": _llama4,  # top-1 sigmoid weight applied to the input, shared expert
}


def _randomize(block: torch.nn.Module) -> None:
    """HF leaves expert weights uninitialised; give every parameter and buffer real random values."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else H
            p.copy_(torch.randn_like(p) / fan_in**0.5)
            if "gate_up" in name and p.dim() == 3 and p.shape[1] == H:  # transposed (E, H, 2I) layouts
                p.mul_(fan_in**0.5 / H**0.5)
        for name, b in block.named_buffers():
            if "correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.1)


def _hf_out(block, x):
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x.shape)  # Llama 4's block returns (T, H)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 16)], ids=["T=1", "batch2-seq7", "batch3-seq16"])
def test_reference_matches_hf_block(family, shape):
    _, block = FAMILIES[family]()
    block = block.float().eval()
    _randomize(block)
    moe = MoE.from_hf_block(block).eval()
    x = torch.randn(*shape, H)
    with torch.no_grad():
        want = _hf_out(block, x.clone())
        got = moe(x)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_hf_block_config_matches_from_hf_config(family):
    hf_cfg, block = FAMILIES[family]()
    from_block = MoE.from_hf_block(block.float()).cfg
    from_config = MoEConfig.from_hf(hf_cfg)
    ignore = {"name", "dtype"}
    a = {k: v for k, v in from_block.to_dict().items() if k not in ignore}
    b = {k: v for k, v in from_config.to_dict().items() if k not in ignore}
    if family == "deepseek_v2":  # greedy: HF keeps n_group/topk_group in the config but never uses them
        b.update(n_group=1, topk_group=1)
    assert a == b


def test_from_hf_roundtrip_through_config_json(tmp_path):
    for family, build in FAMILIES.items():
        hf_cfg, _ = build()
        hf_cfg.save_pretrained(tmp_path / family)
        assert MoEConfig.from_hf(tmp_path / family) == MoEConfig.from_hf(hf_cfg), family
        assert MoEConfig.from_hf(tmp_path / family / "config.json") == MoEConfig.from_hf(hf_cfg), family


def test_from_hf_llama4_multimodal_wrapper():
    from transformers.models.llama4.configuration_llama4 import Llama4Config

    wrapper = Llama4Config(text_config={"hidden_size": H, "intermediate_size": I, "num_local_experts": E})
    cfg = MoEConfig.from_hf(wrapper)
    assert (cfg.hidden_size, cfg.num_experts, cfg.router) == (H, E, "topk_sigmoid")


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import BertConfig

    with pytest.raises(ValueError, match=r"unsupported HF architecture 'bert'.*mixtral.*gpt_oss"):
        MoEConfig.from_hf(BertConfig())
    with pytest.raises(ValueError, match="unsupported HF MoE block Linear"):
        MoE.from_hf_block(torch.nn.Linear(2, 2))
