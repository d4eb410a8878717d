"""Drop-in: small random HF CausalLMs of every family switched to moetune by `patch` and by
`experts_implementation="moetune"` give eager's greedy tokens and logits (fp32, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

transformers = pytest.importorskip("transformers")

from moetune.model import MoE, MoEConfig, TunedMoE, patch, register_hf  # noqa: E402

H, I, E, VOCAB = 48, 40, 8, 128
BASE = {"num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": H, "vocab_size": VOCAB}
BASE.update(num_hidden_layers=2, max_position_embeddings=64)


def _config(family: str):
    from transformers import AutoConfig

    kw = {
        "mixtral": {"intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": 2},
        "qwen2_moe": {
            "moe_intermediate_size": I,
            "shared_expert_intermediate_size": 56,
            "num_experts": E,
            "num_experts_per_tok": 3,
            "norm_topk_prob": False,
        },
        "qwen3_moe": {"moe_intermediate_size": I, "num_experts": E, "num_experts_per_tok": 4},
        "olmoe": {"intermediate_size": I, "num_experts": E, "num_experts_per_tok": 2},
        "deepseek_v2": {
            "moe_intermediate_size": I,
            "n_routed_experts": E,
            "num_experts_per_tok": 3,
            "n_shared_experts": 2,
            "first_k_dense_replace": 0,
            "routed_scaling_factor": 1.5,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 12,
        },
        "deepseek_v3": {
            "moe_intermediate_size": I,
            "n_routed_experts": E,
            "num_experts_per_tok": 3,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 12,
        },
        "gpt_oss": {"intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": 2, "head_dim": 12},
        "llama4_text": {
            "intermediate_size": I,
            "intermediate_size_mlp": 64,
            "num_local_experts": E,
            "num_experts_per_tok": 1,
            "head_dim": 12,
        },
    }[family]
    return AutoConfig.for_model(family, **BASE, **kw)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "llama4_text"]


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """HF leaves some expert weights uninitialised: give every parameter and buffer real random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                continue
            fan_in = H if p.dim() == 1 or (p.dim() == 3 and p.shape[1] == H) else p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        for name, b in model.named_buffers():
            if "correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def _model(family: str, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family), **kw).eval()
    _randomize(model)
    return model


