"""MoEConfig: validation names the field and the allowed values; presets carry the published shapes."""

from __future__ import annotations

import pytest

from moetune.model import MoEConfig

BASE = {"hidden_size": 64, "intermediate_size": 32, "num_experts": 8, "top_k": 2}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"top_k": 9}, r"top_k must be <= num_experts \(8\)"),
        ({"hidden_size": 0}, r"hidden_size must be an integer >= 1"),
        ({"intermediate_size": -3}, r"intermediate_size must be an integer >= 1"),
        ({"num_experts": 2.5}, r"num_experts must be an integer"),
        ({"top_k": True}, r"top_k must be an integer"),
        ({"router": "noisy"}, r"router must be one of softmax, sigmoid, topk_softmax, topk_sigmoid, topk_hard"),
        ({"activation": "tanh"}, r"activation must be one of silu, gelu, gelu_tanh, relu, swiglu_oai"),
        ({"dtype": "int8"}, r"dtype must be one of float32, bfloat16, float16"),
        ({"group_score": "mean"}, r"group_score must be one of max, top2_sum"),
        ({"n_group": 3}, r"n_group must divide num_experts \(8\)"),
        ({"n_group": 4, "topk_group": 5}, r"topk_group must be <= n_group \(4\)"),
        ({"n_group": 4, "topk_group": 1, "top_k": 3}, r"top_k \(3\) exceeds the 2 experts left eligible"),
        ({"routed_scaling_factor": 0.0}, r"routed_scaling_factor must be > 0"),
        ({"num_shared_experts": 1}, r"num_shared_experts and shared_intermediate_size"),
        ({"shared_expert_gate": True}, r"shared_expert_gate needs num_shared_experts > 0"),
        ({"activation": "swiglu_oai", "swiglu_limit": -1.0}, r"swiglu_alpha and swiglu_limit must be > 0"),
        (  # swiglu_oai clamps a gate and an up half: it has no non-gated form
            {"gated": False, "activation": "swiglu_oai"},
            r"activation must be one of gelu, gelu_tanh, relu, silu for non-gated experts \(gated=False\)",
        ),
        ({"gated": 0}, r"gated must be a bool"),
    ],
)
def test_impossible_config_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**BASE, **changes})


def test_dtype_aliases_normalise():
    assert MoEConfig(**BASE, dtype="bf16").dtype == "bfloat16"
    assert MoEConfig(**BASE, dtype="torch.float16").dtype == "float16"


def test_dict_and_json_roundtrip(tmp_path):
    cfg = MoEConfig.preset("deepseek-v3")
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_json(tmp_path / "moe.json")
    assert MoEConfig.from_json(tmp_path / "moe.json") == cfg
    with pytest.raises(ValueError, match="no field"):
        MoEConfig.from_dict({**BASE, "num_expert": 3})


def test_gated_defaults_and_roundtrip(tmp_path):
    assert MoEConfig(**BASE).gated is True
    assert MoEConfig.from_dict(dict(BASE)).gated is True  # dicts written before the field existed: gated
    student = MoEConfig(**BASE, gated=False, router="topk_hard", activation="gelu", expert_bias=True)
    assert student.to_dict()["gated"] is False
    assert MoEConfig.from_dict(student.to_dict()) == student
    student.to_json(tmp_path / "student.json")
    assert MoEConfig.from_json(tmp_path / "student.json") == student
    for act in ("gelu", "gelu_tanh", "relu", "silu"):
        assert MoEConfig(**BASE, gated=False, activation=act).activation == act


EXPECTED_PRESETS = {
    # name: (H, I, E, K, shared width Is)
    "mixtral-8x7b": (4096, 14336, 8, 2, 0),
    "mixtral-8x22b": (6144, 16384, 8, 2, 0),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4, 5632),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 0),
    "qwen3-235b-a22b": (4096, 1536, 128, 8, 0),
    "olmoe-1b-7b": (2048, 1024, 64, 8, 0),
    "deepseek-v2-lite": (2048, 1408, 64, 6, 2816),
    "deepseek-v3": (7168, 2048, 256, 8, 2048),
    "gpt-oss-20b": (2880, 2880, 32, 4, 0),
    "gpt-oss-120b": (2880, 2880, 128, 4, 0),
    "llama4-scout": (5120, 8192, 16, 1, 8192),
    "llama4-maverick": (5120, 8192, 128, 1, 8192),
}


def test_presets_list_every_family():
    assert set(EXPECTED_PRESETS) <= set(MoEConfig.presets())


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_preset_shapes(name):
    cfg = MoEConfig.preset(name)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k, cfg.shared_size) == (
        EXPECTED_PRESETS[name]
    )
    assert cfg.name == name


def test_preset_routing_details():
    v3 = MoEConfig.preset("deepseek-v3")
    assert (v3.router, v3.n_group, v3.topk_group, v3.routed_scaling_factor) == ("sigmoid", 8, 4, 2.5)
    oss = MoEConfig.preset("gpt-oss-20b")
    assert (oss.router, oss.activation, oss.swiglu_limit, oss.expert_bias) == ("topk_softmax", "swiglu_oai", 7.0, True)
    scout = MoEConfig.preset("llama4-scout")
    assert scout.apply_router_weight_on_input and scout.router == "topk_sigmoid"
    assert MoEConfig.preset("qwen1.5-moe-a2.7b").shared_expert_gate


def test_preset_overrides_and_unknown_name():
    assert MoEConfig.preset("qwen3-30b-a3b", dtype="float32").dtype == "float32"
    with pytest.raises(ValueError, match=r"unknown preset 'qwen9'; available: mixtral-8x7b"):
        MoEConfig.preset("qwen9")


def test_flops_per_token_counts_router_experts_and_shared():
    cfg = MoEConfig(**BASE)
    h, i, e, k = 64, 32, 8, 2
    assert cfg.flops_per_token() == 2 * h * e + k * (2 * h * 2 * i + 2 * i * h)
    shared = {"num_shared_experts": 2, "shared_intermediate_size": 8, "shared_expert_gate": True}
    s = 16
    assert MoEConfig(**BASE, **shared).flops_per_token() == (
        2 * h * e + k * (2 * h * 2 * i + 2 * i * h) + 2 * h * 2 * s + 2 * s * h + 2 * h
    )
    # non-gated experts (shared ones too) project to I (not 2I) columns before the activation
    assert MoEConfig(**BASE, **shared, gated=False, activation="gelu").flops_per_token() == (
        2 * h * e + k * (2 * h * i + 2 * i * h) + 2 * h * s + 2 * s * h + 2 * h
    )