def _greedy(model, prompt: torch.Tensor, steps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens after `steps` greedy steps, logits of the prompt) without a cache, so every step re-runs all tokens."""
    with torch.no_grad():
        logits = model(prompt).logits
        ids = prompt
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids, logits


PROMPT = torch.tensor([[3, 17, 99, 5, 42, 7, 64, 1], [8, 8, 120, 33, 2, 91, 15, 60]])


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_gives_eager_tokens_and_keeps_state_dict(family):
    model = _model(family, experts_implementation="eager")
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    want_ids, want_logits = _greedy(model, PROMPT)

    swapped = patch(model, db=False)
    assert swapped and all(isinstance(m, TunedMoE) for m in swapped.values())
    assert all(isinstance(model.get_submodule(name), TunedMoE) for name in swapped)
    state = model.state_dict()
    assert list(state) == list(keys)  # same keys, same order: checkpoints load unchanged
    assert all(torch.equal(state[k], keys[k]) for k in keys)
    got_ids, got_logits = _greedy(model, PROMPT)
    assert torch.equal(got_ids, want_ids)
    assert rel_err(got_logits, want_logits) < 1e-4
    assert patch(model, db=False) == {}  # a patched model has nothing left to swap


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_implementation_moetune_gives_eager_tokens(family):
    register_hf(db=False)
    eager = _model(family, experts_implementation="eager")
    want_ids, want_logits = _greedy(eager, PROMPT)
    tuned = _model(family, experts_implementation="moetune")
    assert tuned.config._experts_implementation == "moetune"
    tuned.load_state_dict(eager.state_dict())
    got_ids, got_logits = _greedy(tuned, PROMPT)
    assert torch.equal(got_ids, want_ids)
    assert rel_err(got_logits, want_logits) < 1e-4
    # the kernels really ran: some module now carries a moetune runner
    assert any("_moetune" in m.__dict__ for m in tuned.modules())
    assert list(tuned.state_dict()) == list(eager.state_dict())


def test_load_state_dict_after_patch_updates_the_kernels_weights():
    model = _model("gpt_oss", experts_implementation="eager")
    patch(model, db=False)
    before = _greedy(model, PROMPT, steps=0)[1]
    other = _model("gpt_oss", experts_implementation="eager")
    _randomize(other, seed=1)
    model.load_state_dict(other.state_dict())
    want = _greedy(other, PROMPT, steps=0)[1]
    got = _greedy(model, PROMPT, steps=0)[1]
    assert rel_err(got, want) < 1e-4 and rel_err(before, want) > 1e-2


def test_from_module_keeps_block_keys_and_output_convention():
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    block = Llama4TextMoe(_config("llama4_text")).eval()
    _randomize(block)
    tuned = TunedMoE.from_module(block, db=False)
    assert list(tuned.state_dict()) == list(block.state_dict())
    x = torch.randn(2, 5, H)
    (want, want_logits), (got, got_logits) = block(x), tuned(x)
    assert got.shape == want.shape == (10, H) and got_logits.shape == want_logits.shape
    assert rel_err(got, want) < 1e-5 and rel_err(got_logits, want_logits) < 1e-6


def test_patch_errors_and_moetune_modules():
    with pytest.raises(ValueError, match="no MoE block found in Sequential"):
        patch(torch.nn.Sequential(torch.nn.Linear(4, 4)), db=False)
    with pytest.raises(ValueError, match=r"TunedMoE\.from_module"):
        patch(MoE(MoEConfig(hidden_size=8, intermediate_size=8, num_experts=2, top_k=1)), db=False)
    with pytest.raises(ValueError, match="takes a moetune MoE or a Hugging Face MoE block"):
        TunedMoE.from_module(torch.nn.Linear(4, 4))
    moe = MoE(MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2))
    wrapper = torch.nn.Sequential(moe)
    swapped = patch(wrapper, db=False)
    assert list(swapped) == ["0"] and isinstance(wrapper[0], TunedMoE)
    x = torch.randn(3, 16)
    assert rel_err(wrapper(x), moe(x)) < 1e-5


def test_from_pretrained_with_moetune_and_db_records(tmp_path):
    from transformers import AutoModelForCausalLM

    from moetune.ir.program import lower
    from moetune.ir.target import resolve_target
    from moetune.kernels.db import KernelKey, KernelRecord, MemoryKernelDB, current_versions
    from moetune.kernels.registry import default_config
    from moetune.model.hf.blocks import hf_block_config

    eager = _model("qwen3_moe", experts_implementation="eager")
    eager.save_pretrained(tmp_path / "m")
    cfg = hf_block_config(eager.model.layers[0].mlp)
    host = resolve_target("cpu")
    db = MemoryKernelDB()
    for bucket in (8, 16):
        op = lower(cfg, bucket).op("experts.gemm1")
        point = default_config(op, "tvm", host).as_dict()
        db.put(
            KernelRecord(
                KernelKey(host.name, op.signature, "float32", bucket),
                current_versions(),
                "tvm",
                point,
                1.0,
                1.0,
                1.0,
                2.0,
                3,
            )
        )
    register_hf(db=db)
    try:
        tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "m", experts_implementation="moetune").eval()
        want_ids, want_logits = _greedy(eager, PROMPT, steps=2)
        got_ids, got_logits = _greedy(tuned, PROMPT, steps=2)
    finally:
        register_hf(db=False)
    assert torch.equal(got_ids, want_ids) and rel_err(got_logits, want_logits) < 1e-4
    runner = tuned.model.layers[0].mlp.experts.__dict__["_moetune"]
    described = {d["op"]: d["source"] for d in runner.describe(16)}
    assert described["experts.gemm1"] == "db:exact"


def test_patch_says_once_when_torch_openmp_threads_will_spin(monkeypatch):
    """Inside a model torch's spinning OpenMP threads slow the CPU kernels: patch says so once, naming the fix, and
    says nothing when OMP_WAIT_POLICY is set (or on one thread, or without the tvm backend)."""
    import warnings

    from moetune.model.hf import patch as patch_module

    monkeypatch.setattr(patch_module, "_WARNED", set())
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.warns(UserWarning, match="OMP_WAIT_POLICY=PASSIVE"):
        patch(_model("qwen3_moe"), db=False)
    for env, backends in (({}, ("tvm",)), ({"OMP_WAIT_POLICY": "PASSIVE"}, ("tvm",)), ({}, ("torch",))):
        monkeypatch.setattr(patch_module, "_WARNED", set() if env or backends == ("torch",) else {"spin"})
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            patch(_model("qwen3_moe"), db=False, backends=backends)
